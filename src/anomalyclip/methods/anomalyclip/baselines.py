"""The paper's baselines and ablations, each a configuration of the one model.

Hand-written text prompts replace the learned ones when ``config.text_prompts`` is not
"learned":

* "plain": one sentence pair, as zero-shot CLIP is used for anomaly detection
  ("a photo of a normal {}." / "a photo of a damaged {}.");
* "winclip": WinCLIP's compositional ensemble, every state word (7 normal, 5 abnormal)
  in each of 22 templates, embeddings L2-normalised, averaged per class and normalised
  again.

The object named is ``config.object_name`` ("object") in object-agnostic mode and the
class being evaluated in object-aware mode, as for the learned prompts.

The rows of the paper's comparison and ablation tables, each one ``--preset``, are in
:mod:`anomalyclip.methods.anomalyclip.presets`.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalyclip.backbone.clip import CLIP
from anomalyclip.backbone.tokenizer import tokenize
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig

logger = logging.getLogger(__name__)

TEXT_PROMPT_KINDS = ("learned", "plain", "winclip")
PLAIN_PAIR = ("a photo of a normal {}.", "a photo of a damaged {}.")
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

# Per backbone, (kind, object name, device, dtype) -> (2, E) features; the backbone is
# frozen, so an entry never goes stale while its model lives.
_FEATURE_CACHE: weakref.WeakKeyDictionary[CLIP, dict[tuple, Tensor]] = weakref.WeakKeyDictionary()


def baseline_sentences(kind: str, object_name: str) -> tuple[list[str], list[str]]:
    """The (normal, abnormal) sentences a hand-written baseline encodes for one object."""
    if kind == "plain":
        return [PLAIN_PAIR[0].format(object_name)], [PLAIN_PAIR[1].format(object_name)]
    if kind == "winclip":
        return (
            [t.format(s.format(object_name)) for s in NORMAL_STATES for t in WINCLIP_TEMPLATES],
            [t.format(s.format(object_name)) for s in ABNORMAL_STATES for t in WINCLIP_TEMPLATES],
        )
    raise ValueError(f"text_prompts must be one of {', '.join(TEXT_PROMPT_KINDS)}; got {kind!r}")


def object_name_for(config: AnomalyCLIPConfig, object_name: str | None) -> str:
    """The name the prompts use: the class in object-aware mode, else the config's word."""
    if config.prompt_mode == "aware" and object_name:
        return object_name
    return config.object_name


def _class_embedding(clip: CLIP, sentences: list[str]) -> Tensor:
    tokens = tokenize(sentences, clip.arch.context_length).to(clip.token_embedding.weight.device)
    features = F.normalize(clip.encode_text(tokens).float(), dim=-1)
    return F.normalize(features.mean(dim=0), dim=-1)


def handcrafted_text_features(
    clip: CLIP, config: AnomalyCLIPConfig, object_name: str | None = None
) -> Tensor:
    """(2, E) L2-normalised [normal, abnormal] features of a hand-written baseline.

    Cached per backbone and object name: a WinCLIP ensemble is 264 sentences.
    """
    name = object_name_for(config, object_name)
    device = clip.token_embedding.weight.device
    key = (config.text_prompts, name, device, clip.dtype)
    cache = _FEATURE_CACHE.setdefault(clip, {})
    if key not in cache:
        normal, abnormal = baseline_sentences(config.text_prompts, name)
        with torch.no_grad():
            cache[key] = torch.stack(
                [_class_embedding(clip, normal), _class_embedding(clip, abnormal)]
            )
        logger.debug(
            "%s prompts for %r: %d + %d sentences",
            config.text_prompts,
            name,
            len(normal),
            len(abnormal),
        )
    return cache[key]

"""AnomalyCLIP: a frozen CLIP, learned object-agnostic prompts, image scores and pixel maps.

The pipeline is split into steps that training and evaluation reuse separately: the
visual embeddings of an image depend only on the frozen backbone (so they can be cached),
the text features only on the prompts (so they are computed once per prompt state).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalyclip.backbone.clip import CLIP
from anomalyclip.backbone.identity import BackboneIdentity
from anomalyclip.maps import gaussian_smooth, layer_map, patch_probabilities, upsample
from anomalyclip.methods.anomalyclip.checkpoint import (
    PromptCheckpoint,
    apply_prompt_state,
    config_for,
)
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.factory import (
    read_prompts,
    recorded_identity,
    registry_entry,
    resolve_backbone_file,
)
from anomalyclip.methods.anomalyclip.presets import LAST_LAYER, Preset, get_preset
from anomalyclip.methods.anomalyclip.prompts import PromptLearner
from anomalyclip.methods.references import ReferenceError, bank_path_for
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import AnomalyPrediction, Predictor
from anomalyclip.preprocess import ImageSource, PreProcessor
from anomalyclip.utils.precision import PrecisionChoice

__all__ = ["AnomalyCLIP", "AnomalyOutput", "AnomalyPrediction", "ImageEmbeddings"]

logger = logging.getLogger(__name__)


@dataclass
class ImageEmbeddings:
    """L2-normalised visual embeddings of a batch: what the frozen backbone contributes."""

    global_embedding: Tensor  # (B, E)
    patch_tokens: dict[int, Tensor]  # 1-based layer -> (B, 1 + gh * gw, E)
    grid: tuple[int, int]

    def to(self, device: torch.device | str) -> ImageEmbeddings:
        return ImageEmbeddings(
            self.global_embedding.to(device),
            {k: v.to(device) for k, v in self.patch_tokens.items()},
            self.grid,
        )


@dataclass
class AnomalyOutput:
    """Scores and maps for a batch; maps are at model resolution (S x S)."""

    image_scores: Tensor  # (B,) probability of "abnormal"
    anomaly_maps: Tensor  # (B, S, S) summed layer maps, Gaussian-smoothed
    raw_maps: Tensor  # (B, S, S) summed layer maps before smoothing
    layer_maps: dict[int, Tensor] = field(default_factory=dict)  # only when asked for


class AnomalyCLIP(nn.Module, Predictor):
    """A frozen CLIP plus the learnable prompts; only ``prompt_learner`` has gradients.

    Build one with :func:`create_model` (or
    ``from_pretrained``),
    which also records the backbone's identity for checkpoints.
    """

    method = "anomalyclip"
    # the precision chosen through --precision / PredictorSpec (None: float32, as built)
    precision: PrecisionChoice | None = None

    def __init__(
        self,
        clip: CLIP,
        config: AnomalyCLIPConfig | None = None,
        prompt_learner: PromptLearner | None = None,
        backbone: BackboneIdentity | None = None,
    ) -> None:
        super().__init__()
        self.config = config or AnomalyCLIPConfig()
        self.clip = clip.requires_grad_(False).eval()
        self.backbone = backbone or BackboneIdentity(
            self.config.backbone, None, clip.arch.to_dict()
        )
        self._check_config_fits_backbone()
        self.prompt_learner = prompt_learner or PromptLearner(
            clip,
            n_ctx=self.config.n_ctx,
            prompt_depth=self.config.prompt_depth,
            deep_prompt_length=self.config.deep_prompt_length,
            object_name=self.config.object_name,
            normal_template=self.config.normal_template,
            abnormal_template=self.config.abnormal_template,
        )
        self._text_cache: tuple[tuple, Tensor] | None = None

    def _check_config_fits_backbone(self) -> None:
        layers = self.clip.visual.num_layers
        patch = self.clip.visual.patch_size
        if max(self.config.features) > layers:
            raise ValueError(
                f"feature layers {list(self.config.features)} exceed the backbone's {layers} "
                "visual layers"
            )
        if self.config.dpam_layers > layers:
            raise ValueError(f"dpam_layers {self.config.dpam_layers} > {layers} visual layers")
        if self.config.image_size % patch:
            raise ValueError(
                f"image_size {self.config.image_size} is not a multiple of the patch size {patch}"
            )

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path | None = "mvtec",
        clip_weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> AnomalyCLIP:
        """Backbone and prompts from names or paths:
        :func:`create_model`.

        ``checkpoint`` is a registered name ("mvtec", "visa"), a file of ours or the
        authors', or None for untrained prompts. ``clip_weights`` defaults to the backbone
        the checkpoint names. Keyword overrides change configuration fields (image_size,
        features, dpam_layers, sigma, ...).
        """
        return create_model(
            checkpoint,
            clip_weights=clip_weights,
            device=device,
            dtype=dtype,
            overrides=overrides,
        )

    # the scoring-method interface ----------------------------------------------------------

    @property
    def preprocessor(self) -> PreProcessor:
        return self.config.preprocessor()

    @property
    def postprocessor(self) -> PostProcessor:
        return self.config.postprocessor()

    def settings(self) -> dict[str, Any]:
        recorded = {**self.config.to_dict(), "backbone_identity": self.backbone.to_dict()}
        if self.precision is not None:
            recorded["precision"] = self.precision.to_dict()
        return recorded

    def preprocess(self, images: Sequence[ImageSource] | ImageSource) -> Tensor:
        """Images of any kind to the model's input batch: the one place this happens."""
        return self.preprocessor(images)

    def score_tensors(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        output = self(images.to(self.device))
        return (
            output.image_scores.float().cpu().numpy(),
            output.anomaly_maps.float().cpu().numpy(),
        )

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    # text side -------------------------------------------------------------------------

    def compute_text_features(self, object_name: str | None = None) -> Tensor:
        """(2, E) L2-normalised [normal, abnormal] features from the prompts, with gradients."""
        if self.config.text_prompts != "learned":
            from anomalyclip.methods.anomalyclip.baselines import handcrafted_text_features

            return handcrafted_text_features(self.clip, self.config, object_name)
        static = None
        if object_name is not None and object_name != self.prompt_learner.object_name:
            if self.config.prompt_mode == "agnostic":
                object_name = None
            else:
                static = self.prompt_learner.static_parts(self.clip, object_name)
        embeddings, eot, deep = self.prompt_learner(static)
        features = self.clip.encode_token_embeddings(
            embeddings.to(self.dtype), eot.to(self.device), [p.to(self.dtype) for p in deep]
        )
        return F.normalize(features.float(), dim=-1)

    def text_features(self, object_name: str | None = None) -> Tensor:
        """As :meth:`compute_text_features`, cached while the prompts do not change."""
        parameters = list(self.prompt_learner.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in parameters):
            return self.compute_text_features(object_name)
        key = (object_name, self.device, self.dtype, *(p._version for p in parameters))
        key += tuple(p.data_ptr() for p in parameters)
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                self._text_cache = (key, self.compute_text_features(object_name))
        return self._text_cache[1]

    # image side ------------------------------------------------------------------------

    def encode_image(self, images: Tensor, layers: Sequence[int] | None = None) -> ImageEmbeddings:
        """Global and per-layer patch embeddings, L2-normalised, in float32."""
        config = self.config
        with torch.no_grad():
            features = self.clip.visual.forward_features(
                images.to(self.device),
                layers=config.features if layers is None else layers,
                dpam_layers=config.dpam_layers,
                dpam_mode=config.dpam_mode,
                global_head=config.global_head,
            )
        # config.global_head is never None, so the backbone always returns a global embedding
        assert features.global_embedding is not None
        return ImageEmbeddings(
            F.normalize(features.global_embedding.float(), dim=-1),
            {k: F.normalize(v.float(), dim=-1) for k, v in features.patch_tokens.items()},
            features.grid,
        )

    def image_logits(self, embeddings: ImageEmbeddings, text: Tensor) -> Tensor:
        """(B, 2) cosine similarities over the temperature: the global-loss logits."""
        return embeddings.global_embedding @ text.T / self.config.temperature

    def layer_probabilities(
        self, embeddings: ImageEmbeddings, text: Tensor, size: tuple[int, int] | None = None
    ) -> dict[int, Tensor]:
        """Per layer (B, 2, H, W) [normal, abnormal] probabilities, upsampled to ``size``."""
        size = size or (self.config.image_size, self.config.image_size)
        return {
            layer: upsample(
                patch_probabilities(tokens, text, embeddings.grid, self.config.temperature), size
            )
            for layer, tokens in embeddings.patch_tokens.items()
        }

    def score(
        self,
        embeddings: ImageEmbeddings,
        text: Tensor,
        keep_layer_maps: bool = False,
        smoothing_dtype: torch.dtype = torch.float64,
    ) -> AnomalyOutput:
        """Image scores and pixel maps from embeddings: the one score head.

        The layer maps are summed at patch resolution and upsampled once: bilinear
        interpolation is linear, so this equals upsampling every layer, at a fraction of
        the cost. ``smoothing_dtype`` float32 serves ONNX export (no float64 MatMul in
        ONNX Runtime's CPU provider), within 1e-6 of the default.
        """
        size = (self.config.image_size, self.config.image_size)
        scores = self.image_logits(embeddings, text).softmax(dim=-1)[:, 1]
        coarse = {
            layer: layer_map(
                patch_probabilities(tokens, text, embeddings.grid, self.config.temperature)
            )
            for layer, tokens in embeddings.patch_tokens.items()
        }
        raw = upsample(torch.stack(list(coarse.values())).sum(dim=0), size)
        layer_maps = {k: upsample(v, size) for k, v in coarse.items()} if keep_layer_maps else {}
        smoothed = gaussian_smooth(raw, self.config.sigma, compute_dtype=smoothing_dtype)
        return AnomalyOutput(scores, smoothed, raw, layer_maps)

    def forward(self, images: Tensor, keep_layer_maps: bool = False) -> AnomalyOutput:
        with torch.no_grad():
            return self.score(self.encode_image(images), self.text_features(), keep_layer_maps)


def create_model(
    checkpoint: str | Path | PromptCheckpoint | None = None,
    clip_weights: str | Path | CLIP | None = None,
    *,
    config: AnomalyCLIPConfig | None = None,
    preset: str | Preset | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    references_applied: bool = False,
) -> AnomalyCLIP:
    """Backbone, prompts and configuration in one call.

    ``checkpoint``: a registered name ("mvtec"), a file of ours or the authors', an
    already read :class:`PromptCheckpoint`, or None / "none" for fresh prompts (seeded
    with ``seed``, so runs repeat) or hand-written ones (baseline presets).
    ``clip_weights``: a registered backbone name, a file/folder, or a CLIP already in
    memory; default: the backbone the checkpoint records. ``config``: the starting
    configuration when there is no checkpoint (default: the paper's). ``overrides``:
    configuration fields; None values mean "not given" and are ignored. ``preset``: a row
    of the paper's tables (:mod:`anomalyclip.methods.anomalyclip.baselines`).

    A checkpoint calibrated with reference images holds thresholds for the few-shot
    maps only, so it is refused here unless ``references_applied`` (the caller applies
    the bank or refuses, as :func:`anomalyclip.methods.assemble.assemble` does).
    """
    info = registry_entry(checkpoint)
    prompts = read_prompts(checkpoint)
    config = config or AnomalyCLIPConfig()
    if prompts is not None:
        if info is not None and prompts.config is None:
            config = AnomalyCLIPConfig.from_dict({**config.to_dict(), **info.config})
        config = config_for(prompts, config)
        if not references_applied:
            refuse_without_bank(prompts.path, config)
    changes: dict[str, Any] = {}
    if preset is not None:
        changes.update((get_preset(preset) if isinstance(preset, str) else preset).config)
    changes.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if isinstance(clip_weights, CLIP):
        clip, identity = clip_weights, BackboneIdentity(config.backbone)
    else:
        from anomalyclip.backbone.loading import load_clip

        recorded = recorded_identity(prompts, config)
        path, identity = resolve_backbone_file(recorded, clip_weights, prompts)
        clip = load_clip(path)
    identity = BackboneIdentity(identity.name, identity.sha256, clip.arch.to_dict())
    if changes.get("features") == LAST_LAYER:
        changes["features"] = (clip.visual.num_layers,)
    config = config.replace(backbone=identity.name, **changes)
    if prompts is None:
        torch.manual_seed(seed)  # fresh prompts: the same in every run with this seed
    model = AnomalyCLIP(clip, config, backbone=identity)
    if prompts is not None:
        apply_prompt_state(model, prompts)
    elif config.text_prompts == "learned":
        logger.warning("no prompt checkpoint given: the prompts are untrained")
    return model.to(device=device, dtype=dtype).eval()


def recorded_bank(settings: Mapping[str, Any]) -> str | None:
    """The digest of the reference bank a model's thresholds were calibrated with."""
    calibrated = (settings.get("extra") or {}).get("calibrated_with") or {}
    bank = calibrated.get("reference_bank")
    return None if bank is None else str(bank)


def refuse_without_bank(checkpoint: str | Path, config: AnomalyCLIPConfig) -> None:
    """Refuse a reference-calibrated checkpoint built without its bank: its thresholds
    would be applied to zero-shot maps, on another scale, without a word."""
    if recorded_bank(config.to_dict()) is None:
        return
    raise ReferenceError(
        f"{checkpoint} was calibrated with reference images, and its thresholds hold only "
        f"with them: build it with anomalyclip.assemble(PredictorSpec(checkpoint=...)), "
        f"which applies its bank {bank_path_for(checkpoint)}, or on the command line pass "
        "--checkpoint (and --reference with the bank file or the images)"
    )

"""Prompt checkpoints: the project's self-describing files and the authors' ``epoch_15.pth``.

Ours hold the configuration, the prompt state and what identifies the backbone, so a
checkpoint loads without its hyper-parameters repeated. The authors' hold only
``{"prompt_learner": state_dict}``; their n_ctx, depth and prompt length are read off the
tensor shapes. Everything is read with ``torch.load(weights_only=True)``: no pickled code
runs. The structure is checked field by field, so a damaged or hostile file is one
``ValueError`` naming the file and the field, never a traceback; prompt tensors holding
NaN or infinity are refused, as their scores would be NaN and a NaN reads as "normal".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from torch import Tensor

from anomalyclip.backbone.clip import CLIP
from anomalyclip.backbone.identity import BackboneIdentity
from anomalyclip.backbone.tokenizer import tokenize
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig, shown
from anomalyclip.methods.anomalyclip.prompts import PromptLearner, PromptShape, prompt_sentences
from anomalyclip.utils.atomic import atomic_torch_save
from anomalyclip.utils.safe_load import refuse_non_finite, safe_torch_load

logger = logging.getLogger(__name__)

FORMAT = "anomalyclip-prompts"
FORMAT_VERSION = 1
TOKEN_BUFFERS = ("token_prefix_pos", "token_suffix_pos", "token_prefix_neg", "token_suffix_neg")

Layout = Literal["anomalyclip", "authors"]


class PromptedModel(Protocol):
    """What reading and writing prompts needs of a model (the model module builds on
    this one, so it is described here rather than imported)."""

    @property
    def config(self) -> AnomalyCLIPConfig: ...

    @property
    def backbone(self) -> BackboneIdentity: ...

    @property
    def clip(self) -> CLIP: ...

    @property
    def prompt_learner(self) -> PromptLearner: ...


@dataclass
class PromptCheckpoint:
    path: str
    layout: Layout
    prompt_state: dict[str, Tensor]
    config: AnomalyCLIPConfig | None = None  # None for the authors' layout
    backbone: dict[str, Any] = field(default_factory=dict)  # name, sha256, architecture
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> PromptShape:
        return PromptShape.from_state_dict(self.prompt_state)


def read_checkpoint(path: str | Path) -> PromptCheckpoint:
    """Read either layout safely; errors name the file and what was found instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt checkpoint {path} not found")
    data = safe_torch_load(path, "PyTorch checkpoint")
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a prompt checkpoint")
    if data.get("format") == FORMAT:
        checkpoint = _ours(path, data)
    elif "prompt_learner" in data and isinstance(data["prompt_learner"], dict):
        checkpoint = PromptCheckpoint(str(path), "authors", dict(data["prompt_learner"]))
    else:
        keys = ", ".join(shown(key, 30) for key in sorted(map(str, data))[:10])
        raise ValueError(
            f"{path} is not an AnomalyCLIP prompt checkpoint (top-level keys: {keys}); "
            "expected {'prompt_learner': ...}"
        )
    _check_tensors(path, checkpoint.prompt_state)
    try:
        shape = checkpoint.shape
    except (ValueError, KeyError, IndexError) as error:
        raise ValueError(f"{path}: {error}") from None
    if checkpoint.config is not None:
        _check_config_matches(path, checkpoint.config, shape)
        _check_prompt_text(path, checkpoint.config)
    return checkpoint


def _ours(path: Path, data: dict[str, Any]) -> PromptCheckpoint:
    """Our layout, its structure checked field by field: one line names what is wrong."""
    version = data.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{path}: format_version must be an integer, got {shown(version)}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer anomalyclip (format version {version}); "
            "upgrade the package"
        )
    for key, required in (
        ("prompt_learner", True),
        ("config", True),
        ("backbone", False),
        ("extra", False),
    ):
        value = data.get(key)
        if (value is None and required) or (value is not None and not isinstance(value, dict)):
            kind = "missing" if value is None else f"a {type(value).__name__}"
            raise ValueError(f"{path}: '{key}' must be a dictionary, it is {kind}")
    try:
        config = AnomalyCLIPConfig.from_dict(data["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    _check_backbone(path, data.get("backbone") or {})
    return PromptCheckpoint(
        str(path),
        "anomalyclip",
        dict(data["prompt_learner"]),
        config,
        dict(data.get("backbone") or {}),
        dict(data.get("extra") or {}),
    )


def _check_prompt_text(path: Path, config: AnomalyCLIPConfig) -> None:
    """The learned prompts' sentences fit the text encoder: refused here, naming the
    file, rather than when the model is built from it."""
    if config.text_prompts != "learned":
        return
    sentences = prompt_sentences(
        config.n_ctx, config.object_name, config.normal_template, config.abnormal_template
    )
    try:
        tokenize(list(sentences))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _check_backbone(path: Path, backbone: dict[str, Any]) -> None:
    """The recorded identity: a name, a SHA-256 and an architecture, each of its type."""
    for key, kind, expected in (
        ("name", str, "a string"),
        ("sha256", str, "a string"),
        ("architecture", dict, "a dictionary"),
    ):
        value = backbone.get(key)
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"{path}: backbone.{key} must be {expected}, got {shown(value)}")
    for key, value in (backbone.get("architecture") or {}).items():
        if not isinstance(value, (str, int, float, type(None))):
            raise ValueError(
                f"{path}: backbone.architecture.{key} must be a number or a name, "
                f"got {shown(value)}"
            )


def _check_tensors(path: Path, state: dict[Any, Any]) -> None:
    """Every prompt entry is a named tensor, finite if floating-point: NaN prompts would give
    NaN scores, and a NaN compares as "normal" against any threshold."""
    if not state:
        raise ValueError(f"{path}: prompt_learner is empty")
    for name, value in state.items():
        if not isinstance(name, str):
            raise ValueError(f"{path}: prompt_learner has a key {shown(name)}, not a name")
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{path}: prompt_learner.{name} is a {type(value).__name__}, not a tensor"
            )
    refuse_non_finite(state, f"{path}: prompt_learner.")


def _check_config_matches(path: Path, config: AnomalyCLIPConfig, shape: PromptShape) -> None:
    """The recorded configuration agrees with the tensors (a model is built from it)."""
    found = [
        f"{name} {getattr(config, name)} in config, {getattr(shape, name)} in the tensors"
        for name in ("n_ctx", "prompt_depth", "deep_prompt_length")
        if getattr(config, name) != getattr(shape, name)
    ]
    if found:
        raise ValueError(f"{path}: the configuration contradicts the prompts: {'; '.join(found)}")


def config_for(checkpoint: PromptCheckpoint, base: AnomalyCLIPConfig) -> AnomalyCLIPConfig:
    """The checkpoint's own configuration, or ``base`` with the shapes its tensors imply."""
    if checkpoint.config is not None:
        return checkpoint.config
    shape = checkpoint.shape
    return base.replace(
        n_ctx=shape.n_ctx,
        prompt_depth=shape.prompt_depth,
        deep_prompt_length=shape.deep_prompt_length,
    )


def apply_prompt_state(model: PromptedModel, checkpoint: PromptCheckpoint) -> None:
    """Load the prompts, refusing a checkpoint made for another backbone or shape."""
    recorded = BackboneIdentity.from_dict(checkpoint.backbone)
    differences = recorded.differences(model.backbone)
    if differences:
        raise ValueError(
            f"{checkpoint.path} was trained on another backbone than the one given "
            f"({recorded.name}): {'; '.join(differences)}; pass the weights it was trained "
            "on with --clip-weights"
        )
    shape = checkpoint.shape
    expected = PromptShape(
        model.config.n_ctx,
        model.config.prompt_depth,
        model.config.deep_prompt_length,
        model.clip.arch.text_width,
    )
    if shape != expected:
        raise ValueError(
            f"{checkpoint.path} holds prompts of shape {shape}, the model expects {expected}"
        )
    state = {
        k: v
        for k, v in checkpoint.prompt_state.items()
        if not k.startswith("compound_prompt_projections.")
    }
    own = model.prompt_learner.state_dict()
    for name in TOKEN_BUFFERS:
        if name in state and state[name].shape == own[name].shape:
            difference = (state[name].float() - own[name].float()).abs().max().item()
            if difference > 1e-2:
                raise ValueError(
                    f"{checkpoint.path} was made with another CLIP backbone: its token "
                    f"embeddings ({name}) differ from this backbone's by up to {difference:.3g}"
                )
    state.update({name: own[name] for name in own if name not in state})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{checkpoint.path}: missing {missing}, unexpected {unexpected}")
    wrong = [
        f"{name} {tuple(value.shape)} (expected {tuple(own[name].shape)})"
        for name, value in state.items()
        if value.shape != own[name].shape
    ]
    if wrong:
        raise ValueError(
            f"{checkpoint.path}: prompt tensors of the wrong shape: {', '.join(wrong)}"
        )
    model.prompt_learner.load_state_dict(
        {k: v.to(own[k].dtype) for k, v in state.items()}, strict=True
    )


def save_checkpoint(
    path: str | Path,
    model: PromptedModel,
    layout: Layout = "anomalyclip",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write atomically; "authors" writes the layout the authors' code loads.

    Ours record the backbone by identity (name, SHA-256, architecture; never a path), so
    the file loads on any machine that has the same weights anywhere.
    """
    prompt_state = {
        k: v.detach().float().cpu() for k, v in model.prompt_learner.state_dict().items()
    }
    if layout == "authors":
        state = model.prompt_learner.authors_state_dict()
        data: dict[str, Any] = {"prompt_learner": {k: v.float().cpu() for k, v in state.items()}}
    else:
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "prompt_learner": prompt_state,
            "backbone": model.backbone.to_dict(),
            "extra": extra or {},
        }
    atomic_torch_save(data, path)
    return Path(path)

"""The one way to build an AnomalyCLIP model, as open_clip's ``create_model`` and timm's
``build_model_with_cfg`` are for theirs.

Every command and the Python API come here with (checkpoint, weights, preset, overrides,
device, dtype). The order of precedence is fixed: the checkpoint's own configuration (or,
for the authors' files, the settings published with them and the shapes of their
tensors), then the preset, then explicit overrides. The backbone is found by identity,
never by a machine path: the weights given, else the recorded name through the registry
and the cache, else the recorded checksum through the registry; a file whose checksum or
architecture differs from what the checkpoint records is refused, saying what differs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from anomalyclip.backbone.clip import CLIP
from anomalyclip.backbone.identity import BackboneIdentity, display_name, looks_like_path
from anomalyclip.baselines import LAST_LAYER, Preset, get_preset
from anomalyclip.checkpoint import PromptCheckpoint, apply_prompt_state, config_for, read_checkpoint
from anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.model import AnomalyCLIP

logger = logging.getLogger(__name__)

NO_CHECKPOINT = "none"


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
) -> AnomalyCLIP:
    """Backbone, prompts and configuration in one call.

    ``checkpoint``: a registered name ("mvtec"), a file of ours or the authors', an
    already read :class:`PromptCheckpoint`, or None / "none" for fresh prompts (seeded
    with ``seed``, so runs repeat) or hand-written ones (baseline presets).
    ``clip_weights``: a registered backbone name, a file/folder, or a CLIP already in
    memory; default: the backbone the checkpoint records. ``config``: the starting
    configuration when there is no checkpoint (default: the paper's). ``overrides``:
    configuration fields; None values mean "not given" and are ignored. ``preset``: a row
    of the paper's tables (:mod:`anomalyclip.baselines`).
    """
    from anomalyclip.hub import lookup_checkpoint

    prompts = _read_prompts(checkpoint)
    config = config or AnomalyCLIPConfig()
    if prompts is not None:
        info = lookup_checkpoint(str(checkpoint)) if isinstance(checkpoint, str) else None
        if info is not None and prompts.config is None:
            config = AnomalyCLIPConfig.from_dict({**config.to_dict(), **info.config})
        config = config_for(prompts, config)
    changes: dict[str, Any] = {}
    if preset is not None:
        changes.update((get_preset(preset) if isinstance(preset, str) else preset).config)
    changes.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if isinstance(clip_weights, CLIP):
        clip, identity = clip_weights, BackboneIdentity(config.backbone)
    else:
        from anomalyclip.backbone.loading import load_clip

        recorded = _recorded_identity(prompts, config)
        path, identity = _resolve_backbone(recorded, clip_weights, prompts)
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


def load_backbone(
    clip_weights: str | Path | CLIP | None,
    default: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[CLIP, BackboneIdentity]:
    """A backbone alone, for methods with no checkpoint (MuSc): the one resolution path.

    ``clip_weights`` as :func:`create_model` takes it; None means the registered
    ``default``. The identity (name, SHA-256, architecture) is what results record, so a
    set scored later can be traced to the very weights, as a checkpoint's can.
    """
    if isinstance(clip_weights, CLIP):
        clip, identity = clip_weights, BackboneIdentity(default)
    else:
        from anomalyclip.backbone.loading import load_clip

        path, identity = _resolve_backbone(BackboneIdentity(default), clip_weights, None)
        clip = load_clip(path, device=device, dtype=dtype)
    clip = clip.to(device=device, dtype=dtype) if dtype is not None else clip.to(device)
    return clip.eval(), BackboneIdentity(identity.name, identity.sha256, clip.arch.to_dict())


def _read_prompts(checkpoint: str | Path | PromptCheckpoint | None) -> PromptCheckpoint | None:
    from anomalyclip.hub import resolve_checkpoint

    if checkpoint is None or isinstance(checkpoint, PromptCheckpoint):
        return checkpoint
    if str(checkpoint).lower() == NO_CHECKPOINT:
        return None
    path, _ = resolve_checkpoint(checkpoint)
    return read_checkpoint(path)


def _recorded_identity(
    prompts: PromptCheckpoint | None, config: AnomalyCLIPConfig
) -> BackboneIdentity:
    """What the checkpoint says its backbone is (the configuration's name otherwise)."""
    if prompts is not None and prompts.backbone:
        recorded = BackboneIdentity.from_dict(prompts.backbone)
        return dataclasses.replace(recorded, name=recorded.name or config.backbone)
    return BackboneIdentity(config.backbone)


def _resolve_backbone(
    recorded: BackboneIdentity,
    clip_weights: str | Path | None,
    prompts: PromptCheckpoint | None,
) -> tuple[Path, BackboneIdentity]:
    """The weights file to load and the identity it will be recorded under."""
    from anomalyclip.hub import backbone_sha256, known_backbones, lookup_backbone, resolve_backbone

    if clip_weights is not None:
        path = resolve_backbone(clip_weights)
        entry = lookup_backbone(str(clip_weights))
        name = entry.name if entry is not None else display_name(str(clip_weights))
        return path, BackboneIdentity(name, backbone_sha256(path))
    where = f"{prompts.path} records" if prompts is not None else "the configuration names"
    if looks_like_path(recorded.name):
        old = Path(recorded.name).expanduser()
        logger.warning(
            "%s its backbone as a machine path (%s), as versions before 0.2 did; "
            "re-save it to record the backbone by name and checksum",
            where,
            old,
        )
        if old.exists():
            return old, BackboneIdentity(old.name, backbone_sha256(old))
    entry = lookup_backbone(recorded.name)
    if entry is None and recorded.sha256:
        entry = next((e for e in known_backbones().values() if e.sha256 == recorded.sha256), None)
    if entry is None:
        checksum = f", sha256 {recorded.sha256}" if recorded.sha256 else ""
        raise FileNotFoundError(
            f"{where} the backbone {display_name(recorded.name)!r}{checksum}, which is not a "
            f"registered name ({', '.join(known_backbones())}); pass its weights file with "
            "--clip-weights (Python: clip_weights=...)"
        )
    return resolve_backbone(entry.name), BackboneIdentity(entry.name, entry.sha256)

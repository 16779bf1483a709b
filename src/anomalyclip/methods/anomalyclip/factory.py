"""What an AnomalyCLIP model is built from: its prompts, its configuration, its backbone.

:func:`~anomalyclip.methods.anomalyclip.model.create_model` (the one way to build the
model, as open_clip's ``create_model`` and timm's ``build_model_with_cfg`` are for
theirs) resolves its ingredients here, from (checkpoint, weights, preset, overrides).
The order of precedence is fixed: the checkpoint's own configuration (or,
for the authors' files, the settings published with them and the shapes of their
tensors), then the preset, then explicit overrides. The backbone is found by identity,
never by a machine path: the weights given, else the recorded name through the registry
and the cache, else the recorded checksum through the registry; a file whose checksum or
architecture differs from what the checkpoint records is refused, saying what differs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from anomalyclip.backbone.clip import CLIP
from anomalyclip.backbone.identity import BackboneIdentity, display_name, looks_like_path
from anomalyclip.hub.entries import CheckpointInfo
from anomalyclip.methods.anomalyclip.checkpoint import (
    PromptCheckpoint,
    read_checkpoint,
)
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig

logger = logging.getLogger(__name__)

NO_CHECKPOINT = "none"


def registry_entry(checkpoint: Any) -> CheckpointInfo | None:
    """The registry entry ``checkpoint`` names, its configuration fields checked first
    (before any file is read), so a typing mistake is named where it was written."""
    from anomalyclip.hub import lookup_checkpoint

    info = lookup_checkpoint(checkpoint) if isinstance(checkpoint, str) else None
    if info is None:
        return None
    known_fields = {f.name for f in dataclasses.fields(AnomalyCLIPConfig)}
    unknown = sorted(set(info.config) - known_fields)
    if unknown:
        raise ValueError(
            f"{info.where}: entry {info.name!r}: unknown config keys {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known_fields))}"
        )
    return info


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

        path, identity = resolve_backbone_file(BackboneIdentity(default), clip_weights, None)
        clip = load_clip(path, device=device, dtype=dtype)
    clip = clip.to(device=device, dtype=dtype) if dtype is not None else clip.to(device)
    return clip.eval(), BackboneIdentity(identity.name, identity.sha256, clip.arch.to_dict())


def read_prompts(checkpoint: str | Path | PromptCheckpoint | None) -> PromptCheckpoint | None:
    from anomalyclip.hub import resolve_checkpoint

    if checkpoint is None or isinstance(checkpoint, PromptCheckpoint):
        return checkpoint
    if str(checkpoint).lower() == NO_CHECKPOINT:
        return None
    path, _ = resolve_checkpoint(checkpoint)
    return read_checkpoint(path)


def recorded_identity(
    prompts: PromptCheckpoint | None, config: AnomalyCLIPConfig
) -> BackboneIdentity:
    """What the checkpoint says its backbone is (the configuration's name otherwise)."""
    if prompts is not None and prompts.backbone:
        recorded = BackboneIdentity.from_dict(prompts.backbone)
        return dataclasses.replace(recorded, name=recorded.name or config.backbone)
    return BackboneIdentity(config.backbone)


def resolve_backbone_file(
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

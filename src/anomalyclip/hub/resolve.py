"""Names to files and files to names: what the rest of the package asks of the hub.

A name resolves to a verified cached file, downloaded when needed; an existing path is
taken as it is, so every option that accepts a registered name accepts a file too. The
other way round, a file is recognised as a registered backbone by its SHA-256.
"""

from __future__ import annotations

import os
from pathlib import Path

from anomalyclip.hub.cache import is_verified
from anomalyclip.hub.entries import CheckpointInfo
from anomalyclip.hub.registry import (
    known_backbones,
    known_checkpoints,
    lookup_backbone,
    lookup_checkpoint,
)
from anomalyclip.hub.settings import user_registry_path
from anomalyclip.hub.transfer import fetch
from anomalyclip.utils.hashing import file_digest


def resolve_backbone(name_or_path: str | os.PathLike) -> Path:
    """An existing file or folder as is; a registered backbone from the cache or the web."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    entry = lookup_backbone(str(name_or_path))
    if entry is None:
        raise FileNotFoundError(
            f"backbone weights {str(name_or_path)!r}: no such file, and not a registered backbone "
            f"({', '.join(known_backbones())})"
        )
    return fetch(entry)


def resolve_checkpoint(name_or_path: str | os.PathLike) -> tuple[Path, CheckpointInfo | None]:
    """A prompt checkpoint file, and its registry entry when it was given by name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, None
    info = lookup_checkpoint(str(name_or_path))
    if info is None:
        raise FileNotFoundError(
            f"prompt checkpoint {str(name_or_path)!r}: no such file, and not a registered "
            f"name ({', '.join(known_checkpoints())}; add your own in {user_registry_path()})"
        )
    if info.path is not None and Path(info.path).is_file():
        return Path(info.path), info
    if info.file is not None:
        return fetch(info.file), info
    raise FileNotFoundError(
        f"checkpoint {info.name!r} (registry file {user_registry_path()}) points at "
        f"{info.path}, which does not exist"
    )


def download(name: str, progress: bool = True) -> Path:
    """Fetch a registered checkpoint or backbone into the cache (for air-gapped machines)."""
    checkpoint = lookup_checkpoint(name)
    if checkpoint is not None:
        if checkpoint.file is None:
            return resolve_checkpoint(name)[0]
        return fetch(checkpoint.file, progress)
    backbone = lookup_backbone(name)
    if backbone is None:
        raise ValueError(
            f"unknown name {name!r}; backbones: {', '.join(known_backbones())}; "
            f"checkpoints: {', '.join(known_checkpoints())}"
        )
    return fetch(backbone, progress)


def registered_sha256_for(path: str | os.PathLike) -> str | None:
    """The name of the registered backbone whose SHA-256 this file has, else None.

    A cached copy is recognised as :func:`~anomalyclip.hub.cache.is_verified` checks it
    (without hashing it again when it is a data-only file unchanged since its last check).
    """
    path = Path(path)
    backbones = known_backbones()
    for name, entry in backbones.items():
        cached = entry.cache_path()
        if cached.is_file() and path.resolve() == cached.resolve() and is_verified(entry, cached):
            return name
    digest = file_digest(path)
    return next((name for name, entry in backbones.items() if entry.known_sha256 == digest), None)


def is_registered_file(path: str | os.PathLike) -> bool:
    """Whether a file's SHA-256 is that of a registered backbone."""
    return registered_sha256_for(path) is not None


def backbone_sha256(name_or_path: str | os.PathLike) -> str | None:
    """The SHA-256 that identifies a backbone in a checkpoint: registered, or of its file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return file_digest(path)
    if path.exists():
        return None  # a folder (Hugging Face layout) has no single checksum
    entry = lookup_backbone(str(name_or_path))
    return entry.known_sha256 if entry is not None else None

"""Named weights: a registry with addresses and checksums, a verified cache, resumable downloads.

Registered names stand for files with their addresses and checksums: OpenAI's CLIP
archives (the SHA-256 is part of OpenAI's address), the AnomalyCLIP authors' prompt
checkpoints (git blob ids, pinned to one commit) and Meta's DINOv2 weights (no checksum
published: the SHA-256 of the first copy is recorded, and a later change refused). A
team adds its own names in a registry file. The network is reached only by
:func:`fetch`, and only at the addresses held by registry entries, so tests register
entries pointing at a local server. With ``ANOMALYCLIP_OFFLINE=1`` nothing is fetched; a
missing file then raises
:class:`OfflineError` saying what to fetch and where to put it.

The rooms, each importing only those listed before it: ``settings`` (the environment),
``entries`` (what an entry is), ``registry`` (which names exist), ``cache`` (verified
copies), ``transfer`` (downloads) and ``resolve`` (names to files and back). Import from
here; patch a module's own attribute (``anomalyclip.hub.transfer.RETRY_DELAY_S``).
"""

from anomalyclip.hub.cache import CacheEntry, is_verified, list_cached
from anomalyclip.hub.entries import CheckpointInfo, RemoteFile
from anomalyclip.hub.registry import (
    AUTHORS_COMMIT,
    AUTHORS_RAW,
    AUTHORS_REPOSITORY,
    AUTHORS_SETTINGS,
    BACKBONES,
    CHECKPOINTS,
    DEFAULT_BACKBONE,
    DEFAULT_CHECKPOINT,
    DINOV2_BACKBONES,
    OPENAI_HOSTS,
    is_dinov2_name,
    known_backbones,
    known_checkpoints,
    lookup_backbone,
    lookup_checkpoint,
    user_registry,
)
from anomalyclip.hub.resolve import (
    backbone_sha256,
    download,
    is_registered_file,
    registered_sha256_for,
    resolve_backbone,
    resolve_checkpoint,
)
from anomalyclip.hub.settings import cache_dir, offline, user_registry_path
from anomalyclip.hub.transfer import ATTEMPTS, DownloadError, OfflineError, fetch, offline_message

__all__ = [
    "ATTEMPTS",
    "AUTHORS_COMMIT",
    "AUTHORS_RAW",
    "AUTHORS_REPOSITORY",
    "AUTHORS_SETTINGS",
    "BACKBONES",
    "CHECKPOINTS",
    "DEFAULT_BACKBONE",
    "DEFAULT_CHECKPOINT",
    "DINOV2_BACKBONES",
    "OPENAI_HOSTS",
    "CacheEntry",
    "CheckpointInfo",
    "DownloadError",
    "OfflineError",
    "RemoteFile",
    "backbone_sha256",
    "cache_dir",
    "download",
    "fetch",
    "is_dinov2_name",
    "is_registered_file",
    "is_verified",
    "known_backbones",
    "known_checkpoints",
    "list_cached",
    "lookup_backbone",
    "lookup_checkpoint",
    "offline",
    "offline_message",
    "registered_sha256_for",
    "resolve_backbone",
    "resolve_checkpoint",
    "user_registry",
    "user_registry_path",
]

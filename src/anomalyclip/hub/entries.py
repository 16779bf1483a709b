"""What a registry entry is: a downloadable file with its checksum, and a named checkpoint.

Entries are checked when made, so a typing mistake in a team's registry file is reported
where it was written rather than as a failed download later.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalyclip.hub.settings import cache_dir
from anomalyclip.utils.hashing import file_digest

SHA256_RE = re.compile(r"[0-9a-f]{64}")
GIT_BLOB_RE = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file and its checksum: SHA-256, or git's blob id for files in git."""

    name: str
    url: str
    filename: str
    sha256: str | None = None
    git_blob: str | None = None
    mirrors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.sha256) == bool(self.git_blob):
            raise ValueError(f"{self.name}: give exactly one checksum, sha256 or git_blob")
        digest = (self.sha256 or self.git_blob or "").lower()
        pattern = SHA256_RE if self.sha256 else GIT_BLOB_RE
        if not pattern.fullmatch(digest):
            kind = "sha256 (64 hex digits)" if self.sha256 else "git_blob (40 hex digits)"
            raise ValueError(f"{self.name}: {digest!r} is not a {kind}")
        object.__setattr__(self, "sha256" if self.sha256 else "git_blob", digest)
        if Path(self.filename).name != self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"{self.name}: file name {self.filename!r} must be a plain name")
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        for url in self.urls:
            if urllib.parse.urlparse(url).scheme not in ("http", "https", "file"):
                raise ValueError(f"{self.name}: {url!r} is not an http(s) or file address")

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.mirrors)

    @property
    def digest(self) -> str:
        return self.sha256 or self.git_blob or ""

    @property
    def checksum(self) -> str:
        return f"sha256:{self.sha256}" if self.sha256 else f"git-blob:{self.git_blob}"

    def cache_path(self) -> Path:
        """Where this file lives in the cache: content-addressed, the same on every machine."""
        return cache_dir() / self.digest[:16] / self.filename

    def digest_of(self, path: str | Path) -> str:
        return file_digest(path, "sha256" if self.sha256 else "git-blob")

    def matches(self, path: str | Path) -> bool:
        return self.digest_of(path) == self.digest


@dataclass(frozen=True)
class CheckpointInfo:
    """A named prompt checkpoint, the backbone it belongs to and the settings published with it.

    ``config`` holds configuration field overrides of the method the checkpoint belongs
    to; they apply to checkpoints in the authors' layout, which carry no configuration of
    their own, and the method checks their names when it uses them (the hub knows no
    method). A name is either downloadable (``file``) or a local file (``path``);
    ``where`` says where it was defined, for messages.
    """

    name: str
    file: RemoteFile | None
    backbone: str
    config: dict[str, Any] = field(default_factory=dict)
    trained_on: str = ""
    note: str = ""
    path: str | None = None
    where: str = "the built-in registry"

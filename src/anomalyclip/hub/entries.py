"""What a registry entry is: a downloadable file with its checksum, and a named checkpoint.

Entries are checked when made, so a typing mistake in a team's registry file is reported
where it was written rather than as a failed download later. A file whose publisher gives
no checksum (DINOv2's ``.pth`` files) is registered ``trust_on_first_use``: the SHA-256
of the first copy is recorded in the cache beside it (:meth:`RemoteFile.recorded_path`)
and every later copy must match it.
"""

from __future__ import annotations

import hashlib
import json
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
    """One downloadable file and its checksum: SHA-256, or git's blob id for files in git,
    or (``trust_on_first_use``, where none is published) the SHA-256 of its first copy."""

    name: str
    url: str
    filename: str
    sha256: str | None = None
    git_blob: str | None = None
    mirrors: tuple[str, ...] = ()
    trust_on_first_use: bool = False

    def __post_init__(self) -> None:
        if self.trust_on_first_use:
            if self.sha256 or self.git_blob:
                raise ValueError(f"{self.name}: trust_on_first_use takes no published checksum")
            self._check_addresses()
            return
        if bool(self.sha256) == bool(self.git_blob):
            raise ValueError(f"{self.name}: give exactly one checksum, sha256 or git_blob")
        digest = (self.sha256 or self.git_blob or "").lower()
        pattern = SHA256_RE if self.sha256 else GIT_BLOB_RE
        if not pattern.fullmatch(digest):
            kind = "sha256 (64 hex digits)" if self.sha256 else "git_blob (40 hex digits)"
            raise ValueError(f"{self.name}: {digest!r} is not a {kind}")
        object.__setattr__(self, "sha256" if self.sha256 else "git_blob", digest)
        self._check_addresses()

    def _check_addresses(self) -> None:
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
        """The digest a copy must have; for trust on first use the recorded one ("" before
        the first copy)."""
        if self.trust_on_first_use:
            return self.recorded_sha256() or ""
        return self.sha256 or self.git_blob or ""

    @property
    def known_sha256(self) -> str | None:
        """The SHA-256 this file is known by: published, or recorded at first use."""
        return self.recorded_sha256() if self.trust_on_first_use else self.sha256

    @property
    def checksum(self) -> str:
        if self.trust_on_first_use:
            recorded = self.recorded_sha256()
            if recorded is None:
                return "sha256 not published (recorded at first download)"
            return f"sha256:{recorded}"
        return f"sha256:{self.sha256}" if self.sha256 else f"git-blob:{self.git_blob}"

    def cache_path(self) -> Path:
        """Where this file lives in the cache, the same on every machine: by its published
        checksum, or (trust on first use) by its address, as its content is not known yet."""
        if self.trust_on_first_use:
            folder = hashlib.sha256(self.url.encode()).hexdigest()[:16]
            return cache_dir() / folder / self.filename
        return cache_dir() / self.digest[:16] / self.filename

    def recorded_path(self) -> Path:
        """Where the SHA-256 of a trust-on-first-use file's first copy is recorded."""
        path = self.cache_path()
        return path.with_name(path.name + ".sha256")

    def recorded_sha256(self) -> str | None:
        """The SHA-256 recorded at first use, None before it. A damaged record is refused
        (ValueError naming it) rather than taken for none: that would trust anything."""
        path = self.recorded_path()
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            record = None
        digest = record.get("sha256") if isinstance(record, dict) else None
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            raise ValueError(
                f"{path}: not a record of {self.name}'s SHA-256 (damaged?); delete it to "
                "trust the next copy"
            )
        return digest

    def digest_of(self, path: str | Path) -> str:
        return file_digest(path, "git-blob" if self.git_blob else "sha256")

    def matches(self, path: str | Path) -> bool:
        """Whether ``path`` has the registered content; a trust-on-first-use file with no
        record yet matches (its first copy is what gets recorded)."""
        expected = self.digest
        if self.trust_on_first_use and not expected:
            return True
        return self.digest_of(path) == expected


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

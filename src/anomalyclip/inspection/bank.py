"""Banks of known-good images that grow on the line, and the audit log of who taught them.

A bank is the list of images a method compares new ones against (its reference mode).
On the line it rolls: the last ``window`` images judged normal, the oldest leaving
first. Its identity is its content: :func:`bank_id` is a digest of the members' SHA-256,
so the same images give the same id whatever their names or order, and every version a
bank had is kept by id, so an operator's change can be undone by naming the version to
go back to.

Every change an operator makes is appended to an :class:`AuditLog` (JSON Lines: time,
image SHA-256, verdict, bank id and thresholds before and after). One line is one
``write`` on a file opened for appending, under a thread lock and an ``flock``, so marks
from several clients (threads or processes) never interleave or lose a line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalyclip.preprocess import ImageSource
from anomalyclip.utils.atomic import atomic_write_json

__all__ = [
    "AuditLog",
    "BankMember",
    "ImageBank",
    "bank_id",
    "image_sha256",
    "load_bank_file",
    "save_bank_file",
]

EMPTY_BANK = "empty"
BANK_FILE_FORMAT = "anomalyclip-image-bank"


def image_sha256(source: ImageSource) -> str:
    """The SHA-256 of an image file's bytes (or of uploaded bytes)."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    if isinstance(source, (str, Path)):
        digest = hashlib.sha256()
        with open(source, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    raise TypeError("a bank member is a file or its bytes, so that its content has a digest")


def bank_id(digests: Iterable[str]) -> str:
    """The identity of a bank by content: order and names do not count, images do."""
    ordered = sorted(digests)
    if not ordered:
        return EMPTY_BANK
    return hashlib.sha256("\n".join(ordered).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BankMember:
    """One known-good image: its content digest, where it is (a path, or its bytes for
    uploads), and the name people know it by."""

    sha256: str
    source: ImageSource
    name: str


@dataclass
class ImageBank:
    """The images judged normal, at most ``window`` (the oldest leave first), and every
    version the bank had, by id."""

    window: int | None = None
    members: list[BankMember] = field(default_factory=list)
    versions: dict[str, list[BankMember]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"a bank's window must be at least 1, got {self.window}")
        self.versions.setdefault(self.id, list(self.members))

    @property
    def id(self) -> str:
        return bank_id(member.sha256 for member in self.members)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def sources(self) -> list[ImageSource]:
        return [member.source for member in self.members]

    def __contains__(self, sha256: object) -> bool:
        return any(member.sha256 == sha256 for member in self.members)

    def add(self, member: BankMember) -> str:
        """``member`` joins (a copy already in is moved to the newest place); the new id."""
        kept = [m for m in self.members if m.sha256 != member.sha256]
        kept.append(member)
        if self.window is not None:
            kept = kept[-self.window :]
        return self._become(kept)

    def remove(self, sha256: str) -> str:
        """The member with this digest leaves; the new id (unchanged when absent)."""
        return self._become([m for m in self.members if m.sha256 != sha256])

    def restore(self, version: str) -> str:
        """Go back to an earlier version, named by its id."""
        if version not in self.versions:
            known = ", ".join(self.versions) or "none"
            raise KeyError(f"no bank version {version!r} (known: {known})")
        return self._become(list(self.versions[version]))

    def _become(self, members: list[BankMember]) -> str:
        self.members = members
        self.versions.setdefault(self.id, list(members))
        return self.id

    def describe(self) -> dict[str, Any]:
        """What a person (``bank info``, ``GET /v1/streams/NAME``) sees of the bank."""
        return {
            "id": self.id,
            "size": self.size,
            "window": self.window,
            "members": [{"sha256": m.sha256, "name": m.name} for m in self.members],
            "versions": list(self.versions),
        }


def _member_record(member: BankMember) -> dict[str, str]:
    if not isinstance(member.source, (str, Path)):
        raise TypeError(f"{member.name}: only banks of files can be saved to a bank file")
    return {"sha256": member.sha256, "path": str(member.source), "name": member.name}


def save_bank_file(bank: ImageBank, path: Path) -> None:
    """The bank, its versions and their members' paths as one JSON file, atomically."""
    atomic_write_json(
        path,
        {
            "format": BANK_FILE_FORMAT,
            "window": bank.window,
            "current": bank.id,
            "versions": {
                version: [_member_record(m) for m in members]
                for version, members in bank.versions.items()
            },
        },
    )


def load_bank_file(path: Path) -> ImageBank:
    """A bank written by :func:`save_bank_file`; a missing file is a new, empty bank."""
    if not path.exists():
        return ImageBank()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != BANK_FILE_FORMAT:
            raise ValueError("not a bank file")
        versions = {
            version: [BankMember(m["sha256"], m["path"], m["name"]) for m in members]
            for version, members in data["versions"].items()
        }
        current = versions[data["current"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a bank file written by anomalyclip ({error})") from None
    return ImageBank(window=data.get("window"), members=list(current), versions=versions)


class AuditLog:
    """An append-only JSON Lines file of every change operators make to a bank.

    Each line is written by one ``os.write`` on a descriptor opened with ``O_APPEND``,
    under a thread lock and an exclusive ``flock``: concurrent writers, in threads or
    processes, each get a whole line of their own. ``path=None`` keeps the lines in
    memory only (a service started without an audit file).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._memory: list[dict[str, Any]] = []

    def append(
        self,
        *,
        sha256: str,
        verdict: str,
        bank_before: str,
        bank_after: str,
        thresholds_before: dict[str, float | None],
        thresholds_after: dict[str, float | None],
        **extra: Any,
    ) -> dict[str, Any]:
        """Write one line; the entry written."""
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "image_sha256": sha256,
            "verdict": verdict,
            "bank_before": bank_before,
            "bank_after": bank_after,
            "thresholds_before": thresholds_before,
            "thresholds_after": thresholds_after,
            **extra,
        }
        line = (json.dumps(entry, allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            if self.path is None:
                self._memory.append(entry)
                return entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                written = os.write(descriptor, line)
                if written != len(line):
                    raise OSError(f"{self.path}: the audit line was cut short (disk full?)")
                os.fsync(descriptor)
            finally:
                os.close(descriptor)  # closing releases the flock
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every whole line so far, oldest first."""
        if self.path is None:
            with self._lock:
                return list(self._memory)
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().splitlines(keepends=True)
        return [json.loads(line) for line in lines if line.endswith(b"\n") and line.strip()]


def members_for(paths: Sequence[Path]) -> list[BankMember]:
    """Bank members for image files, each named by its file name."""
    return [BankMember(image_sha256(path), str(path), path.name) for path in paths]

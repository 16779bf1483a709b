"""The cache of registered files: verification remembered beside each file, and a listing.

Files are content-addressed under :func:`~anomalyclip.hub.settings.cache_dir`. Hashing a
multi-GB file on every run would cost seconds, so a successful check is recorded in a
``.verified`` marker bound to the file's size, times, inode and device, which any change
to the file invalidates. Whoever can write the cache can write a marker too, so a marker
is believed only for data-only files (safetensors, weights-only pickles): a file whose
format could run code (a TorchScript archive, a pickle of other objects) is hashed at
every check, and ``verify=True`` (``anomalyclip info --verify``) hashes everything.

Files registered ``trust_on_first_use`` (no checksum published) get their SHA-256
recorded beside them at first use (:func:`record_first_use`); from then on they are
checked against that record like any other.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from anomalyclip.hub.entries import RemoteFile
from anomalyclip.hub.registry import known_backbones, known_checkpoints
from anomalyclip.hub.settings import cache_dir
from anomalyclip.utils.atomic import atomic_write_json
from anomalyclip.utils.pickle_scan import scan_file

logger = logging.getLogger(__name__)

# Files the cache keeps beside registered ones; never listed as unregistered files.
SIDECARS = frozenset({".verified", ".part", ".lock", ".tmp", ".sha256"})


@dataclass(frozen=True)
class CacheEntry:
    """A registered file and the state of its copy: ok, mismatch, partial, missing, local."""

    name: str
    kind: str
    path: Path
    status: str
    size: int | None
    checksum: str | None = None
    url: str | None = None


def _stamp(path: Path) -> dict[str, int]:
    """What changes when a file's content can have changed: ctime cannot be set back, and a
    file renamed over the cached one has another inode."""
    stat = path.stat()
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
        "device": stat.st_dev,
    }


def could_run_code(path: Path) -> bool:
    """Whether a file's format could run code when loaded by the usual tools: a TorchScript
    archive (``torch.jit.load`` compiles its code), or a pickle that imports more than
    ``torch.load(weights_only=True)`` allows or is built to hang it. Read, never loaded."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any("/code/" in name for name in archive.namelist()):
                    return True
    except (OSError, zipfile.BadZipFile):
        return True  # unreadable as a zip after looking like one: trust no marker
    scan = scan_file(path)
    return bool(scan.globals) or scan.problem is not None


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def remember_verified(file: RemoteFile, path: Path) -> None:
    """Record that ``path`` holds ``file`` as it is now, so the next run need not hash it."""
    try:
        atomic_write_json(_verified_marker(path), {"checksum": file.checksum, **_stamp(path)})
    except OSError as error:  # a read-only shared cache: verify again next time
        logger.debug("cannot record the verification of %s: %s", path, error)


def record_first_use(file: RemoteFile, path: Path) -> str:
    """Record the SHA-256 of the first copy of a file whose publisher gives no checksum,
    and say so: every later copy must match it (trust on first use)."""
    digest = file.digest_of(path)
    record = {
        "sha256": digest,
        "url": file.url,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        atomic_write_json(file.recorded_path(), record)
    except OSError as error:
        logger.warning(
            "cannot record the SHA-256 of %s (%s): it is checked against nothing", path, error
        )
        return digest
    logger.warning(
        "%s: no checksum is published; recorded the SHA-256 of this first copy, %s, in %s "
        "(trust on first use): a later copy that differs will be refused",
        file.name,
        digest,
        file.recorded_path(),
    )
    return digest


def is_verified(file: RemoteFile, path: Path, *, verify: bool = False) -> bool:
    """Whether ``path`` holds ``file``.

    A data-only file's result is remembered beside it, bound to its size, times and inode,
    so multi-GB files are hashed once rather than on every run; a file that could run
    code, or any file when ``verify`` is set, is hashed whatever the marker says. The
    first copy of a trust-on-first-use file is taken, and its SHA-256 recorded.
    """
    if not path.is_file():
        return False
    if file.trust_on_first_use and file.recorded_sha256() is None:
        record_first_use(file, path)
        remember_verified(file, path)
        return True
    if not verify and _marker_matches(file, path) and not could_run_code(path):
        return True
    if not file.matches(path):
        _forget_verified(path)
        return False
    remember_verified(file, path)
    return True


def _forget_verified(path: Path) -> None:
    """Remove a marker that vouches for content the file no longer has."""
    try:
        _verified_marker(path).unlink(missing_ok=True)
    except OSError as error:  # a read-only shared cache: the file is hashed again anyway
        logger.debug("cannot remove the marker of %s: %s", path, error)


def _marker_matches(file: RemoteFile, path: Path) -> bool:
    try:
        marker = json.loads(_verified_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker == {"checksum": file.checksum, **_stamp(path)})


def _registered_files() -> Iterable[tuple[str, RemoteFile]]:
    for entry in known_backbones().values():
        yield "backbone", entry
    for info in known_checkpoints().values():
        if info.file is not None:
            yield "checkpoint", info.file


def list_cached(*, verify: bool = False) -> list[CacheEntry]:
    """Every registered file, where it is (or would be) cached and the state of that copy,
    then files in the cache that no registered name claims. ``verify`` hashes every
    cached copy again, believing no marker."""
    entries = []
    claimed = set()
    for kind, file in _registered_files():
        path = file.cache_path()
        claimed.add(path)
        partial = path.with_name(path.name + ".part")
        if path.is_file():
            status = "ok" if is_verified(file, path, verify=verify) else "mismatch"
            size: int | None = path.stat().st_size
        elif partial.is_file():
            status, size = "partial", partial.stat().st_size
        else:
            status, size = "missing", None
        entries.append(CacheEntry(file.name, kind, path, status, size, file.checksum, file.url))
    for info in known_checkpoints().values():
        if info.path is not None:
            local = Path(info.path)
            status = "local" if local.is_file() else "missing"
            size = local.stat().st_size if local.is_file() else None
            entries.append(CacheEntry(info.name, "checkpoint", local, status, size))
    root = cache_dir()
    if root.is_dir():
        for path in sorted(root.glob("*/*")):
            if path.is_file() and path not in claimed and path.suffix not in SIDECARS:
                entries.append(
                    CacheEntry(path.name, "file", path, "unregistered", path.stat().st_size)
                )
    return entries

"""Downloads: the one place that reaches the network, and only at registered addresses.

:func:`fetch` returns a verified cached copy, downloading it when needed: it resumes
partial files (HTTP Range), retries passing failures with back-off over the file's
mirrors, lets one process at a time download a file (the ranks of a multi-GPU run), and
checks free space first. Tests register entries pointing at a local server. With
``ANOMALYCLIP_OFFLINE=1``, or with no connection at all, a missing file raises
:class:`OfflineError` saying what to fetch and where to put it.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from anomalyclip.hub.cache import is_verified, record_first_use, remember_verified
from anomalyclip.hub.entries import RemoteFile
from anomalyclip.hub.registry import AUTHORS_REPOSITORY, known_checkpoints, lookup_backbone
from anomalyclip.hub.settings import cache_dir, offline

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30.0
ATTEMPTS = 4
RETRY_DELAY_S = 1.0  # doubled after every failed round
RETRYABLE_HTTP = frozenset({408, 425, 429})


class DownloadError(RuntimeError):
    """A download failed, or its content did not match the registered checksum."""


class OfflineError(RuntimeError):
    """Registered files are not cached and cannot be fetched from here.

    ``files`` lists them; the message says where to get each and where to put it.
    """

    def __init__(self, files: list[RemoteFile], reason: str) -> None:
        self.files = files
        self.reason = reason
        super().__init__(offline_message(files, reason))

    def __reduce__(self) -> tuple[Any, ...]:
        return OfflineError, (self.files, self.reason)


class _Unreachable(Exception):
    """No connection to the host (offline, DNS, refused, connect timeout)."""


class _Refused(Exception):
    """The host answered with an error that retrying will not change (404, 403, ...)."""


class _Interrupted(Exception):
    """The transfer broke off or the host had a passing problem; resume later."""


def offline_message(files: list[RemoteFile], reason: str) -> str:
    """Which files to fetch, from where, and exactly where to put them."""
    names = " ".join(_shell_word(file.name) for file in files)
    lines = [
        f"{', '.join(file.name for file in files)}: not in the cache and cannot be "
        f"downloaded ({reason}).",
        f"On a machine with internet access run `anomalyclip download {names}` and copy "
        f"its cache folder to {cache_dir()} here (or set ANOMALYCLIP_CACHE to where it is), "
        "or fetch by hand:",
    ]
    for file in files:
        lines.append(f"  {file.name}: {file.url}")
        lines.extend(f"    or {mirror}" for mirror in file.mirrors)
        lines.append(f"    put it at {file.cache_path()}")
        lines.append(f"    checksum {file.checksum}")
    return "\n".join(lines)


def _shell_word(text: str) -> str:
    """The name quoted when needed, so the suggested command can be pasted as it is."""
    return text if re.fullmatch(r"[A-Za-z0-9@%+=:,./_-]+", text) else f"'{text}'"


def _user_agent() -> str:
    """Names the package and where it lives, so hosts can tell who fetches their files."""
    from anomalyclip import __version__

    return f"anomalyclip/{__version__} (+https://github.com/{AUTHORS_REPOSITORY})"


@contextlib.contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """One download of a file at a time across processes (ranks of a multi-GPU run)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent downloads stay rare there
        yield
        return
    with target.with_name(target.name + ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process downloading %s", target.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch(file: RemoteFile, progress: bool = True, attempts: int = ATTEMPTS) -> Path:
    """The verified cached copy of ``file``, downloaded (resuming a partial one) if needed.

    A download that does not match the checksum is deleted and fetched again, up to
    ``attempts`` rounds over the file's addresses; then :class:`DownloadError`. No
    connection at all, or ``ANOMALYCLIP_OFFLINE``, raises :class:`OfflineError`.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    target = file.cache_path()
    if is_verified(file, target):
        return target
    if offline():
        raise _offline_error(file, target, "ANOMALYCLIP_OFFLINE is set")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target):
        if is_verified(file, target):  # another process has just fetched it
            return target
        if target.exists():
            logger.warning("%s does not match %s; fetching it again", target, file.checksum)
            target.unlink()
        return _download_verified(file, target, progress, attempts)


def _offline_error(file: RemoteFile, target: Path, reason: str) -> OfflineError:
    """Says too when a copy is there but damaged: copying it again by hand will not help."""
    if target.exists():
        reason += f"; the copy at {target} does not match its checksum"
    return OfflineError([file, *_companions(file)], reason)


def _companions(file: RemoteFile) -> list[RemoteFile]:
    """The backbone a named checkpoint needs, when that is missing too (one message for both)."""
    info = next((c for c in known_checkpoints().values() if c.file == file), None)
    backbone = lookup_backbone(info.backbone) if info is not None else None
    if backbone is None or is_verified(backbone, backbone.cache_path()):
        return []
    return [backbone]


def _download_verified(file: RemoteFile, target: Path, progress: bool, attempts: int) -> Path:
    """Rounds over the file's addresses until one gives the registered content.

    An address that refused (404, 403) is not asked again; when no address could be
    reached at all the machine is taken to be offline, which retrying will not change.
    """
    partial = target.with_name(target.name + ".part")
    errors: list[str] = []
    refused: set[str] = set()
    for attempt in range(1, attempts + 1):
        reached = False
        for url in file.urls:
            if url in refused:
                continue
            try:
                _stream(url, partial, progress, file.name)
            except _Unreachable as error:
                errors.append(f"{url}: {error}")
                continue
            except _Refused as error:
                reached = True
                refused.add(url)
                errors.append(f"{url}: {error}")
                continue
            except _Interrupted as error:
                reached = True
                errors.append(f"{url}: {error}")
                logger.warning("%s: %s (attempt %d of %d)", file.name, error, attempt, attempts)
                continue
            reached = True
            if file.matches(partial):
                os.replace(partial, target)
                if file.trust_on_first_use and file.recorded_sha256() is None:
                    record_first_use(file, target)
                remember_verified(file, target)
                logger.info("downloaded %s to %s", file.name, target)
                return target
            problem = _mismatch_detail(file, partial)
            errors.append(f"{url}: {problem}")
            logger.warning("%s: %s (attempt %d of %d)", file.name, problem, attempt, attempts)
            partial.unlink(missing_ok=True)
        if not reached and not refused:
            reason = "no connection: " + "; ".join(errors[-len(file.urls) :])
            raise _offline_error(file, target, reason)
        if len(refused) == len(file.urls):
            break
        if attempt < attempts:
            time.sleep(RETRY_DELAY_S * 2 ** (attempt - 1))
    raise DownloadError(
        f"could not download {file.name} ({file.checksum}):\n  " + "\n  ".join(errors[-6:])
    )


def _mismatch_detail(file: RemoteFile, partial: Path) -> str:
    """What the host sent instead: Git LFS pointers and login pages are the usual culprits."""
    with partial.open("rb") as handle:
        head = handle.read(64)
    detail = f"downloaded content does not match {file.checksum}"
    if file.trust_on_first_use:
        detail += (
            f", recorded at its first download in {file.recorded_path()}: the file at this "
            "address has changed since (delete that record to accept the new one)"
        )
    if head.startswith(b"version https://git-lfs"):
        return detail + " (the host sent a Git LFS pointer instead of the file)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return detail + " (the host sent a web page: a proxy or login page?)"
    return detail + f" ({partial.stat().st_size} bytes received)"


def _open(url: str, start: int) -> Any:
    """The one place that opens a connection. None: the range starts at or past the end."""
    request = urllib.request.Request(url, headers={"User-Agent": _user_agent()})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and start:
            return None
        if error.code >= 500 or error.code in RETRYABLE_HTTP:
            raise _Interrupted(f"HTTP {error.code} {error.reason}") from None
        raise _Refused(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise _Unreachable(str(error.reason)) from None
    except (OSError, http.client.HTTPException) as error:  # reached, then no answer
        raise _Interrupted(f"no answer: {error or type(error).__name__}") from None


def _stream(url: str, partial: Path, progress: bool, label: str) -> None:
    """Append to ``partial`` from where it stops (HTTP Range); restart if Range is ignored."""
    from tqdm.auto import tqdm

    start = partial.stat().st_size if partial.exists() else 0
    response = _open(url, start)
    if response is None:
        return  # the partial file may be complete: the checksum decides
    with response:
        if start and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-"):
                partial.unlink()
                raise _Interrupted(f"the host sent another range ({content_range!r})")
            logger.info("resuming %s at byte %d", label, start)
        elif start:
            logger.info("%s ignores resume requests; downloading %s again", url, label)
            start = 0
        length = response.headers.get("Content-Length", "")
        total = start + int(length) if length.isdigit() else None
        if total is not None:
            _check_free_space(partial.parent, total - start)
        with (
            partial.open("ab" if start else "wb") as out,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                disable=not progress,
            ) as bar,
        ):
            while chunk := _read(response):
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    received = partial.stat().st_size
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")


def _read(response: Any) -> bytes:
    """One chunk; a connection lost mid-transfer is a passing problem, resumed later."""
    try:
        return response.read(CHUNK)
    except (OSError, http.client.HTTPException) as error:
        raise _Interrupted(f"connection lost: {error or type(error).__name__}") from None


def _check_free_space(folder: Path, needed: int) -> None:
    """Refuse before downloading rather than fail, gigabytes later, with a full disk."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DownloadError(
            f"not enough disk space in {folder}: the download needs {needed / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB are free (set ANOMALYCLIP_CACHE to another folder)"
        )

"""Named weights: a registry with addresses and checksums, a verified cache, resumable downloads.

Registered names stand for files with their addresses and checksums: OpenAI's CLIP
archives (the SHA-256 is part of OpenAI's address) and the AnomalyCLIP authors' prompt
checkpoints (git blob ids, pinned to one commit). A team adds its own names in a registry
file. The network is reached only by :func:`fetch`, and only at the addresses held by
registry entries, so tests register entries pointing at a local server. With
``ANOMALYCLIP_OFFLINE=1`` nothing is fetched; a missing file then raises
:class:`OfflineError` saying what to fetch and where to put it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.utils.atomic import atomic_write_json

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30.0
ATTEMPTS = 4
RETRY_DELAY_S = 1.0  # doubled after every failed round
RETRYABLE_HTTP = frozenset({408, 425, 429})

DEFAULT_BACKBONE = "ViT-L/14@336px"
DEFAULT_CHECKPOINT = "mvtec"

# OpenAI's CDN address, then the storage account behind it (same path, same bytes): the
# CDN address has answered 404 for some users since 2025 (openai/CLIP issue #516).
OPENAI_HOSTS = (
    "https://openaipublic.azureedge.net/clip/models",
    "https://openaipublic.blob.core.windows.net/clip/models",
)
AUTHORS_REPOSITORY = "zqhang/AnomalyCLIP"
AUTHORS_COMMIT = "45ed4dd35c05797d854294b5e8d585c545920089"
AUTHORS_RAW = f"https://raw.githubusercontent.com/{AUTHORS_REPOSITORY}/{AUTHORS_COMMIT}"

SHA256_RE = re.compile(r"[0-9a-f]{64}")
GIT_BLOB_RE = re.compile(r"[0-9a-f]{40}")


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
        return sha256_file(path) if self.sha256 else git_blob_sha1_file(path)

    def matches(self, path: str | Path) -> bool:
        return self.digest_of(path) == self.digest


@dataclass(frozen=True)
class CheckpointInfo:
    """A named prompt checkpoint, the backbone it belongs to and the settings published with it.

    ``config`` holds :class:`~anomalyclip.config.AnomalyCLIPConfig` field overrides; they
    apply to checkpoints in the authors' layout, which carry no configuration of their own.
    A name is either downloadable (``file``) or a local file (``path``).
    """

    name: str
    file: RemoteFile | None
    backbone: str
    config: dict[str, Any] = field(default_factory=dict)
    trained_on: str = ""
    note: str = ""
    path: str | None = None


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


# The settings the authors published with both checkpoints: their test.sh at the pinned
# commit runs `--features_list 24 --image_size 518 --depth 9 --n_ctx 12 --t_n_ctx 4`, and
# test.py sets DPAM_layer=20 (DPAM on the last 19 layers), sigma 4. The paper's text until
# arXiv v9 names layers 6, 12, 18, 24; the first author confirmed that all published
# results use layer 24 alone (zqhang/AnomalyCLIP issue #82).
AUTHORS_SETTINGS: dict[str, Any] = {
    "backbone": DEFAULT_BACKBONE,
    "image_size": 518,
    "features": [24],
    "dpam_layers": 19,
    "dpam_mode": "vv",
    "global_head": "original",
    "prompt_mode": "agnostic",
    "n_ctx": 12,
    "prompt_depth": 9,
    "deep_prompt_length": 4,
    "sigma": 4.0,
}


def _openai(name: str, filename: str, sha256: str) -> RemoteFile:
    urls = [f"{host}/{sha256}/{filename}" for host in OPENAI_HOSTS]
    return RemoteFile(name, urls[0], filename, sha256=sha256, mirrors=tuple(urls[1:]))


# openai/CLIP clip/clip.py `_MODELS`; the SHA-256 is the second-to-last part of each address.
BACKBONES: dict[str, RemoteFile] = {
    entry.name: entry
    for entry in (
        _openai(
            "ViT-B/32",
            "ViT-B-32.pt",
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
        ),
        _openai(
            "ViT-B/16",
            "ViT-B-16.pt",
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        ),
        _openai(
            "ViT-L/14",
            "ViT-L-14.pt",
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        ),
        _openai(
            "ViT-L/14@336px",
            "ViT-L-14-336px.pt",
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        ),
    )
}

# The authors' folder names look swapped: their train.sh trains `9_12_4_multiscale` on
# VisA and `9_12_4_multiscale_visa` on MVTec AD (both on the datasets' test splits, as in
# the paper), and test.sh tests each on the other dataset.
CHECKPOINTS: dict[str, CheckpointInfo] = {
    "mvtec": CheckpointInfo(
        "mvtec",
        RemoteFile(
            "mvtec",
            f"{AUTHORS_RAW}/checkpoints/9_12_4_multiscale_visa/epoch_15.pth",
            "anomalyclip_mvtec_epoch_15.pth",
            git_blob="72adc786e031b49ea288ba5f815f0d38cf158708",
        ),
        DEFAULT_BACKBONE,
        dict(AUTHORS_SETTINGS),
        trained_on="MVTec AD",
        note="the authors' prompts for any product or domain other than MVTec AD; their "
        "folder 9_12_4_multiscale_visa, trained on MVTec AD by their train.sh",
    ),
    "visa": CheckpointInfo(
        "visa",
        RemoteFile(
            "visa",
            f"{AUTHORS_RAW}/checkpoints/9_12_4_multiscale/epoch_15.pth",
            "anomalyclip_visa_epoch_15.pth",
            git_blob="c90f1d9d92d158b436a8fc193f984d4cec8b1fc8",
        ),
        DEFAULT_BACKBONE,
        dict(AUTHORS_SETTINGS),
        trained_on="VisA",
        note="the authors' prompts for testing on MVTec AD; their folder 9_12_4_multiscale, "
        "trained on VisA by their train.sh",
    ),
}


# -- places -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """ANOMALYCLIP_CACHE, else $XDG_CACHE_HOME/anomalyclip, else ~/.cache/anomalyclip."""
    configured = os.environ.get("ANOMALYCLIP_CACHE")
    if configured:
        return Path(configured).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base).expanduser() / "anomalyclip").absolute()


def user_registry_path() -> Path:
    """ANOMALYCLIP_REGISTRY, else registry.json (or .toml) in $XDG_CONFIG_HOME/anomalyclip."""
    configured = os.environ.get("ANOMALYCLIP_REGISTRY")
    if configured:
        return Path(configured).expanduser().absolute()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "anomalyclip"
    toml_path = base / "registry.toml"
    json_path = base / "registry.json"
    return toml_path if toml_path.is_file() and not json_path.is_file() else json_path


def offline() -> bool:
    return os.environ.get("ANOMALYCLIP_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# -- checksums ------------------------------------------------------------------------------


def _hash_file(path: Path, digest: Any) -> str:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    return _hash_file(Path(path), hashlib.sha256())


def git_blob_sha1_file(path: str | Path) -> str:
    """Git's blob id: the SHA-1 of ``b"blob <size>\\0"`` followed by the content."""
    path = Path(path)
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"blob {path.stat().st_size}\0".encode())
    return _hash_file(path, digest)


def _stamp(path: Path) -> dict[str, int]:
    """What changes when a file's content can have changed (ctime cannot be set back)."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _remember_verified(file: RemoteFile, path: Path) -> None:
    try:
        atomic_write_json(_verified_marker(path), {"checksum": file.checksum, **_stamp(path)})
    except OSError as error:  # a read-only shared cache: verify again next time
        logger.debug("cannot record the verification of %s: %s", path, error)


def is_verified(file: RemoteFile, path: Path) -> bool:
    """Whether ``path`` holds ``file``; the result is remembered beside it, keyed by size
    and times, so multi-GB files are hashed once rather than on every run."""
    if not path.is_file():
        return False
    try:
        if json.loads(_verified_marker(path).read_text()) == {
            "checksum": file.checksum,
            **_stamp(path),
        }:
            return True
    except (OSError, ValueError):
        pass
    if not file.matches(path):
        return False
    _remember_verified(file, path)
    return True


_DIGEST_MEMO: dict[tuple[str, int, int, int], str] = {}


def _sha256_remembered(path: Path) -> str:
    """SHA-256 of a file, computed once per process for an unchanged file."""
    path = path.resolve()
    stamp = _stamp(path)
    key = (str(path), stamp["size"], stamp["mtime_ns"], stamp["ctime_ns"])
    if key not in _DIGEST_MEMO:
        _DIGEST_MEMO[key] = sha256_file(path)
    return _DIGEST_MEMO[key]


# -- the registry -----------------------------------------------------------------------------

ENTRY_KEYS = frozenset(
    {
        "kind",
        "path",
        "url",
        "mirrors",
        "sha256",
        "git_blob",
        "filename",
        "backbone",
        "config",
        "trained_on",
        "note",
    }
)


def _read_registry_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:
            raise ValueError(
                f"registry file {path}: TOML needs Python 3.11 or later; write it as JSON"
            ) from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"registry file {path} is not valid TOML: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"registry file {path} is not valid JSON: {error}") from None


def _remote_from_entry(name: str, entry: dict[str, Any], where: str) -> RemoteFile:
    if not (entry.get("sha256") or entry.get("git_blob")):
        raise ValueError(f"{where}: entry {name!r} has a url but needs a sha256 or git_blob")
    url = str(entry["url"])
    filename = entry.get("filename") or Path(urllib.parse.urlparse(url).path).name
    mirrors = entry.get("mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise ValueError(f"{where}: entry {name!r}: 'mirrors' must be a list of addresses")
    try:
        return RemoteFile(
            name,
            url,
            filename or f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.pth",
            entry.get("sha256"),
            entry.get("git_blob"),
            tuple(mirrors),
        )
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _checkpoint_from_entry(
    name: str, entry: dict[str, Any], folder: Path, where: str
) -> CheckpointInfo:
    config = entry.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{where}: entry {name!r}: 'config' must be an object")
    known_fields = {f.name for f in dataclasses.fields(AnomalyCLIPConfig)}
    unknown = sorted(set(config) - known_fields)
    if unknown:
        raise ValueError(
            f"{where}: entry {name!r}: unknown config keys {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known_fields))}"
        )
    config = dict(config)
    if entry.get("backbone"):
        config["backbone"] = str(entry["backbone"])
    local = None
    if entry.get("path"):
        local_path = Path(str(entry["path"])).expanduser()
        local = str(local_path if local_path.is_absolute() else folder / local_path)
    return CheckpointInfo(
        name,
        _remote_from_entry(name, entry, where) if "url" in entry else None,
        str(config.get("backbone", DEFAULT_BACKBONE)),
        config,
        str(entry.get("trained_on", "")),
        str(entry.get("note", "")),
        local,
    )


def user_registry() -> tuple[dict[str, RemoteFile], dict[str, CheckpointInfo]]:
    """A team's own names, from :func:`user_registry_path`.

    Each entry is ``{"path": ...}`` (relative to the registry file) or ``{"url": ...,
    "sha256" | "git_blob": ...}``, optionally with ``backbone``, ``config``, ``trained_on``
    and ``note``; ``"kind": "backbone"`` with a url and a sha256 names a CLIP archive. A
    name that is also built in replaces it (an in-house mirror, for example).
    """
    path = user_registry_path()
    if not path.is_file():
        return {}, {}
    entries = _read_registry_file(path)
    where = f"registry file {path}"
    if not isinstance(entries, dict):
        raise ValueError(f"{where} must hold an object of name -> entry")
    backbones: dict[str, RemoteFile] = {}
    checkpoints: dict[str, CheckpointInfo] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: entry {name!r} must be an object")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: entry {name!r} has unknown keys {', '.join(unknown)}; "
                f"known: {', '.join(sorted(ENTRY_KEYS))}"
            )
        kind = entry.get("kind", "checkpoint")
        if kind == "backbone":
            if "url" not in entry or not entry.get("sha256"):
                raise ValueError(f"{where}: backbone {name!r} needs a 'url' and a 'sha256'")
            backbones[name] = _remote_from_entry(name, entry, where)
        elif kind == "checkpoint":
            if not ({"path", "url"} & set(entry)):
                raise ValueError(f"{where}: entry {name!r} needs a 'path' or a 'url'")
            checkpoints[name] = _checkpoint_from_entry(name, entry, path.parent, where)
        else:
            raise ValueError(f"{where}: entry {name!r}: kind must be checkpoint or backbone")
    return backbones, checkpoints


def known_backbones() -> dict[str, RemoteFile]:
    return {**BACKBONES, **user_registry()[0]}


def known_checkpoints() -> dict[str, CheckpointInfo]:
    return {**CHECKPOINTS, **user_registry()[1]}


def _normalise(name: str) -> str:
    """One spelling for OpenAI's, open_clip's and file names: ViT-L/14@336px = ViT-L-14-336."""
    name = name.strip().lower().removesuffix(".pt")
    name = re.sub(r"[/_@]", "-", name)
    return name.removesuffix("px")


def lookup_backbone(name: str) -> RemoteFile | None:
    """The registered backbone of a name or alias (``ViT-L-14-336``, ``ViT-L-14-336px.pt``)."""
    backbones = known_backbones()
    if name in backbones:
        return backbones[name]
    wanted = _normalise(name)
    for key, entry in backbones.items():
        if wanted in (_normalise(key), _normalise(entry.filename)):
            return entry
    return None


def lookup_checkpoint(name: str) -> CheckpointInfo | None:
    checkpoints = known_checkpoints()
    if name in checkpoints:
        return checkpoints[name]
    folded = {key.lower(): info for key, info in checkpoints.items()}
    return folded.get(name.strip().lower())


# -- downloads -------------------------------------------------------------------------------


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
    return text if re.fullmatch(r"[A-Za-z0-9@%+=:,./_-]+", text) else f"'{text}'"


def _user_agent() -> str:
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
                _remember_verified(file, target)
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
    with partial.open("rb") as handle:
        head = handle.read(64)
    detail = f"downloaded content does not match {file.checksum}"
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
    try:
        return response.read(CHUNK)
    except (OSError, http.client.HTTPException) as error:
        raise _Interrupted(f"connection lost: {error or type(error).__name__}") from None


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DownloadError(
            f"not enough disk space in {folder}: the download needs {needed / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB are free (set ANOMALYCLIP_CACHE to another folder)"
        )


# -- names to files -----------------------------------------------------------------------------


def resolve_backbone(name_or_path: str | os.PathLike) -> Path:
    """An existing file or folder as is; a registered backbone from the cache or the web."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    entry = lookup_backbone(str(name_or_path))
    if entry is None:
        raise FileNotFoundError(
            f"CLIP weights {str(name_or_path)!r}: no such file, and not a registered backbone "
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

    TorchScript archives can run code when loaded; one is trusted when it is a registered
    file. A cached copy verified earlier is recognised without hashing it again.
    """
    path = Path(path)
    backbones = known_backbones()
    for name, entry in backbones.items():
        cached = entry.cache_path()
        if cached.is_file() and path.resolve() == cached.resolve() and is_verified(entry, cached):
            return name
    digest = _sha256_remembered(path)
    return next((name for name, entry in backbones.items() if entry.sha256 == digest), None)


def is_registered_file(path: str | os.PathLike) -> bool:
    """Whether a file's SHA-256 is that of a registered backbone (the TorchScript gate)."""
    return registered_sha256_for(path) is not None


def backbone_sha256(name_or_path: str | os.PathLike) -> str | None:
    """The SHA-256 that identifies a backbone in a checkpoint: registered, or of its file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _sha256_remembered(path)
    if path.exists():
        return None  # a folder (Hugging Face layout) has no single checksum
    entry = lookup_backbone(str(name_or_path))
    return entry.sha256 if entry is not None else None


# -- the cache, listed ------------------------------------------------------------------------


def _registered_files() -> Iterable[tuple[str, RemoteFile]]:
    for entry in known_backbones().values():
        yield "backbone", entry
    for info in known_checkpoints().values():
        if info.file is not None:
            yield "checkpoint", info.file


def list_cached() -> list[CacheEntry]:
    """Every registered file, where it is (or would be) cached and the state of that copy,
    then files in the cache that no registered name claims."""
    entries = []
    claimed = set()
    for kind, file in _registered_files():
        path = file.cache_path()
        claimed.add(path)
        partial = path.with_name(path.name + ".part")
        if path.is_file():
            status = "ok" if is_verified(file, path) else "mismatch"
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
            if path.is_file() and path not in claimed and path.suffix not in _SIDECARS:
                entries.append(
                    CacheEntry(path.name, "file", path, "unregistered", path.stat().st_size)
                )
    return entries


_SIDECARS = frozenset({".verified", ".part", ".lock", ".tmp"})

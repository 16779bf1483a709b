"""Named weights: a registry with addresses and checksums, a verified cache, resumable downloads.

Every network access goes through :func:`fetch`, whose addresses come from the registry
entries, so tests register entries pointing at a local server. With
``ANOMALYCLIP_OFFLINE=1`` nothing is fetched; a missing file then raises
:class:`OfflineError` saying what to fetch and where to put it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalyclip.utils.atomic import atomic_write_json

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
DEFAULT_BACKBONE = "ViT-L/14@336px"
DEFAULT_CHECKPOINT = "mvtec"
AUTHORS_COMMIT = "45ed4dd35c05797d854294b5e8d585c545920089"
AUTHORS_RAW = f"https://raw.githubusercontent.com/zqhang/AnomalyCLIP/{AUTHORS_COMMIT}"
OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"


class DownloadError(RuntimeError):
    """A download failed or its content did not match the registered checksum."""


class OfflineError(RuntimeError):
    """A named file is not cached and cannot be fetched here."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file and how to verify it (SHA-256 or git blob id)."""

    name: str
    url: str
    filename: str
    sha256: str | None = None
    git_blob: str | None = None

    @property
    def checksum(self) -> str:
        return f"sha256:{self.sha256}" if self.sha256 else f"git-blob:{self.git_blob}"

    def cache_path(self) -> Path:
        digest = self.sha256 or self.git_blob or "unverified"
        return cache_dir() / digest[:16] / self.filename

    def matches(self, path: Path) -> bool:
        if self.sha256:
            return sha256_file(path) == self.sha256
        if self.git_blob:
            return git_blob_sha1_file(path) == self.git_blob
        return True


@dataclass(frozen=True)
class CheckpointInfo:
    """A prompt checkpoint, the backbone it belongs to and the settings published with it."""

    name: str
    file: RemoteFile | None
    backbone: str
    config: dict[str, Any] = field(default_factory=dict)
    trained_on: str = ""
    note: str = ""
    path: str | None = None


PAPER_SETTINGS = {
    "backbone": DEFAULT_BACKBONE,
    "image_size": 518,
    "n_ctx": 12,
    "prompt_depth": 9,
    "deep_prompt_length": 4,
    "features": [6, 12, 18, 24],
    "dpam_layers": 19,
    "sigma": 4.0,
}

BACKBONES: dict[str, RemoteFile] = {
    name: RemoteFile(name, f"{OPENAI_BASE}/{sha}/{filename}", filename, sha256=sha)
    for name, filename, sha in (
        (
            "ViT-B/32",
            "ViT-B-32.pt",
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
        ),
        (
            "ViT-B/16",
            "ViT-B-16.pt",
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        ),
        (
            "ViT-L/14",
            "ViT-L-14.pt",
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        ),
        (
            "ViT-L/14@336px",
            "ViT-L-14-336px.pt",
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        ),
    )
}

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
        PAPER_SETTINGS,
        trained_on="MVTec AD (test split, as in the paper)",
        note="the authors' recommended starting point for other products and domains; "
        "their folder is named *_visa although train.sh trains it on MVTec AD",
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
        PAPER_SETTINGS,
        trained_on="VisA (test split), for zero-shot testing on MVTec AD",
        note="the authors' folder is named without _visa although train.sh trains it on VisA",
    ),
}


def cache_dir() -> Path:
    """ANOMALYCLIP_CACHE, else $XDG_CACHE_HOME/anomalyclip, else ~/.cache/anomalyclip."""
    if os.environ.get("ANOMALYCLIP_CACHE"):
        return Path(os.environ["ANOMALYCLIP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "anomalyclip"


def user_registry_path() -> Path:
    if os.environ.get("ANOMALYCLIP_REGISTRY"):
        return Path(os.environ["ANOMALYCLIP_REGISTRY"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "anomalyclip" / "registry.json"


def offline() -> bool:
    return os.environ.get("ANOMALYCLIP_OFFLINE", "").lower() in ("1", "true", "yes")


def _hash_file(path: Path, digest: Any) -> str:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    return _hash_file(Path(path), hashlib.sha256())


def git_blob_sha1_file(path: str | Path) -> str:
    """Git's blob id: SHA-1 of ``b"blob <size>\\0"`` followed by the content."""
    path = Path(path)
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"blob {path.stat().st_size}\0".encode())
    return _hash_file(path, digest)


def _normalise(name: str) -> str:
    return name.lower().replace("-", "/").replace("_", "/").replace(".pt", "")


def _lookup_backbone(name: str) -> RemoteFile | None:
    wanted = _normalise(name)
    for key, entry in BACKBONES.items():
        aliases = {_normalise(key), _normalise(entry.filename), _normalise(key.replace("@", "/"))}
        aliases.add(_normalise(key.replace("@", "-").replace("px", "")))
        if wanted in aliases or wanted.replace("@", "/") in aliases:
            return entry
    return None


def user_checkpoints() -> dict[str, CheckpointInfo]:
    """A team's shared names: ``{"name": {"path": ...}}`` or ``{"url", "sha256"|"git_blob"}``."""
    path = user_registry_path()
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"registry file {path} is not valid JSON: {error}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"registry file {path} must hold an object of name -> entry")
    result = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not ({"path", "url"} & set(entry)):
            raise ValueError(f"registry file {path}: entry {name!r} needs a 'path' or a 'url'")
        file = None
        if "url" in entry:
            if not (entry.get("sha256") or entry.get("git_blob")):
                raise ValueError(
                    f"registry file {path}: entry {name!r} needs a sha256 or git_blob checksum"
                )
            filename = entry.get("filename") or Path(entry["url"]).name or f"{name}.pth"
            file = RemoteFile(
                name, entry["url"], filename, entry.get("sha256"), entry.get("git_blob")
            )
        local = entry.get("path")
        if local and not Path(local).is_absolute():
            local = str(path.parent / local)
        result[name] = CheckpointInfo(
            name,
            file,
            entry.get("backbone", DEFAULT_BACKBONE),
            dict(entry.get("config", {})),
            entry.get("trained_on", ""),
            entry.get("note", ""),
            local,
        )
    return result


def known_checkpoints() -> dict[str, CheckpointInfo]:
    return {**CHECKPOINTS, **user_checkpoints()}


def known_backbones() -> dict[str, RemoteFile]:
    return dict(BACKBONES)


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def is_verified(file: RemoteFile, path: Path) -> bool:
    """Checks a cached file, remembering the result by size and mtime (no re-hashing GBs)."""
    if not path.is_file():
        return False
    stat = path.stat()
    stamp = {"checksum": file.checksum, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = _verified_marker(path)
    try:
        if json.loads(marker.read_text()) == stamp:
            return True
    except (OSError, ValueError):
        pass
    if not file.matches(path):
        return False
    atomic_write_json(marker, stamp)
    return True


def offline_message(file: RemoteFile, reason: str) -> str:
    target = file.cache_path()
    return (
        f"{file.name} is not in the cache and cannot be downloaded ({reason}). "
        f"Fetch {file.url} (checksum {file.checksum}) and put it at {target}, "
        f"or run `anomalyclip download {file.name}` on a machine that is online and copy "
        f"{cache_dir()} here (or set ANOMALYCLIP_CACHE to where it is)."
    )


def fetch(file: RemoteFile, progress: bool = True, retries: int = 3) -> Path:
    """The verified cached file, downloading (with resume) when it is missing."""
    target = file.cache_path()
    if is_verified(file, target):
        return target
    if target.exists():
        logger.warning("cached %s does not match %s; fetching it again", target, file.checksum)
        target.unlink()
    if offline():
        raise OfflineError(offline_message(file, "ANOMALYCLIP_OFFLINE is set"))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    last_error = ""
    for attempt in range(1, retries + 1):
        try:
            _download(file.url, partial, progress, label=file.name)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(error, urllib.error.HTTPError):
                last_error = f"HTTP {error.code} from {file.url}"
                continue
            raise OfflineError(offline_message(file, f"no connection: {reason}")) from None
        except OSError as error:
            last_error = str(error)
            continue
        if file.matches(partial):
            os.replace(partial, target)
            is_verified(file, target)
            logger.info("downloaded %s to %s", file.name, target)
            return target
        last_error = f"downloaded content does not match {file.checksum}"
        logger.warning("%s (attempt %d of %d)", last_error, attempt, retries)
        partial.unlink(missing_ok=True)
        time.sleep(0.1 * attempt)
    raise DownloadError(f"could not download {file.name} from {file.url}: {last_error}")


def _download(url: str, partial: Path, progress: bool, label: str) -> None:
    """Append to ``partial`` from where it stops (HTTP Range); restart if Range is ignored."""
    from tqdm.auto import tqdm

    start = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "anomalyclip"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    with urllib.request.urlopen(request, timeout=30) as response:
        if start and response.status != 206:
            start = 0
        total = response.headers.get("Content-Length")
        total = int(total) + start if total is not None else None
        mode = "ab" if start else "wb"
        with (
            partial.open(mode) as handle,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                desc=label,
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                handle.write(chunk)
                bar.update(len(chunk))
        if total is not None and partial.stat().st_size < total:
            raise OSError(f"connection closed after {partial.stat().st_size} of {total} bytes")


def resolve_backbone(name_or_path: str | Path) -> Path:
    """An existing file or folder as is; a registered backbone name from the cache or the web."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    entry = _lookup_backbone(str(name_or_path))
    if entry is None:
        known = ", ".join(BACKBONES)
        raise FileNotFoundError(
            f"CLIP weights {name_or_path!r}: no such file, and not a registered backbone ({known})"
        )
    return fetch(entry)


def resolve_checkpoint(name_or_path: str | Path) -> tuple[Path, CheckpointInfo | None]:
    """A prompt checkpoint file, and its registry entry when it was given by name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, None
    entries = known_checkpoints()
    info = entries.get(str(name_or_path))
    if info is None:
        raise FileNotFoundError(
            f"prompt checkpoint {name_or_path!r}: no such file, and not a registered name "
            f"({', '.join(entries)})"
        )
    if info.path:
        local = Path(info.path)
        if not local.is_file():
            raise FileNotFoundError(f"checkpoint {info.name!r} points at {local}, which is missing")
        return local, info
    return fetch(info.file), info


def is_registered_file(path: str | Path) -> bool:
    """Whether a file's SHA-256 is that of a registered backbone (TorchScript trust gate)."""
    digest = sha256_file(path)
    return any(entry.sha256 == digest for entry in BACKBONES.values())


@dataclass
class CacheEntry:
    name: str
    kind: str
    path: Path
    status: str  # "ok", "mismatch" or "missing"
    size: int | None


def list_cached() -> list[CacheEntry]:
    """Every registered file with where it would be cached and the state of that copy."""
    files = [("backbone", f) for f in BACKBONES.values()]
    files += [("checkpoint", c.file) for c in known_checkpoints().values() if c.file]
    entries = []
    for kind, file in files:
        path = file.cache_path()
        if not path.is_file():
            entries.append(CacheEntry(file.name, kind, path, "missing", None))
            continue
        status = "ok" if is_verified(file, path) else "mismatch"
        entries.append(CacheEntry(file.name, kind, path, status, path.stat().st_size))
    return entries


def download(name: str, progress: bool = True) -> Path:
    """Fetch a registered backbone or checkpoint into the cache."""
    checkpoint = known_checkpoints().get(name)
    if checkpoint is not None:
        if checkpoint.file is None:
            raise ValueError(f"checkpoint {name!r} is a local file; nothing to download")
        return fetch(checkpoint.file, progress)
    backbone = _lookup_backbone(name)
    if backbone is None:
        raise ValueError(
            f"unknown name {name!r}; backbones: {', '.join(BACKBONES)}; "
            f"checkpoints: {', '.join(known_checkpoints())}"
        )
    return fetch(backbone, progress)

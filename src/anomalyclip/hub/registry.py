"""Which names exist: the built-in files, a team's registry file, and lookups by name or alias.

Registered names stand for files with their addresses and checksums: OpenAI's CLIP
archives (the SHA-256 is part of OpenAI's address), the AnomalyCLIP authors' prompt
checkpoints (git blob ids, pinned to one commit) and Meta's DINOv2 weights (no checksum
published: trusted on first use, see :mod:`anomalyclip.hub.entries`). A team adds its
own names, or replaces built-in ones, in a registry file; it is read at every lookup, so
edits apply at once.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

from anomalyclip.hub.entries import CheckpointInfo, RemoteFile
from anomalyclip.hub.settings import user_registry_path

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

# facebookresearch/dinov2 hubconf: `{base}/{model}/{model}[_reg4]_pretrain.pth`, one name
# per torch.hub entry point (dinov2_vits14, dinov2_vits14_reg, ...). Meta publishes no
# checksums, so the first copy's SHA-256 is recorded and later copies must match it.
DINOV2_HOST = "https://dl.fbaipublicfiles.com/dinov2"
DINOV2_SIZES = ("s", "b", "l", "g")


def _dinov2(size: str, registers: bool) -> RemoteFile:
    model = f"dinov2_vit{size}14"
    full = f"{model}_reg4" if registers else model
    return RemoteFile(
        f"{model}_reg" if registers else model,
        f"{DINOV2_HOST}/{model}/{full}_pretrain.pth",
        f"{full}_pretrain.pth",
        trust_on_first_use=True,
    )


DINOV2_BACKBONES: dict[str, RemoteFile] = {
    entry.name: entry
    for entry in (_dinov2(size, registers) for size in DINOV2_SIZES for registers in (False, True))
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


# -- a team's registry file ------------------------------------------------------------------

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


def _read_registry_file(path: Path) -> Any:
    """The parsed file, TOML or JSON by its suffix; a syntax error names the file."""
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
        where,
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


# -- lookups ---------------------------------------------------------------------------------


def known_backbones() -> dict[str, RemoteFile]:
    """Built-in backbones (CLIP, DINOv2) and the team's; a team's entry of the same name wins."""
    return {**BACKBONES, **DINOV2_BACKBONES, **user_registry()[0]}


def is_dinov2_name(name: str) -> bool:
    """Whether ``name`` is a registered DINOv2 (``dinov2_vits14``, ``dinov2_vitl14_reg``;
    a team's entry of the same name replaces the address, not the family)."""
    entry = lookup_backbone(name)
    return entry is not None and entry.name in DINOV2_BACKBONES


def known_checkpoints() -> dict[str, CheckpointInfo]:
    """Built-in checkpoints and the team's; a team's entry of the same name wins."""
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
    """The registered checkpoint of a name, in any letter case (``MVTec`` is ``mvtec``)."""
    checkpoints = known_checkpoints()
    if name in checkpoints:
        return checkpoints[name]
    folded = {key.lower(): info for key, info in checkpoints.items()}
    return folded.get(name.strip().lower())

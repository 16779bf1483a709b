"""CLIP weights from every file users have, as a ready :class:`CLIP`.

Reads OpenAI's TorchScript archives and plain state dicts, safetensors files, Hugging
Face ``CLIPModel`` folders and open_clip checkpoints. Pickles are only ever read with
``torch.load(weights_only=True)``, and TorchScript archives as data
(:mod:`~anomalyclip.backbone.torchscript_archive`: their tensors, never their code), so no
file can run code by being loaded and none needs to be trusted first. Names and
checksums come from :mod:`anomalyclip.hub`, the one registry.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from anomalyclip.backbone.clip import CLIP, Activation
from anomalyclip.backbone.layouts import LayoutError, detect_layout, to_openai_layout
from anomalyclip.backbone.torchscript_archive import read_torchscript_state_dict
from anomalyclip.hub import resolve_backbone
from anomalyclip.utils.safe_load import (
    SafeLoadError,
    UnsafeFileError,
    refuse_non_finite,
    safe_torch_load,
)

logger = logging.getLogger(__name__)

FileKind = Literal["torchscript", "torch", "safetensors"]

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PROMPT_CHECKPOINT_HINT = " (an AnomalyCLIP prompt checkpoint: pass it as the checkpoint)"
FORMATS = (
    "OpenAI TorchScript archive, PyTorch state dict (.pt/.pth/.bin), safetensors file, "
    "Hugging Face CLIPModel folder (config.json + model.safetensors or pytorch_model.bin), "
    "open_clip folder (open_clip_config.json + open_clip_model.safetensors or "
    "open_clip_pytorch_model.bin)"
)


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and the reason."""


class UntrustedFileError(WeightsError):
    """A file that could run code when loaded and is not known to be safe."""


def load_clip(
    path_or_name: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    activation: Activation | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> CLIP:
    """A file, a folder or a registered backbone name, loaded into a CLIP in eval mode.

    Weights are float32 unless ``dtype`` asks otherwise (fp16/bf16 is for GPUs).
    ``activation``, ``vision_heads`` and ``text_heads`` override what neither the tensors
    nor a config tell: open_clip's own (non-OpenAI) models use ``activation="gelu"``.
    TorchScript archives (OpenAI's files) are read as data: no code in them runs.
    """
    path = resolve_weights_path(path_or_name)
    state_dict, config = read_weights(path)
    try:
        converted, arch = to_openai_layout(
            state_dict,
            config,
            activation=activation,
            vision_heads=vision_heads,
            text_heads=text_heads,
        )
    except LayoutError as error:
        raise WeightsError(f"{path}: {error}") from None
    # After conversion: open_clip's causal attn_mask holds -inf by design and is dropped.
    refuse_non_finite(converted, f"{path}: ")
    logger.info(
        "loaded %s (%s layout, %d+%d layers, %s)",
        path,
        detect_layout(state_dict),
        arch.vision_layers,
        arch.text_layers,
        arch.activation,
    )
    del state_dict
    model = CLIP.from_state_dict(converted, arch, dtype=dtype or torch.float32, consume=True)
    return model.to(device)


def resolve_weights_path(path_or_name: str | os.PathLike) -> Path:
    """An existing path as is; anything else through the backbone registry."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    looks_like_path = (
        path.suffix in WEIGHT_SUFFIXES
        or path.is_absolute()
        or (path.parent != Path(".") and path.parent.is_dir())
    )
    if looks_like_path:
        raise FileNotFoundError(f"CLIP weights {path} not found")
    return resolve_backbone(str(path_or_name))


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The state dict in a file or model folder, in its own layout, and its config if any."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights {path} not found")
    kind = sniff_file(path)
    if kind == "torchscript":
        state_dict = _read_torchscript(path)
    elif kind == "safetensors":
        state_dict = _read_safetensors(path)
    else:
        state_dict = _unwrap(_torch_load(path), path)
    return state_dict, _sibling_config(path)


def sniff_file(path: Path) -> FileKind:
    """What a file is, from its bytes rather than its name."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as error:
            raise WeightsError(f"{path} is a damaged zip archive: {error}") from None
        if any("/code/" in name for name in names) and any(
            name.endswith("constants.pkl") for name in names
        ):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in names):
            return "torch"
        raise WeightsError(f"{path} is a zip archive but not a PyTorch file; expected: {FORMATS}")
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) == 9:
        header_length = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" and header_length <= path.stat().st_size - 8:
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol 2+: torch.save's legacy format
        return "torch"
    size = path.stat().st_size
    detail = "it is empty" if size == 0 else f"its first bytes are {head[:8]!r}"
    raise WeightsError(f"{path} is not a recognised weights file ({detail}); expected: {FORMATS}")


def _read_torchscript(path: Path) -> dict[str, Tensor]:
    """The archive's tensors, read as data: nothing in it is compiled or run."""
    try:
        return read_torchscript_state_dict(path)
    except UnsafeFileError as error:
        raise UntrustedFileError(str(error)) from None
    except SafeLoadError as error:
        raise WeightsError(str(error)) from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{path} is not a readable safetensors file: {error}") from None


def _torch_load(path: Path) -> Any:
    """:func:`safe_torch_load`, its refusals raised as this module's error types."""
    try:
        return safe_torch_load(path, "PyTorch file")
    except UnsafeFileError as error:
        raise UntrustedFileError(str(error)) from None
    except SafeLoadError as error:
        raise WeightsError(str(error)) from None


def _unwrap(data: Any, path: Path) -> dict[str, Tensor]:
    """The state dict itself, out of {"state_dict": ...}-style training checkpoints."""
    while isinstance(data, Mapping) and not _is_state_dict(data):
        inner = next((data[k] for k in WRAPPER_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            keys = ", ".join(sorted(map(str, data))[:8]) or "none"
            hint = PROMPT_CHECKPOINT_HINT if "prompt_learner" in data else ""
            raise WeightsError(f"{path} holds no CLIP state dict: a dict with keys {keys}{hint}")
        data = inner
    if not isinstance(data, Mapping):
        raise WeightsError(f"{path} holds a {type(data).__name__}, not a state dict")
    return dict(data)


def _is_state_dict(data: Mapping) -> bool:
    return bool(data) and all(isinstance(v, Tensor) for v in data.values())


def _read_folder(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """A Hugging Face model folder (possibly sharded) or an open_clip one from the Hub."""
    for config_name, weight_names in (
        ("config.json", HF_WEIGHT_FILES),
        ("open_clip_config.json", OPEN_CLIP_WEIGHT_FILES),
    ):
        config_path = folder / config_name
        if not config_path.is_file():
            continue
        for name in weight_names:
            if (folder / name).is_file():
                return read_weights(folder / name)[0], _read_json(config_path)
            index = folder / f"{name}.index.json"
            if index.is_file():
                return _read_shards(index), _read_json(config_path)
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    raise WeightsError(
        f"{folder} is a folder without recognised weights (found {found}); expected: {FORMATS}"
    )


def _read_shards(index_path: Path) -> dict[str, Tensor]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index_path} has no weight_map")
    shards: dict[Path, None] = {}
    for shard in weight_map.values():
        shards.setdefault(_shard_file(index_path, shard))
    state_dict: dict[str, Tensor] = {}
    for shard_path in sorted(shards):
        state_dict.update(read_weights(shard_path)[0])
    return state_dict


def _shard_file(index_path: Path, shard: object) -> Path:
    """A shard the index names, if it is a plain file in the index's folder.

    The index is data from whoever published the folder: a name like
    ``../../../../etc/passwd``, an absolute path or a symlink pointing out would read (and
    quote in errors) any file, and "." would read the folder again without end. Links
    into Hugging Face's own cache (``snapshots/<rev>/x`` -> ``../../blobs/<hash>``), the
    way that cache stores every file, are followed.
    """
    folder = index_path.parent
    if not isinstance(shard, str):
        problem = f"a JSON {type(shard).__name__}, not a file name"
    elif shard in ("", ".", "..") or any(c in shard for c in "/\\\0"):
        problem = "not a plain file name"
    else:
        path = folder / shard
        real, inside = path.resolve(), folder.resolve()
        hub_blobs = inside.parent.parent / "blobs"
        roots = {inside, hub_blobs} if inside.parent.name == "snapshots" else {inside}
        if real.parent not in roots:
            problem = "a link to a file outside the folder"
        elif real.is_file():
            return path
        elif real.exists():
            problem = "not a file"
        else:
            raise WeightsError(f"{index_path}: shard {shard!r} is missing from {folder}")
    shown = repr(shard) if len(repr(shard)) <= 120 else repr(shard)[:117] + "..."
    raise WeightsError(
        f"{index_path}: refusing shard {shown}: {problem} (shards must be files in the folder)"
    )


def _sibling_config(path: Path) -> dict[str, Any] | None:
    """The config.json of a Hugging Face or open_clip folder when given its weights file."""
    for config_name, weight_names in (
        ("config.json", HF_WEIGHT_FILES),
        ("open_clip_config.json", OPEN_CLIP_WEIGHT_FILES),
    ):
        config_path = path.parent / config_name
        if path.name in weight_names and config_path.is_file():
            return _read_json(config_path)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} holds a JSON {type(data).__name__}, not a model config")
    return data

"""DINOv2 weights from the files users have: the official ``.pth``, timm's and Hugging Face's.

The model (:mod:`anomalyclip.backbone.dinov2`) knows the official key layout
(``dinov2_vits14_pretrain.pth`` and its siblings). Two other layouts are common:

* **timm** (``vit_small_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2``, ...): the
  official names without ``mask_token``. Its register models are "no_embed_class": timm's
  converter moved the class position into the class token (``cls_token + pos_embed[:, 0]``)
  and dropped that row from ``pos_embed``, so here the row comes back as zeros; class
  token plus position is the same sum, and the patch rows are untouched.
* **Hugging Face** ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``embeddings.*``,
  ``encoder.layer.N.*`` with separate query/key/value, ``layernorm.*``), as its files
  name them (``attention.attention.query``) and as transformers 5 names them in memory
  (``attention.q_proj``, ``attention.o_proj``), for a ``torch.save(model.state_dict())``.

Every layout is converted, then checked key by key against the architecture its shapes
imply: a missing, unexpected or misshapen tensor, or one holding NaN or infinity, is a
one-line error naming the file and the key. Files are read by
:func:`anomalyclip.backbone.loading.read_weights` (pickles with ``weights_only``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from anomalyclip.backbone.dinov2 import DINOv2, DINOv2Architecture
from anomalyclip.backbone.identity import display_name
from anomalyclip.backbone.layouts import strip_wrapper_prefixes
from anomalyclip.backbone.loading import WeightsError, read_weights
from anomalyclip.hub import is_dinov2_name, known_backbones, lookup_backbone, resolve_backbone
from anomalyclip.utils.hashing import file_digest
from anomalyclip.utils.safe_load import NonFiniteTensorError, refuse_non_finite

__all__ = [
    "DINOv2Layout",
    "detect_dinov2_layout",
    "is_dinov2_weights",
    "load_dinov2",
    "resolve_dinov2",
    "to_official_layout",
]

logger = logging.getLogger(__name__)

DINOv2Layout = Literal["official", "timm", "hf", "unknown"]

HF_RENAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.mask_token", "mask_token"),
    ("embeddings.register_tokens", "register_tokens"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("layernorm.", "norm."),
)
HF_BLOCK_RENAMES = (
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),  # transformers 5's in-memory names
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("mlp.weights_in.", "mlp.w12."),  # the giant's SwiGLU (use_swiglu_ffn)
    ("mlp.weights_out.", "mlp.w3."),
)
HF_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(\w+)$"
)
HF_PARTS = {"q": "query", "k": "key", "v": "value"}
HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def detect_dinov2_layout(state_dict: Mapping[str, Tensor]) -> DINOv2Layout:
    """Which DINOv2 layout a state dict is in ("unknown" when none)."""
    keys = set(state_dict)
    if "embeddings.cls_token" in keys or any(k.startswith("encoder.layer.") for k in keys):
        return "hf"
    if "cls_token" in keys and "blocks.0.attn.qkv.weight" in keys:
        if "reg_token" in keys or "mask_token" not in keys:
            return "timm"
        return "official"
    return "unknown"


def to_official_layout(
    state_dict: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], DINOv2Layout]:
    """The state dict in the official layout (``mask_token`` zero-filled when absent)."""
    state_dict = strip_wrapper_prefixes(state_dict)
    layout = detect_dinov2_layout(state_dict)
    if layout == "unknown":
        roots = sorted({key.split(".")[0] for key in state_dict})[:6]
        raise ValueError(
            "not DINOv2 weights in the official, timm or Hugging Face layout "
            f"(it holds {len(state_dict)} entries under {', '.join(roots) or 'nothing'})"
        )
    converted = _from_hf(state_dict) if layout == "hf" else _from_timm(state_dict)
    if "mask_token" not in converted and "cls_token" in converted:
        width = converted["cls_token"].shape[-1]
        converted["mask_token"] = torch.zeros(1, width, dtype=converted["cls_token"].dtype)
    return converted, layout


TIMM_PACKED_MLP = re.compile(r"^(blocks\.\d+\.mlp\.)fc([12])\.(weight|bias)$")


def _from_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm (and the official layout, which passes through): registers renamed, the
    giant's packed SwiGLU (``fc1``/``fc2``, fc1 twice fc2's input width) back to ``w12``/
    ``w3``, and for no_embed_class models a zero class row put back in front of the
    positional table."""
    converted = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
    fc1, fc2 = converted.get("blocks.0.mlp.fc1.weight"), converted.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[-1]:
        converted = {_packed_name(key): value for key, value in converted.items()}
    if "reg_token" in converted:
        converted["register_tokens"] = converted.pop("reg_token")
    table = converted.get("pos_embed")
    if table is not None and table.dim() == 3:
        rows = table.shape[1]
        side = int(rows**0.5 + 0.5)
        if side * side == rows:  # no class row (timm's no_embed_class)
            zero = torch.zeros(1, 1, table.shape[-1], dtype=table.dtype)
            converted["pos_embed"] = torch.cat((zero, table), dim=1)
    return converted


def _packed_name(key: str) -> str:
    if match := TIMM_PACKED_MLP.match(key):
        prefix, number, kind = match.groups()
        return f"{prefix}{'w12' if number == '1' else 'w3'}.{kind}"
    return key


def _from_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face: rename, and merge query/key/value into one qkv per block."""
    converted: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if match := HF_QKV.match(key):
            block, part, short, kind = match.groups()
            qkv.setdefault((block, kind), {})[part or HF_PARTS[short]] = value
            continue
        converted[_rename_hf(key)] = value
    for (block, kind), parts in qkv.items():
        absent = {"query", "key", "value"} - parts.keys()
        if absent:
            raise ValueError(f"encoder.layer.{block} lacks attention {', '.join(sorted(absent))}")
        merged = torch.cat([parts["query"], parts["key"], parts["value"]])
        converted[f"blocks.{block}.attn.qkv.{kind}"] = merged
    return converted


def _rename_hf(key: str) -> str:
    if match := HF_BLOCK.match(key):
        block, rest = match.groups()
        for old, new in HF_BLOCK_RENAMES:
            if rest.startswith(old):
                return f"blocks.{block}.{new}{rest[len(old) :]}"
        return key  # left as is: check_keys names it as unexpected
    for old, new in HF_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def check_keys(state_dict: Mapping[str, Tensor], arch: DINOv2Architecture) -> None:
    """Every parameter of ``arch`` present with its shape, and nothing else; the first
    problem is raised as one line naming the key."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in DINOv2(arch).state_dict().items()}
    for name in sorted(expected.keys() - state_dict.keys()):
        raise ValueError(f"missing key {name} (shape {expected[name]})")
    for name in sorted(state_dict.keys() - expected.keys()):
        raise ValueError(f"unexpected key {name} {tuple(state_dict[name].shape)}")
    for name in sorted(expected):
        if tuple(state_dict[name].shape) != expected[name]:
            raise ValueError(
                f"key {name} has shape {tuple(state_dict[name].shape)}, expected {expected[name]}"
            )


def _heads_from_config(config: Mapping[str, Any] | None) -> int | None:
    """A Hugging Face config's head count, the one field no tensor shape gives."""
    if not config:
        return None
    heads = config.get("num_attention_heads")
    return int(heads) if heads is not None else None


def load_dinov2(
    source: str | os.PathLike[str] | Mapping[str, Tensor], *, heads: int | None = None
) -> DINOv2:
    """A DINOv2 in eval mode from a file, a Hugging Face folder or a state dict in memory.

    ``heads`` overrides the head count (default: a Hugging Face config's, else width // 64,
    which every published model has). Raises ``WeightsError`` naming the file and the key.
    """
    if isinstance(source, Mapping):
        where, config = "state dict", None
        raw = dict(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"DINOv2 weights {path} not found")
        where = str(path)
        raw, config = read_weights(path)
    try:
        converted, layout = to_official_layout(raw)
        arch = DINOv2Architecture.from_state_dict(converted, heads or _heads_from_config(config))
        check_keys(converted, arch)
        refuse_non_finite(converted, "")
    except (ValueError, NonFiniteTensorError) as error:
        raise WeightsError(f"{where}: {error}") from None
    logger.info(
        "loaded DINOv2 %s (%s layout, width %d, %d blocks, %d registers)",
        where,
        layout,
        arch.width,
        arch.depth,
        arch.registers,
    )
    return DINOv2.from_state_dict(converted, arch)


def is_dinov2_weights(source: str | os.PathLike[str]) -> bool:
    """Whether a weights file or folder holds a DINOv2 (in any layout read here), or
    ``source`` is a registered DINOv2 name, so that a method offering both backbone
    families can tell which it was given."""
    path = Path(source).expanduser()
    if not path.exists():
        return is_dinov2_name(str(source))
    raw, _ = read_weights(path)
    return detect_dinov2_layout(raw) != "unknown"


def resolve_dinov2(source: str | os.PathLike[str]) -> tuple[Path, str, str | None]:
    """The DINOv2 weights to load, the name results record and the SHA-256 they record.

    An existing file or folder is taken as is (recorded by its file name and digest; a
    folder has none); a registered name (``dinov2_vits14``) is fetched into the verified
    cache, or taken from it, exactly as CLIP names are, and recorded by name and by the
    SHA-256 recorded at its first download.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path, display_name(str(path)), file_digest(path) if path.is_file() else None
    entry = lookup_backbone(str(source))
    if entry is None or not is_dinov2_name(entry.name):
        registered = ", ".join(name for name in known_backbones() if is_dinov2_name(name))
        raise FileNotFoundError(
            f"DINOv2 weights {str(source)!r}: no such file or folder, and not a registered "
            f"DINOv2 ({registered})"
        )
    fetched = resolve_backbone(entry.name)
    return fetched, entry.name, entry.known_sha256

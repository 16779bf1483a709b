"""CLIP state dicts from OpenAI, open_clip and Hugging Face, converted to OpenAI's key layout.

The model (:mod:`anomalyclip.backbone.clip`) knows one layout, OpenAI's; this module maps
the others onto it and works out the architecture, since neither the attention head count
nor the MLP activation can be read off OpenAI's tensors. Nothing here reads files (see
:mod:`anomalyclip.backbone.loading`) or imports ``transformers``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from anomalyclip.backbone.clip import CLIP, Activation, CLIPArchitecture

Layout = Literal["openai", "open_clip", "hf", "resnet", "unknown"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
OPENAI_BOOKKEEPING = ("input_resolution", "context_length", "vocab_size")
OPEN_CLIP_DROPPED = ("attn_mask", "text.attn_mask", "logit_bias")
ACTIVATIONS: dict[str, Activation] = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
HF_DEFAULT_HEADS = {"vision": 12, "text": 8}  # CLIPVisionConfig / CLIPTextConfig defaults
LAYER_NORM_EPS = 1e-5
RECOGNISED = (
    "OpenAI or open_clip (visual.conv1.weight, token_embedding.weight, ...), "
    "open_clip CustomTextCLIP (visual.*, text.*), "
    "Hugging Face CLIPModel (vision_model.*, text_model.*, visual_projection.weight, ...)"
)

HF_RENAMES = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic: Hugging Face's spelling
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
)
HF_BLOCK_RENAMES = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
HF_QKV = re.compile(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$")
HF_TRANSPOSED = {
    "visual_projection.weight": "visual.proj",
    "text_projection.weight": "text_projection",
}


class LayoutError(ValueError):
    """A state dict that is not a supported CLIP; the message says what was found instead."""


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove prefixes that DDP, torch.compile or training wrappers put on every key."""
    result = dict(state_dict)
    stripped = True
    while stripped and result:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in result):
                result = {key[len(prefix) :]: value for key, value in result.items()}
                stripped = True
    return result


def detect_layout(state_dict: Mapping[str, Tensor]) -> Layout:
    """Which published layout a state dict is in ("unknown" when it is none of them)."""
    keys = set(strip_wrapper_prefixes(state_dict))
    if any(key.startswith(("vision_model.", "text_model.")) for key in keys):
        return "hf"
    if any(key.startswith(("visual.layer1.", "visual.attnpool.")) for key in keys):
        return "resnet"
    if any(key.startswith(("text.", "visual.trunk.")) for key in keys) or keys & set(
        OPEN_CLIP_DROPPED
    ):
        return "open_clip"
    if keys & {"visual.conv1.weight", "token_embedding.weight"}:
        return "openai"
    return "unknown"


def to_openai_layout(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    activation: Activation | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> tuple[dict[str, Tensor], CLIPArchitecture]:
    """Convert any supported layout and work out the architecture, checking every key.

    config: a Hugging Face ``config.json`` or an open_clip model config, as a dict; it
    supplies what tensors cannot (heads, activation) and is checked against the tensors.
    Without one, heads are width // 64 and the activation QuickGELU, as in OpenAI's
    models; open_clip's own models use GELU, so pass ``activation="gelu"`` for them.
    Keyword overrides win over the config. Dtypes are kept.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    layout = detect_layout(state_dict)
    if layout == "resnet":
        raise LayoutError("ResNet CLIP models are not supported; use a ViT CLIP")
    if layout == "unknown":
        raise LayoutError(
            f"not CLIP weights in any recognised layout ({RECOGNISED}); {_describe(state_dict)}"
        )
    if layout == "hf":
        converted = _from_hf(state_dict)
    elif layout == "open_clip":
        converted = _from_open_clip(state_dict)
    else:
        converted = {k: v for k, v in state_dict.items() if k not in OPENAI_BOOKKEEPING}

    if "visual.conv1.weight" not in converted or "ln_final.weight" not in converted:
        raise LayoutError(
            f"incomplete CLIP weights in {layout} layout: both the visual and the text tower "
            f"are needed; {_describe(state_dict)}"
        )
    if "text_projection" not in converted or converted["text_projection"].ndim != 2:
        raise LayoutError(f"CLIP weights in {layout} layout without a 2-D text projection")
    inferred = CLIPArchitecture.from_state_dict(converted)
    settings = _config_settings(config or {})
    explicit = {"activation": activation, "vision_heads": vision_heads, "text_heads": text_heads}
    settings.update({key: value for key, value in explicit.items() if value is not None})
    arch = _apply_settings(inferred, settings)
    check_keys(converted, arch, layout)
    return converted, arch


def check_keys(state_dict: Mapping[str, Tensor], arch: CLIPArchitecture, layout: str) -> None:
    """Every parameter present with its shape and nothing else, or say which are not."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in CLIP(arch).state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{name} {tuple(state_dict[name].shape)} (expected {expected[name]})"
        for name in sorted(expected.keys() & state_dict.keys())
        if tuple(state_dict[name].shape) != expected[name]
    ]
    problems = [
        f"{label} ({len(items)}): {_first(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", mismatched),
        )
        if items
    ]
    if problems:
        raise LayoutError(
            f"CLIP weights in {layout} layout do not fit the model: " + "; ".join(problems)
        )


def _first(items: list[str], count: int = 6) -> str:
    shown = ", ".join(items[:count])
    return shown + (f", ... ({len(items) - count} more)" if len(items) > count else "")


def _describe(state_dict: Mapping[str, Any]) -> str:
    if not state_dict:
        return "it is empty"
    roots = sorted({key.split(".")[0] for key in state_dict})
    return f"it holds {len(state_dict)} entries under {_first(roots)}"


def _from_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``CLIPModel``: rename, merge q/k/v into in_proj, transpose projections."""
    converted: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key in HF_TRANSPOSED:
            converted[HF_TRANSPOSED[key]] = value.T.contiguous()
            continue
        if match := HF_QKV.match(key):
            block, part, kind = match.groups()
            qkv.setdefault((_rename_hf(block + "."), kind), {})[part] = value
            continue
        converted[_rename_hf(key)] = value
    for (block, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            absent = ", ".join(sorted({"q", "k", "v"} - parts.keys()))
            raise LayoutError(f"Hugging Face attention in {block} lacks {absent}_proj.{kind}")
        converted[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def _rename_hf(key: str) -> str:
    for old, new in HF_RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            if new.endswith("resblocks."):
                for old_part, new_part in HF_BLOCK_RENAMES:
                    key = key.replace(f".{old_part}", f".{new_part}")
            return key
    return key


def _from_open_clip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open_clip: the OpenAI names, or CustomTextCLIP's with the text tower under ``text.``."""
    if any(key.startswith("visual.trunk.") for key in state_dict):
        raise LayoutError("open_clip models with a timm vision tower are not supported")
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in OPEN_CLIP_DROPPED:
            continue
        if key == "text.text_projection.weight":  # a Linear text projection: (embed, width)
            converted["text_projection"] = value.T.contiguous()
            continue
        converted[key.removeprefix("text.")] = value
    return converted


def _config_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture fields from a Hugging Face or open_clip config."""
    config = config.get("model_cfg", config)  # open_clip_config.json wraps the model config
    if "vision_cfg" in config or "text_cfg" in config:
        return _open_clip_settings(config)
    if any(key.startswith(("vision_config", "text_config")) for key in config):
        return _hf_settings(config)
    if config:
        raise LayoutError(f"unrecognised model config with keys {_first(sorted(config))}")
    return {}


def _hf_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Hugging Face writes only non-default values, so absent heads mean its defaults."""
    vision = config.get("vision_config") or config.get("vision_config_dict") or {}
    text = config.get("text_config") or config.get("text_config_dict") or {}
    activations = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    unsupported = activations - ACTIVATIONS.keys()
    if unsupported or len(activations) > 1:
        raise LayoutError(
            f"Hugging Face config activations {sorted(activations)} are not supported "
            f"(both towers must use one of {sorted(ACTIVATIONS)})"
        )
    for tower in (vision, text):
        if tower.get("layer_norm_eps", LAYER_NORM_EPS) != LAYER_NORM_EPS:
            raise LayoutError(f"layer_norm_eps={tower['layer_norm_eps']} is not supported (1e-5)")
    settings: dict[str, Any] = {
        "activation": ACTIVATIONS[activations.pop()],
        "vision_heads": vision.get("num_attention_heads", HF_DEFAULT_HEADS["vision"]),
        "text_heads": text.get("num_attention_heads", HF_DEFAULT_HEADS["text"]),
    }
    checks = {
        "embed_dim": config.get("projection_dim"),
        "vision_width": vision.get("hidden_size"),
        "vision_layers": vision.get("num_hidden_layers"),
        "vision_patch_size": vision.get("patch_size"),
        "text_width": text.get("hidden_size"),
        "text_layers": text.get("num_hidden_layers"),
        "context_length": text.get("max_position_embeddings"),
    }
    if "image_size" in vision and "patch_size" in vision:
        checks["vision_grid"] = vision["image_size"] // vision["patch_size"]
    settings.update({key: value for key, value in checks.items() if value is not None})
    return settings


def _open_clip_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip's model configs: GELU unless ``quick_gelu``, vision heads from head_width."""
    vision = config.get("vision_cfg", {})
    text = config.get("text_cfg", {})
    for tower, cfg in (("vision", vision), ("text", text)):
        if cfg.get("mlp_ratio", 4) != 4:
            raise LayoutError(
                f"open_clip {tower} mlp_ratio={cfg['mlp_ratio']} is not supported (4)"
            )
        if cfg.get("hf_model_name") or cfg.get("timm_model_name"):
            raise LayoutError(
                f"open_clip {tower} towers from timm or transformers are not supported"
            )
    settings: dict[str, Any] = {"activation": "quick_gelu" if config.get("quick_gelu") else "gelu"}
    if "width" in vision:
        settings["vision_heads"] = vision["width"] // vision.get("head_width", 64)
    if "heads" in text:
        settings["text_heads"] = text["heads"]
    image_size = vision.get("image_size")
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise LayoutError(f"non-square open_clip image_size {image_size} is not supported")
        image_size = image_size[0]
    checks = {
        "embed_dim": config.get("embed_dim"),
        "vision_width": vision.get("width"),
        "vision_layers": vision.get("layers"),
        "vision_patch_size": vision.get("patch_size"),
        "text_width": text.get("width"),
        "text_layers": text.get("layers"),
        "context_length": text.get("context_length"),
        "vocab_size": text.get("vocab_size"),
    }
    if image_size and vision.get("patch_size"):
        checks["vision_grid"] = image_size // vision["patch_size"]
    settings.update({key: value for key, value in checks.items() if value is not None})
    return settings


def _apply_settings(inferred: CLIPArchitecture, settings: Mapping[str, Any]) -> CLIPArchitecture:
    """Heads and activation come from settings; every other field must agree with the tensors."""
    free = {"activation", "vision_heads", "text_heads"}
    disagreements = [
        f"{key}={value} but the tensors say {getattr(inferred, key)}"
        for key, value in settings.items()
        if key not in free and value != getattr(inferred, key)
    ]
    if disagreements:
        raise LayoutError(
            "the model config does not match the weights: " + "; ".join(disagreements)
        )
    chosen = {key: value for key, value in settings.items() if key in free}
    if chosen.get("activation", "quick_gelu") not in ACTIVATIONS:
        raise LayoutError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {chosen['activation']!r}"
        )
    arch = dataclasses.replace(inferred, **chosen)
    for tower, width, heads in (
        ("vision", arch.vision_width, arch.vision_heads),
        ("text", arch.text_width, arch.text_heads),
    ):
        if heads < 1 or width % heads:
            raise LayoutError(f"{tower} width {width} cannot be split into {heads} heads")
    return arch

"""The paper's comparison and ablation rows, each one ``--preset`` on the command line.

:data:`PRESETS` names the rows of the paper's comparison and ablation tables (see
``docs/protocol.md``). It imports no torch, so the command line's parser lists the
presets without it; the hand-written prompts they select are in ``baselines.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig

LAST_LAYER = "last"


@dataclass(frozen=True)
class Preset:
    """One row of the paper's tables as configuration changes and a training loss.

    ``config`` values are :class:`AnomalyCLIPConfig` fields; ``features = "last"`` means
    the backbone's last visual layer alone. ``trained`` is False for the hand-written
    baselines, which are evaluated without a prompt checkpoint.
    """

    name: str
    description: str
    config: Mapping[str, Any] = field(default_factory=dict)
    loss: str = "glocal"
    trained: bool = True

    def config_overrides(self, visual_layers: int) -> dict[str, Any]:
        overrides = dict(self.config)
        if overrides.get("features") == LAST_LAYER:
            overrides["features"] = (visual_layers,)
        return overrides

    def apply(self, config: AnomalyCLIPConfig, visual_layers: int) -> AnomalyCLIPConfig:
        return config.replace(**self.config_overrides(visual_layers))


_PRESET_LIST = (
    Preset("anomalyclip", "AnomalyCLIP as in the paper (all defaults)"),
    Preset(
        "clip",
        "zero-shot CLIP: one hand-written prompt pair with the class name, standard CLIP "
        "head, no DPAM",
        {"text_prompts": "plain", "prompt_mode": "aware", "dpam_layers": 0, "global_head": "clip"},
        trained=False,
    ),
    Preset(
        "winclip",
        "WinCLIP-style prompt ensemble (state words x templates) with the class name, "
        "standard CLIP head, no DPAM (no window scoring)",
        {
            "text_prompts": "winclip",
            "prompt_mode": "aware",
            "dpam_layers": 0,
            "global_head": "clip",
        },
        trained=False,
    ),
    Preset(
        "object-aware",
        "learned prompts with the class name instead of 'object'",
        {"prompt_mode": "aware"},
    ),
    Preset("dpam-qq", "DPAM with Q-Q attention", {"dpam_mode": "qq"}),
    Preset("dpam-kk", "DPAM with K-K attention", {"dpam_mode": "kk"}),
    Preset("no-dpam", "no DPAM: plain Q-K attention in every layer", {"dpam_layers": 0}),
    Preset("global-loss", "trained with the global (image) loss only", loss="global"),
    Preset("local-loss", "trained with the local (pixel) loss only", loss="local"),
    Preset("no-deep-prompts", "no learnable tokens inside the text encoder", {"prompt_depth": 1}),
    Preset(
        "single-layer",
        "pixel map from the last visual layer only",
        {"features": LAST_LAYER},
    ),
)
PRESETS: dict[str, Preset] = {preset.name: preset for preset in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None

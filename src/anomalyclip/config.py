"""The one configuration object: it travels inside every checkpoint the project writes."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

PAPER_FEATURES = (6, 12, 18, 24)


@dataclass
class AnomalyCLIPConfig:
    """Hyper-parameters of the method; defaults are the paper's (ViT-L/14@336 at 518 px).

    features: 1-based visual layers whose patch tokens make the pixel map.
    dpam_layers: how many final visual layers use DPAM (the original's ``DPAM_layer - 1``);
    0 disables DPAM. global_head: "original" takes the class token without ln_post, as the
    authors' code and checkpoints do; "clip" is the standard CLIP head.
    prompt_mode: "agnostic" (the word "object") or "aware" (``object_name`` is the class).
    prompt_depth: text layers reached by prompts (deep prompts go into layers 1..depth-1).
    text_prompts: "learned" (AnomalyCLIP) or a hand-written baseline from
    :mod:`anomalyclip.baselines` ("plain": one normal/abnormal sentence pair as in plain
    CLIP; "winclip": WinCLIP-style state words times templates).
    image_threshold / pixel_threshold: verdict thresholds set by calibration, or None.
    """

    backbone: str = "ViT-L/14@336px"
    image_size: int = 518
    features: tuple[int, ...] = PAPER_FEATURES
    dpam_layers: int = 19
    dpam_mode: str = "vv"
    global_head: str = "original"
    prompt_mode: str = "agnostic"
    object_name: str = "object"
    n_ctx: int = 12
    prompt_depth: int = 9
    deep_prompt_length: int = 4
    normal_template: str = "{}"
    abnormal_template: str = "damaged {}"
    text_prompts: str = "learned"
    temperature: float = 0.07
    sigma: float = 4.0
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = tuple(int(layer) for layer in self.features)
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.image_size <= 0:
            problems.append(f"image_size must be positive, got {self.image_size}")
        if not self.features or min(self.features) < 1:
            problems.append(f"features must be 1-based layer numbers, got {self.features}")
        if self.dpam_layers < 0:
            problems.append(f"dpam_layers must be >= 0, got {self.dpam_layers}")
        if self.dpam_mode not in ("vv", "qq", "kk"):
            problems.append(f"dpam_mode must be vv, qq or kk, got {self.dpam_mode!r}")
        if self.global_head not in ("original", "clip"):
            problems.append(f"global_head must be 'original' or 'clip', got {self.global_head!r}")
        if self.prompt_mode not in ("agnostic", "aware"):
            problems.append(f"prompt_mode must be agnostic or aware, got {self.prompt_mode!r}")
        if self.n_ctx < 1 or self.prompt_depth < 1 or self.deep_prompt_length < 0:
            problems.append("n_ctx and prompt_depth must be >= 1, deep_prompt_length >= 0")
        if self.text_prompts not in ("learned", "plain", "winclip"):
            problems.append(
                f"text_prompts must be learned, plain or winclip, got {self.text_prompts!r}"
            )
        if self.sigma < 0:
            problems.append(f"sigma must be >= 0, got {self.sigma}")
        if problems:
            raise ValueError("invalid AnomalyCLIP configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["features"] = list(self.features)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnomalyCLIPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown configuration keys: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> AnomalyCLIPConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

"""The one configuration object: it travels inside every checkpoint the project writes."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from string import Formatter
from typing import TYPE_CHECKING, Any, Literal, get_args

from anomalyclip.input_settings import CLIP_MEAN, CLIP_STD, RESIZE_MODES, ResizeMode
from anomalyclip.postprocess import PostProcessor
from anomalyclip.utils.quoting import quoted

if TYPE_CHECKING:
    from anomalyclip.preprocess import PreProcessor

logger = logging.getLogger(__name__)

PAPER_FEATURES = (6, 12, 18, 24)
# Four times the paper's 518 (16x its tokens, minutes per image on a CPU); a file asking for
# more would only exhaust memory and time in attention (big images: tile them instead).
MAX_IMAGE_SIZE = 2048
# The Gaussian's kernel spans 8 sigma: beyond this it is wider than any map.
MAX_SIGMA = MAX_IMAGE_SIZE / 8
# Scores are softmaxes of cosine similarities (within [-1, 1]) over the temperature. CLIP
# clamps its own logit scale to at most 100 (temperature >= 0.01); below 1e-3 a cosine gap
# of 0.02 is a logit gap of 20, where float32's softmax is exactly 0 or 1, so scores and
# maps collapse to 0.0 and 1.0 (1e-30 made every score 0.0). Above 10 every logit lies
# within +-0.1 and every probability within 0.5 +- 0.05: no contrast left to threshold.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 10.0
CONTEXT_TOKENS = 77  # CLIP's text context; a longer prompt cannot be encoded anyway
MAX_PROMPT_TEXT = 1000  # characters of object_name or a template (a token is >= 1)

# Each choice list once: validation here and the CLI's ``choices`` read these.
DpamMode = Literal["vv", "qq", "kk"]
GlobalHead = Literal["original", "clip"]
PromptMode = Literal["agnostic", "aware"]
TextPrompts = Literal["learned", "plain", "winclip"]
DPAM_MODES: tuple[str, ...] = get_args(DpamMode)
GLOBAL_HEADS: tuple[str, ...] = get_args(GlobalHead)
PROMPT_MODES: tuple[str, ...] = get_args(PromptMode)
TEXT_PROMPTS: tuple[str, ...] = get_args(TextPrompts)


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
    :mod:`anomalyclip.methods.anomalyclip.baselines` ("plain": one normal/abnormal sentence pair as
    in plain
    CLIP; "winclip": WinCLIP-style state words times templates).
    image_threshold / pixel_threshold: verdict thresholds set by calibration, or None.
    backbone: the backbone's registered name or its weights file's name, never a path
    (checkpoints identify the file by its SHA-256 beside this).
    resize, mean, std: the preprocessing (see :class:`~anomalyclip.preprocess.PreProcessor`).
    temperature: divides the cosine similarities before the softmax; bounded to
    ``MIN_TEMPERATURE`` (1e-3) .. ``MAX_TEMPERATURE`` (10), where scores stop being
    meaningful: below, float32 softmaxes saturate at exactly 0 or 1 (CLIP itself never
    goes below 0.01); above, every probability lies within 0.5 +- 0.05.
    object_name, normal_template, abnormal_template: at most ``MAX_PROMPT_TEXT`` characters
    each (the text encoder reads 77 tokens); errors quote them cut short
    (:func:`~anomalyclip.utils.quoting.quoted`).
    """

    backbone: str = "ViT-L/14@336px"
    image_size: int = 518
    resize: ResizeMode = "squash"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    features: tuple[int, ...] = PAPER_FEATURES
    dpam_layers: int = 19
    dpam_mode: DpamMode = "vv"
    global_head: GlobalHead = "original"
    prompt_mode: PromptMode = "agnostic"
    object_name: str = "object"
    n_ctx: int = 12
    prompt_depth: int = 9
    deep_prompt_length: int = 4
    normal_template: str = "{}"
    abnormal_template: str = "damaged {}"
    text_prompts: TextPrompts = "learned"
    temperature: float = 0.07
    sigma: float = 4.0
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = tuple(int(layer) for layer in self.features)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        problems = []
        if not 0 < self.image_size <= MAX_IMAGE_SIZE:
            problems.append(f"image_size must be 1 to {MAX_IMAGE_SIZE}, got {self.image_size}")
        if not self.features or min(self.features) < 1:
            problems.append(f"features must be 1-based layer numbers, got {self.features}")
        if self.dpam_layers < 0:
            problems.append(f"dpam_layers must be >= 0, got {self.dpam_layers}")
        for name, choices in (
            ("dpam_mode", DPAM_MODES),
            ("global_head", GLOBAL_HEADS),
            ("prompt_mode", PROMPT_MODES),
            ("text_prompts", TEXT_PROMPTS),
            ("resize", RESIZE_MODES),
        ):
            if getattr(self, name) not in choices:
                problems.append(
                    f"{name} must be one of {', '.join(choices)}, got {quoted(getattr(self, name))}"
                )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append(f"mean and std need 3 values, std > 0; got {self.mean}, {self.std}")
        if self.n_ctx < 1 or self.prompt_depth < 1 or self.deep_prompt_length < 0:
            problems.append("n_ctx and prompt_depth must be >= 1, deep_prompt_length >= 0")
        if not 0 <= self.sigma <= MAX_SIGMA:
            problems.append(f"sigma must be 0 to {MAX_SIGMA:g}, got {self.sigma}")
        for name in ("normal_template", "abnormal_template"):
            if not _is_template(getattr(self, name)):
                problems.append(
                    f"{name} may hold one {{}} for the object name and no other braces, "
                    f"got {quoted(getattr(self, name))}"
                )
        for name in ("object_name", "normal_template", "abnormal_template"):
            text = getattr(self, name)
            if isinstance(text, str) and len(text) > MAX_PROMPT_TEXT:
                problems.append(
                    f"{name} must be at most {MAX_PROMPT_TEXT} characters (the text encoder "
                    f"reads {CONTEXT_TOKENS} tokens), got {quoted(text)}"
                )
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            problems.append(
                f"temperature must be {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}, "
                f"got {self.temperature:g}"
            )
        problems += self._non_finite()
        if problems:
            raise ValueError("invalid AnomalyCLIP configuration: " + "; ".join(problems))

    def _non_finite(self) -> list[str]:
        """Numbers that must be finite: a NaN threshold makes every verdict "normal", a
        NaN mean or std every score NaN."""
        values = {
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "temperature": self.temperature,
            "sigma": self.sigma,
            "mean": self.mean,
            "std": self.std,
        }
        return [
            f"{name} must be finite, got {value}"
            for name, value in values.items()
            if value is not None and not all(math.isfinite(v) for v in _numbers(value))
        ]

    @property
    def map_range(self) -> tuple[float, float]:
        """Every map lies in [0, number of feature layers]: a sum of per-layer values in [0, 1]."""
        return 0.0, float(len(self.features))

    def preprocessor(self) -> PreProcessor:
        from anomalyclip.preprocess import PreProcessor  # torch: only when images are read

        return PreProcessor(self.image_size, self.resize, self.mean, self.std)

    def postprocessor(self) -> PostProcessor:
        """The map range and the calibrated thresholds (given ones are applied on top)."""
        return PostProcessor.calibrated(
            self.map_range,
            self.image_threshold,
            self.pixel_threshold,
            self.extra.get("false_alarm"),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["features"] = list(self.features)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnomalyCLIPConfig:
        """A configuration read from a file: every value's type is checked, so a damaged
        file gives one line naming the field instead of a traceback."""
        if not isinstance(data, dict):
            raise ValueError(f"a configuration must be a dictionary, got a {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - set(fields)))
        if unknown:
            logger.warning("ignoring unknown configuration keys: %s", ", ".join(unknown))
        values = {}
        for name, value in data.items():
            if name in fields:
                values[name] = _checked(name, value, _default_of(fields[name]))
        return cls(**values)

    def replace(self, **changes: Any) -> AnomalyCLIPConfig:
        """A copy with ``changes``; None is a value (``image_threshold=None`` clears it)."""
        return dataclasses.replace(self, **changes)


def _is_template(text: str) -> bool:
    """At most one bare ``{}``: ``str.format`` fills it with the object name, and a field
    like ``{0.__class__}`` or ``{name}`` would read attributes or fail."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in Formatter().parse(text) if f is not None]
    except ValueError:
        return False
    return len(fields) <= 1 and all(f == "" and not spec and not conv for f, spec, conv in fields)


def shown(value: Any, limit: int = 60) -> str:
    """A value as one short line for an error message: a tensor by its shape and dtype
    (its repr spans lines), anything else by its repr, cut at ``limit`` characters."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(shape)} ({value.dtype})"
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numbers(value: float | tuple[float, ...]) -> tuple[float, ...]:
    return value if isinstance(value, tuple) else (value,)


def _default_of(spec: dataclasses.Field) -> Any:
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def _checked(name: str, value: Any, default: Any) -> Any:
    """``value`` if it has the kind of the field's default, else ValueError naming it."""

    def number(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if default is None:  # the optional thresholds
        ok = value is None or number(value)
        expected = "a number or null"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif isinstance(default, float):
        ok, expected = number(value), "a number"
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    elif isinstance(default, tuple) and all(isinstance(item, int) for item in default):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(item, int) and not isinstance(item, bool) for item in value
        )
        expected = "a list of integers"
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(number(item) for item in value)
        expected = "a list of numbers"
    else:
        ok, expected = isinstance(value, dict), "a dictionary"
    if not ok:
        raise ValueError(f"configuration field {name!r} must be {expected}, got {shown(value)}")
    return value

"""Scoring methods, one folder each, and the one registry ``--method`` reads.

Each method is a :class:`~anomalyclip.predictor.Predictor` in ``methods/<name>/``
(``model.py``, and ``few_shot.py`` for its reference mode). What it can do is declared in
its :class:`Method` entry, never found out with ``isinstance``: whether its images
score each other (a set), whether it has a reference mode, whether it is trained. The
one place that turns a description into something to score with is
:mod:`anomalyclip.methods.assemble`; adding a method is its folder plus one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalyclip.predictor import PathScorer, Predictor
    from anomalyclip.preprocess import ImageSource
    from anomalyclip.utils.precision import PrecisionChoice

__all__ = ["METHODS", "Method", "method_named", "path_scorer", "save_bank"]

# (weights, checkpoint, overrides, device, seed) -> the method, as it is
Builder = Callable[[Any, Any, Mapping[str, Any], str, int], "Predictor"]


@dataclass(frozen=True)
class Method:
    """A registered scoring method and what it can do."""

    name: str
    summary: str
    build: Builder
    scores_sets: bool = False  # its images score each other: it needs a set
    has_checkpoint: bool = False  # it reads learned weights (--checkpoint)
    trainable: bool = False  # `anomalyclip train` fits it
    # the module of its reference mode, offering references_for(predictor, images),
    # bank_for(predictor, bank file) and save_bank(predictor, path, storage dtype)
    few_shot: str | None = None
    # its reference mode also offers encode_references(predictor, images), each image's
    # features alone, and references_from_encoded(predictor, features, sources): a bank
    # that changes by one image (watch's rolling bank) then encodes only that one
    encodes_references: bool = False
    # the scores of a set are on its reference mode's scale, so an image threshold
    # calibrated on sets holds for images scored against a bank (watch's rolling bank)
    set_scores_match_references: bool = True
    # the precisions it runs in besides float32, fastest first (what ``auto`` picks
    # from), and the function that puts a built predictor in one of them
    precisions: tuple[str, ...] = ()
    apply_precision: Callable[[Predictor, PrecisionChoice], Predictor] | None = None
    # its engine for scoring files by path with work kept between runs (directory, memory
    # limit in bytes), or None where the predictor is not the bare method
    path_scorer: Callable[[Predictor, Path | None, int | None], PathScorer | None] | None = None
    # for a method with a checkpoint: the model a calibrated checkpoint saves, and the
    # reference bank its thresholds hold for (None: calibrated without references), of
    # the predictor under any tiles
    checkpoint_parts: Callable[[Predictor], tuple[Any, Any]] | None = None

    @property
    def with_references(self) -> Callable[[Predictor, Sequence[ImageSource]], Predictor] | None:
        """Its reference mode for known-good images (None: it has none)."""
        return None if self.few_shot is None else _lazy(self.few_shot, "references_for")

    @property
    def load_bank(self) -> Callable[[Predictor, Path], Predictor] | None:
        """Its reference mode for a bank file saved earlier."""
        return None if self.few_shot is None else _lazy(self.few_shot, "bank_for")

    @property
    def encode_references(self) -> Callable[[Predictor, Sequence[ImageSource]], list[Any]] | None:
        """Each reference's features, encoded alone (None: the bank is built whole)."""
        if self.few_shot is None or not self.encodes_references:
            return None
        return _lazy(self.few_shot, "encode_references")

    @property
    def references_from_encoded(
        self,
    ) -> Callable[[Predictor, Sequence[Any], Sequence[ImageSource]], Predictor] | None:
        """Its reference mode for features :attr:`encode_references` gave, in bank order."""
        if self.few_shot is None or not self.encodes_references:
            return None
        return _lazy(self.few_shot, "references_from_encoded")

    @property
    def save_bank(self) -> Callable[[Predictor, Path, str], Path] | None:
        """Writes the bank its reference mode scores with (path, storage dtype)."""
        return None if self.few_shot is None else _lazy(self.few_shot, "save_bank")


# The entries' functions import their method when called (the builders below, and
# :func:`_lazy` for the rest), so that reading the registry (the CLI's --help lists the
# names) loads no torch.


def _build_anomalyclip(
    weights: Any, checkpoint: Any, overrides: Mapping[str, Any], device: str, seed: int
) -> Predictor:
    from anomalyclip.methods.anomalyclip.model import create_model

    preset = overrides.get("preset")
    fields = {k: v for k, v in overrides.items() if k != "preset"}
    return create_model(
        checkpoint,
        clip_weights=weights,
        preset=preset,
        overrides=fields,
        device=device,
        seed=seed,
        references_applied=True,  # the assembler applies the bank or refuses
    )


def _build_musc(
    weights: Any, checkpoint: Any, overrides: Mapping[str, Any], device: str, seed: int
) -> Predictor:
    if checkpoint is not None:
        raise ValueError(
            f"--checkpoint {checkpoint}: MuSc has no checkpoint (it learns nothing); drop "
            "--checkpoint, or pass the calibration file `anomalyclip calibrate --method musc` "
            "writes"
        )
    from anomalyclip.methods.musc.factory import create_musc

    return create_musc(weights, overrides={**overrides, "seed": seed}, device=device)


def _build_anomalydino(
    weights: Any, checkpoint: Any, overrides: Mapping[str, Any], device: str, seed: int
) -> Predictor:
    from anomalyclip.methods.anomalydino.model import build_anomalydino

    if checkpoint is not None:
        raise ValueError(
            f"--checkpoint {checkpoint}: AnomalyDINO has no checkpoint (it learns nothing); "
            "drop --checkpoint, or pass the calibration file `anomalyclip calibrate --method "
            "anomalydino` writes"
        )
    settings = dict(overrides)
    size = settings.pop("image_size", None)
    # one input size: the few-shot one with references, the batched one without
    settings.update(image_size=size, zero_shot_size=size)
    return build_anomalydino(weights, overrides=settings, device=device)


def _lazy(module: str, function: str) -> Callable[..., Any]:
    """``module.function``, imported when first called."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{module}.{function}"
    return call


METHODS: dict[str, Method] = {
    "anomalyclip": Method(
        "anomalyclip",
        "learned object-agnostic prompts on a frozen CLIP, image by image",
        _build_anomalyclip,
        has_checkpoint=True,
        trainable=True,
        few_shot="anomalyclip.methods.anomalyclip.few_shot",
        path_scorer=_lazy("anomalyclip.methods.anomalyclip.embedding_cache", "cached_scorer"),
        precisions=("bfloat16", "int8"),
        apply_precision=_lazy("anomalyclip.methods.anomalyclip.quantize", "apply_precision"),
        checkpoint_parts=_lazy("anomalyclip.methods.anomalyclip.few_shot", "checkpoint_parts"),
    ),
    "musc": Method(
        "musc",
        "no prompts, no training: the images given score each other, as one set",
        _build_musc,
        scores_sets=True,
        few_shot="anomalyclip.methods.musc.few_shot",
        encodes_references=True,
        # sets: RsCIN's min-max over the set (0-1); against references: raw distances
        set_scores_match_references=False,
        precisions=("bfloat16",),
        apply_precision=_lazy("anomalyclip.methods.musc.model", "apply_precision"),
    ),
    "anomalydino": Method(
        "anomalydino",
        "a few good parts (--reference): each patch against the nearest DINOv2 patch of "
        "theirs; without references the images given score each other",
        _build_anomalydino,
        scores_sets=True,
        few_shot="anomalyclip.methods.anomalydino.few_shot",
        precisions=("bfloat16",),
        apply_precision=_lazy("anomalyclip.methods.anomalydino.model", "apply_precision"),
    ),
}


def method_named(name: str) -> Method:
    """The registered method ``name``; an unknown name lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown scoring method {name!r}; registered: {', '.join(METHODS)}"
        ) from None


def path_scorer(
    predictor: Predictor, directory: Path | None = None, memory_limit: int | None = None
) -> PathScorer | None:
    """The method's own path engine when ``predictor`` is the bare method (no tiles, no
    references: those score decoded images through the one loop), else None."""
    method, _ = predictor.layers()
    entry = METHODS.get(predictor.method)
    if method is not predictor or entry is None or entry.path_scorer is None:
        return None
    return entry.path_scorer(predictor, directory, memory_limit)


def save_bank(predictor: Predictor, path: Path, dtype: str = "float32") -> Path:
    """Write the reference bank ``predictor`` scores with (under any tiles), in ``dtype``;
    a predictor without references (or a method without a reference mode) is refused."""
    from anomalyclip.methods.references import ReferenceError

    method, _ = predictor.layers()
    entry = METHODS.get(method.method)
    if entry is None or entry.save_bank is None:
        raise ReferenceError(f"{method.method} has no reference bank to save")
    return entry.save_bank(method, path, dtype)

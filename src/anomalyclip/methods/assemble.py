"""The one way to build what is scored: a method, its weights, references and tiles.

The CLI, the service and Python all describe what they want as a :class:`PredictorSpec`
and get a :class:`~anomalyclip.predictor.Predictor` from :func:`assemble`::

    from anomalyclip import PredictorSpec, assemble
    model = assemble(PredictorSpec(checkpoint="line3.pt", tile_size=512))

The order is fixed: the method (or an exported ONNX model), then its reference mode
(the images or bank given, else the bank a checkpoint was calibrated with, found beside
it), then tiles. Rules that hold for every caller live here once: a checkpoint
calibrated with references is used with its bank or refused, saying what to pass; a
calibration file (:mod:`anomalyclip.methods.calibrated`: the thresholds of a method
without a checkpoint) rebuilds what it was made with, its bank checked by content.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalyclip.inputs import gather_images
from anomalyclip.methods import METHODS, Method, method_named
from anomalyclip.methods.anomalyclip.model import recorded_bank
from anomalyclip.methods.calibrated import (
    CalibrationFile,
    CalibrationFileError,
    calibrated,
    recorded_backbone,
)
from anomalyclip.methods.references import ReferenceError, bank_path_for
from anomalyclip.methods.tiled import Tiling, reference_tiles, tiled
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import ImageSource
from anomalyclip.utils.precision import resolve_precision

logger = logging.getLogger(__name__)

__all__ = ["PredictorSpec", "assemble", "build_method", "with_references"]


@dataclass(frozen=True)
class PredictorSpec:
    """What to score with, as data: the same description from every interface.

    ``checkpoint``: the method's learned weights (AnomalyCLIP: a registered name, a file,
    or "none"; None means its default, ``mvtec``); a method without one refuses it.
    ``weights``: the backbone (a registered name or a file); None: the method's default.
    ``overrides``: configuration fields of the method (None values mean "not given").
    ``references``: known-good images (files, folders, globs, CSV lists) or one saved
    bank (``.pt``). ``tile_size``: score in square tiles of that many original pixels.
    ``onnx``: an exported AnomalyCLIP model instead of the torch one. ``calibration``: a
    calibration file; its method, settings, tiles and bank are used (weights and
    overrides given here on top) and its thresholds applied.
    ``onnx``: an exported AnomalyCLIP model instead of the torch one.
    ``precision``: ``float32`` (the default: the reference vectors' arithmetic),
    ``bfloat16``, ``int8`` or ``auto`` (the fastest the hardware runs natively among
    those the method offers; see :mod:`anomalyclip.utils.precision`).
    """

    method: str = "anomalyclip"
    checkpoint: str | Path | None = None
    weights: str | Path | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    references: Sequence[str | Path] = ()
    tile_size: int | None = None
    tile_overlap: float = 0.25
    batch_size: int = 8
    onnx: str | Path | None = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = False
    calibration: str | Path | None = None
    precision: str = "float32"


def assemble(spec: PredictorSpec) -> Predictor:
    """The predictor ``spec`` describes: method, references (or the calibrated bank),
    then tiles."""
    if spec.calibration is not None:
        return _calibrated(spec, Path(spec.calibration))
    if spec.onnx is not None:
        predictor = _onnx_model(spec)
    else:
        method = method_named(spec.method)
        predictor = build_method(spec)
        predictor = _with_references(predictor, method, spec)
    if not spec.tile_size:
        return predictor
    return tiled(predictor, Tiling(spec.tile_size, spec.tile_overlap), spec.batch_size)


def build_method(spec: PredictorSpec) -> Predictor:
    """The method of ``spec`` as it is: no references, no tiles."""
    method = method_named(spec.method)
    predictor = method.build(
        spec.weights, spec.checkpoint, dict(spec.overrides), spec.device, spec.seed
    )
    predictor = _in_precision(predictor, method, spec)
    if method.scores_sets:
        # a set takes minutes on a CPU: a bar over its scoring when the caller shows bars
        predictor.progress = spec.progress  # type: ignore[attr-defined]
    return predictor


def _in_precision(predictor: Predictor, method: Method, spec: PredictorSpec) -> Predictor:
    """``predictor`` in the precision ``spec`` asks for (``auto``: resolved for this
    hardware among the method's precisions); float32 leaves it untouched."""
    offered = (*method.precisions, "float32")
    choice = resolve_precision(spec.precision, spec.device, offered)
    if choice.precision == "float32" and spec.precision == "float32":
        return predictor
    if method.apply_precision is None:  # float32 chosen for a method offering nothing else
        return predictor
    return method.apply_precision(predictor, choice)


def _onnx_model(spec: PredictorSpec) -> Predictor:
    from anomalyclip.methods.anomalyclip.onnx import OnnxAnomalyModel

    if spec.method != "anomalyclip":
        raise ValueError("--onnx scores with an exported AnomalyCLIP; drop --method")
    if spec.references:
        raise ValueError("--reference needs the torch model; drop --onnx")
    assert spec.onnx is not None  # assemble calls this only then
    return OnnxAnomalyModel(spec.onnx)


def with_references(predictor: Predictor, references: Sequence[ImageSource]) -> Predictor:
    """``predictor`` in its method's reference mode for these known-good images, its
    wrappers (tiles) kept: what the service's ``POST /v1/references`` builds."""
    method, wrap = predictor.layers()
    entry = METHODS.get(method.method)
    if entry is None or entry.with_references is None:
        raise ReferenceError(f"{method.method} has no reference mode yet")
    return wrap(entry.with_references(method, predictor.reference_views(references)))


def _with_references(predictor: Predictor, method: Method, spec: PredictorSpec) -> Predictor:
    """The method's reference mode for the references given, else for the bank its
    checkpoint was calibrated with, else the method as it is."""
    recorded = recorded_bank(predictor.settings())
    if not spec.references and recorded is None:
        return predictor
    if method.with_references is None or method.load_bank is None:
        raise ReferenceError(f"--reference is not available for --method {method.name} yet")
    references = list(spec.references)
    if len(references) == 1 and Path(references[0]).suffix == ".pt":
        few_shot = method.load_bank(predictor, Path(references[0]))
    elif references:
        images: Sequence[ImageSource] = gather_images(references)
        if spec.tile_size:
            # the bank from the references' tiles: tiles compared with tiles, one scale
            images = reference_tiles(images, Tiling(spec.tile_size, spec.tile_overlap))
            logger.info("references cut into %d tiles of %d px", len(images), spec.tile_size)
        few_shot = method.with_references(predictor, images)
    else:
        few_shot = _calibrated_bank(predictor, method, spec.checkpoint, recorded)
    shown = few_shot.settings().get("references") or {}
    logger.info("reference bank: %s images", shown.get("count", "?"))
    return few_shot


def _calibrated_bank(
    predictor: Predictor, method: Method, checkpoint: str | Path | None, recorded: str | None
) -> Predictor:
    """The bank found beside a reference-calibrated checkpoint, if it is the one."""
    assert method.load_bank is not None  # _with_references checked it
    path = bank_path_for(checkpoint or "")
    if not path.is_file():
        raise ReferenceError(
            f"the checkpoint was calibrated with reference images, but their bank {path} "
            "is missing; pass --reference with the bank file or the images"
        )
    few_shot = method.load_bank(predictor, path)
    # the bank's identity, recomputed from its content (checkpoints before 0.3 recorded
    # the digest of the embeddings alone)
    shown = few_shot.settings().get("references") or {}
    if recorded not in (shown.get("digest"), shown.get("embeddings_digest")):
        raise ReferenceError(
            f"{path} holds other references than the checkpoint was calibrated with; "
            "pass --reference with the right bank file or images"
        )
    return few_shot


def _calibrated(spec: PredictorSpec, path: Path) -> Predictor:
    """What the calibration file at ``path`` was made with, and its thresholds."""
    record = CalibrationFile.load(path)
    bank = record.bank_path(path)
    if spec.references and bank is not None:
        logger.warning(
            "%s was calibrated with its own references; scoring with the ones given instead: "
            "its thresholds may not hold",
            path,
        )
    given = {k: v for k, v in spec.overrides.items() if v is not None}
    rebuilt = PredictorSpec(
        method=record.method,
        weights=spec.weights if spec.weights is not None else record.weights,
        overrides={**record.overrides, **given},
        references=spec.references or (() if bank is None else (str(bank),)),
        tile_size=spec.tile_size if spec.tile_size is not None else record.tile_size,
        tile_overlap=record.tile_overlap if spec.tile_size is None else spec.tile_overlap,
        batch_size=spec.batch_size,
        device=spec.device,
        seed=spec.seed,
        progress=spec.progress,
    )
    predictor = assemble(rebuilt)
    backbone = recorded_backbone(predictor.settings())
    if record.backbone_sha256 is not None and backbone != record.backbone_sha256:
        raise CalibrationFileError(
            f"{path} was calibrated with the backbone {record.weights} (SHA-256 "
            f"{record.backbone_sha256[:16]}...), not {backbone and backbone[:16]}...: pass "
            "that backbone with --backbone, or calibrate again"
        )
    return calibrated(predictor, record)

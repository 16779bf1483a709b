"""Inspecting collections of images: batching, verdicts, resuming.

:func:`inspect` is the whole workflow behind ``anomalyclip predict`` as one call (the
inputs are gathered by :mod:`anomalyclip.inputs`)::

    model = AnomalyCLIP.from_pretrained("calibrated.pt", clip_weights="ViT-L-14-336px.pt")
    summary = inspect("images/", model, output_dir="out")
    [r.image for r in summary.anomalous]

It is written against the scoring-method seam (:class:`~anomalyclip.predictor.Predictor`)
only, so every method (the torch model, its ONNX export, MuSc) gets it unchanged. The
files each result becomes (overlays, masks, maps, tables) are written by
:mod:`anomalyclip.inspection.files`.

Thresholds come from the model's :class:`~anomalyclip.postprocess.PostProcessor`, given >
calibrated > none: the image verdict is ``score >= image_threshold`` and the defect mask
``map >= pixel_threshold``. Without an image threshold there are no verdicts; without a
pixel threshold no masks are written (and the log says why): a threshold guessed from the
map's range would mark 100 % of one dataset and 0 % of the next as defect.

Results reach ``predictions.jsonl`` a batch at a time, as they are made; the tables, the
summary and the report are written at the end. ``resume=True`` continues a run that was
killed or stopped by a full disk: images already in its JSON Lines are not scored again,
and their results are part of the tables and the report (the run's settings must be the
same, see :mod:`anomalyclip.inspection.run_folder`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalyclip.colormaps import colormap_table
from anomalyclip.decoding import DRAFT_MARGIN
from anomalyclip.inputs import expand_inputs
from anomalyclip.inspection.files import (
    OverlayStyle,
    save_map,
    write_images,
    write_outputs,
)
from anomalyclip.inspection.records import InspectionResult, InspectionSummary
from anomalyclip.inspection.run_folder import (
    DEFAULT_OVERLAY_SIDE,
    OVERLAY_FORMATS,
    OverlayFormat,
    ResultStream,
    check_resumable,
    claim_output_dir,
    finished_records,
)
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import AnomalyPrediction, Predictor, SkippedImage
from anomalyclip.preprocess import ImageLoadError, ImageSource, describe, load_image
from anomalyclip.visualize import colour_scale

logger = logging.getLogger(__name__)

# a centre crop that leaves less than this share of an image unscored is not reported
UNSCORED_TOLERANCE = 0.01

__all__ = ["SkippedImage", "inspect", "iter_predictions"]


def calibration_mismatches(settings: dict[str, Any]) -> list[str]:
    """How a model's settings differ from those its thresholds were calibrated under."""
    recorded = (settings.get("extra") or {}).get("calibrated_with") or {}
    return [
        f"{name} {value} at calibration, {settings.get(name)} now"
        for name, value in recorded.items()
        if name in settings and settings[name] != value
    ]


def output_names(sources: Sequence[ImageSource]) -> list[str]:
    """A distinct file-name stem per source, for its overlay, mask and map.

    A file's stem when no other input shares it; files with the same stem in different
    folders are told apart by their folders below the common one (``good__000``,
    ``crack__000``), and within one folder by their extension (``a_png``, ``a_jpg``).
    In-memory images are ``image_00001`` and so on.
    """
    paths = [Path(s) if isinstance(s, (str, Path)) else None for s in sources]
    names = [p.stem if p is not None else f"image_{index + 1:05d}" for index, p in enumerate(paths)]
    stem_counts = Counter(names)
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        if stem_counts[name] > 1 and paths[index] is not None:
            groups.setdefault(name, []).append(index)
    for indices in groups.values():
        folders = []
        for i in indices:
            path = paths[i]
            assert path is not None  # groups hold only the indices of file sources
            folders.append(os.path.abspath(path.parent))
        root = os.path.commonpath(folders)
        for index, folder in zip(indices, folders, strict=True):
            relative = Path(os.path.relpath(folder, root))
            prefix = "__".join(part for part in relative.parts if part != ".")
            names[index] = f"{prefix}__{names[index]}" if prefix else names[index]
    counts = Counter(names)
    for index, name in enumerate(names):
        path = paths[index]
        if counts[name] > 1 and path is not None and path.suffix:
            names[index] = f"{name}_{path.suffix.lstrip('.').lower()}"
    seen: Counter[str] = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


# scoring ---------------------------------------------------------------------------------


@dataclass
class ScoredImage:
    """A prediction together with the decoded image it came from."""

    index: int
    image: Image.Image
    prediction: AnomalyPrediction
    last_of_batch: bool = False  # the batch's results are all out: time to store them


def iter_predictions(
    model: Predictor,
    sources: Sequence[ImageSource],
    batch_size: int = 8,
    progress: bool = True,
    needed: int | None = None,
    description: str = "predict",
) -> Iterator[ScoredImage | SkippedImage]:
    """Results in input order, one batch in memory at a time.

    Every image is decoded once (``needed``: as ``load_image`` takes it, so a large file
    is decoded reduced); an unreadable one yields a :class:`SkippedImage` (and a
    warning) and the run goes on. A method that scores sets (``model.scores_sets``) gets
    every readable image in one call.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = tqdm(total=len(sources), desc=description, unit="img", disable=not progress)
    pending: list[tuple[int, Image.Image]] = []

    def flush() -> Iterator[ScoredImage]:
        predictions = model.predict_images([image for _, image in pending])
        last = len(pending) - 1
        for position, ((index, image), prediction) in enumerate(
            zip(pending, predictions, strict=True)
        ):
            prediction.source = describe(sources[index])
            yield ScoredImage(index, image, prediction, last_of_batch=position == last)
        bar.update(len(pending))
        pending.clear()

    try:
        for index, source in enumerate(sources):
            try:
                image = load_image(source, needed=needed)
            except ImageLoadError as error:
                logger.warning("skipping %s", error)
                bar.update(1)
                yield SkippedImage(error.source, error.reason)
                continue
            pending.append((index, image))
            if len(pending) == batch_size and not model.scores_sets:
                yield from flush()
        if pending:
            yield from flush()
    finally:
        bar.close()


def inspect(
    sources: str | Path | Sequence[ImageSource],
    model: Predictor,
    output_dir: str | Path | None = None,
    *,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
    jsonl_path: str | Path | None = None,
    maps_dir: str | Path | None = None,
    keep_maps: bool = True,
    alpha: float = 0.5,
    colormap: str = "jet",
    title: str = "AnomalyCLIP inspection",
    overwrite: bool = False,
    overlay_format: OverlayFormat = "auto",
    overlay_max_side: int | None = DEFAULT_OVERLAY_SIDE,
    columns: dict[Path, dict[str, str]] | None = None,
    resume: bool = False,
    identity: dict[str, Any] | None = None,
) -> InspectionSummary:
    """Score images and write what people need to review them.

    ``sources``: a folder, glob, CSV, file or in-memory image, or a list of those. With
    ``output_dir`` it writes predictions.jsonl, predictions.csv, summary.json, overlays/,
    masks/, thumbnails/ and report.html there; ``jsonl_path`` and ``maps_dir``
    (``<name>.npy`` float32 maps at model resolution) work with or without it.
    ``keep_maps=False`` drops each map once written, so memory stays flat over large
    collections. Unreadable inputs are skipped and listed in the summary. An
    ``output_dir`` with another run's results is refused unless ``overwrite``, which
    removes that run's files (:mod:`anomalyclip.inspection.run_folder`). Overlays are PNG
    or JPEG (``overlay_format``; JPEG is about ten times smaller on photographs), scaled down to
    ``overlay_max_side`` when larger; masks stay at the original resolution. ``columns``:
    other cells per image to carry into the records (default: those of the CSV inputs).
    ``resume`` continues the run whose JSON Lines are there (``identity``: what else
    tells models apart beyond their settings, such as the checkpoint's checksum).
    """
    started = time.perf_counter()
    style = OverlayStyle(alpha, colormap, overlay_format, overlay_max_side)
    _check_style(style)
    if isinstance(sources, (str, Path, bytes, Image.Image, np.ndarray)):
        sources = [sources]
    items, listed_columns = expand_inputs(sources)
    names = output_names(items)
    columns = listed_columns if columns is None else columns
    post = model.postprocessor.with_given(image_threshold, pixel_threshold)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        claim_output_dir(out, overwrite, resume)
    if jsonl_path is None and out is not None:
        jsonl_path = out / "predictions.jsonl"
    jsonl = Path(jsonl_path) if jsonl_path is not None else None
    settings = run_settings(model, post, style, maps_dir, identity)
    done = _done_results(model, items, names, columns, jsonl, settings) if resume else {}
    summary = InspectionSummary(
        image_threshold=post.image_threshold,
        image_threshold_source=post.image_threshold_source,
        pixel_threshold=post.pixel_threshold,
        pixel_threshold_source=post.pixel_threshold_source,
        map_range=post.map_range,
        output_dir=str(out) if out is not None else None,
        resumed=len(done),
        false_alarm=post.false_alarm,
        colour_map=style.colormap,
    )
    _log_thresholds(post, model.settings(), writes_masks=out is not None)
    results = dict(done)
    todo = [index for index in range(len(items)) if index not in done]
    kept = [done[index].to_record(post.image_threshold) for index in sorted(done)]
    stream = ResultStream.open(jsonl, settings, kept) if jsonl is not None else None
    side = decoded_side(model, style)  # large files decoded reduced to what is shown
    with stream or contextlib.nullcontext() as written:
        scored = iter_predictions(model, [items[i] for i in todo], batch_size, progress, side)
        for outcome in _scaled(scored, post, summary):
            if isinstance(outcome, SkippedImage):
                summary.skipped.append(outcome)
                continue
            index = todo[outcome.index]
            outcome.prediction.postprocessor = post
            full_map = full_size_map(outcome.prediction)
            cells = columns.get(Path(str(items[index])))
            result = scored_result(outcome.prediction, outcome.image, names[index], full_map, cells)
            if out is not None:
                shown = (outcome.image, outcome.prediction)
                write_images(out, result, *shown, style, full_map, summary.colour_scale)
            if maps_dir is not None:
                result.map = _relative(save_map(maps_dir, outcome.prediction, result.name), out)
            if not keep_maps:
                result.prediction = None
            results[index] = result
            if written is not None:
                written.add(result.to_record(post.image_threshold))
                if outcome.last_of_batch:
                    written.commit()
    summary.results = [results[index] for index in sorted(results)]
    summary.seconds = time.perf_counter() - started
    write_outputs(summary, out, jsonl, written.records if written is not None else [], title)
    _log_outcome(summary)
    return summary


def decoded_side(model: Predictor, style: OverlayStyle) -> int | None:
    """The smallest side ``predict`` decodes a large file to (``load_image``'s ``needed``):
    enough for the model's input and, with a bounded overlay, for its longest side
    (every side kept at least :data:`DRAFT_MARGIN` times this). None (every pixel) for
    tiles and for overlays at full size. A 13,376 x 13,376 PNG with the default 4,096
    overlay side: 4,459 x 4,459, a ninth of the memory."""
    if model.decodes_full_resolution() or style.max_side is None:
        return None
    return max(model.preprocessor.size, -(-style.max_side // DRAFT_MARGIN))


def full_size_map(prediction: AnomalyPrediction) -> np.ndarray | None:
    """The map at the original size, made once and only where a mask needs it (a pixel
    threshold): 716 MB at 13,376 x 13,376."""
    if prediction.postprocessor.pixel_threshold is None:
        return None
    return prediction.map_at_original_size()


def _scaled(
    outcomes: Iterator[ScoredImage | SkippedImage], post: PostProcessor, summary: InspectionSummary
) -> Iterator[ScoredImage | SkippedImage]:
    """The outcomes, the first batch held back until the run's colour scale is set from
    it (a set method's one batch is the whole run): every overlay then shares one scale,
    recorded in the summary and said once."""
    held: list[ScoredImage | SkippedImage] = []
    for outcome in outcomes:
        if summary.colour_scale is not None:
            yield outcome
            continue
        held.append(outcome)
        if isinstance(outcome, ScoredImage) and outcome.last_of_batch:
            maps = [o.prediction.anomaly_map for o in held if isinstance(o, ScoredImage)]
            scale = colour_scale(post.map_range, post.pixel_threshold, maps)
            summary.colour_scale = (scale.low, scale.high)
            summary.colour_scale_source = scale.source
            logger.info("overlay colours: %.4g to %.4g, %s", scale.low, scale.high, scale.source)
            yield from held
            held.clear()
    yield from held


def scored_result(
    prediction: AnomalyPrediction,
    image: Image.Image,
    name: str,
    full_map: np.ndarray | None,
    columns: dict[str, Any] | None,
) -> InspectionResult:
    """The record of one scored image (``predict``'s and ``watch``'s); ``full_map`` is its
    map at the original size (only with a pixel threshold: without one there is no
    defect fraction)."""
    post = prediction.postprocessor
    return InspectionResult(
        image=prediction.source,
        name=name,
        score=float(prediction.score),
        anomalous=post.verdict(prediction.score),
        width=prediction.original_size[0],
        height=prediction.original_size[1],
        map_max=float(prediction.anomaly_map.max()),
        defect_fraction=None if full_map is None else post.defect_fraction(full_map),
        prediction=prediction,
        columns=columns or {},
        scored_share=scored_share(prediction, image.size),
    )


def scored_share(prediction: AnomalyPrediction, size: tuple[int, int]) -> float | None:
    """The share of an image of (width, height) its map covers, where the method scored
    only its centre square (the paper's MuSc crop); None where it scored all of it."""
    preprocessor = prediction.preprocessor
    if preprocessor is None or preprocessor.resize != "center-crop":
        return None
    share = min(size) / max(size)
    return None if share > 1 - UNSCORED_TOLERANCE else share


def _check_style(style: OverlayStyle) -> None:
    """Overlay options checked before any image is scored, not after the first batch."""
    if not 0.0 <= style.alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {style.alpha}")
    colormap_table(style.colormap)
    if style.image_format not in OVERLAY_FORMATS:
        raise ValueError(f"overlay_format must be one of {', '.join(OVERLAY_FORMATS)}")
    if style.max_side is not None and style.max_side < 1:
        raise ValueError(f"overlay_max_side must be positive, got {style.max_side}")


def run_settings(
    model: Predictor,
    post: PostProcessor,
    style: OverlayStyle,
    maps_dir: str | Path | None,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a run's results depend on, kept beside them: a resumed run must match it."""
    return {
        "method": model.method,
        "model": model.settings(),
        "identity": identity or {},
        "image_threshold": post.image_threshold,
        "pixel_threshold": post.pixel_threshold,
        "overlays": dataclasses.asdict(style),
        "maps": None if maps_dir is None else str(Path(maps_dir).resolve()),
    }


def _done_results(
    model: Predictor,
    items: Sequence[ImageSource],
    names: Sequence[str],
    columns: dict[Path, dict[str, str]],
    jsonl: Path | None,
    settings: dict[str, Any],
) -> dict[int, InspectionResult]:
    """The inputs an earlier run in ``jsonl`` scored (by index), matched by path.

    A method that scores sets (MuSc) scores each image against the others, so an
    unfinished set is scored again as a whole: its results are reused only when every
    readable input has one.
    """
    if jsonl is None:
        raise ValueError("resuming needs the earlier run's results: an output folder or file")
    if not jsonl.is_file():
        logger.info("nothing to resume in %s: scoring every image", jsonl)
        return {}
    check_resumable(jsonl, settings)
    records, _ = finished_records(jsonl)
    by_path = {os.path.abspath(r["image"]): r for r in records}
    done: dict[int, InspectionResult] = {}
    for index, item in enumerate(items):
        record = by_path.get(os.path.abspath(item)) if isinstance(item, (str, Path)) else None
        if record is None:
            continue
        try:
            done[index] = InspectionResult.from_record(
                record, names[index], columns.get(Path(str(item)), {})
            )
        except (KeyError, TypeError, ValueError):
            logger.warning("%s: the record of %s is incomplete: scoring it again", jsonl, item)
    missing = [item for index, item in enumerate(items) if index not in done]
    if model.scores_sets and done and any(_readable(item) for item in missing):
        logger.info(
            "%s scores the images of a set against each other: %d of %d are not in %s, "
            "so the whole set is scored again",
            model.method,
            len(missing),
            len(items),
            jsonl,
        )
        return {}
    logger.info(
        "resuming %s: %d of %d images done, %d to score", jsonl, len(done), len(items), len(missing)
    )
    return done


def _readable(source: ImageSource) -> bool:
    try:
        load_image(source)
    except ImageLoadError:
        return False
    return True


def _log_thresholds(post: PostProcessor, settings: dict[str, Any], writes_masks: bool) -> None:
    if post.image_threshold is None:
        logger.info("no image threshold (none given, none calibrated): scores without verdicts")
    if post.pixel_threshold is None and writes_masks:
        logger.info(
            "no pixel threshold (none given, none calibrated): no defect masks written; "
            "pass --pixel-threshold or calibrate with masks (anomalyclip calibrate --masks)"
        )
    mismatches = calibration_mismatches(settings)
    calibrated = "calibrated" in (post.image_threshold_source, post.pixel_threshold_source)
    if calibrated and mismatches:
        logger.warning(
            "the calibrated thresholds do not fit these settings (%s): recalibrate",
            "; ".join(mismatches),
        )


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    return Path(os.path.relpath(path, base)).as_posix()


def _log_outcome(summary: InspectionSummary) -> None:
    verdicts = (
        f", {len(summary.anomalous)} anomalous at threshold {summary.image_threshold:.4g}"
        if summary.image_threshold is not None
        else ""
    )
    logger.info("scored %d images in %.1f s%s", len(summary.results), summary.seconds, verdicts)
    for kind, path in summary.files.items():
        logger.info("wrote %s: %s", kind, path)
    if summary.skipped:
        logger.warning("skipped %d unreadable inputs:", len(summary.skipped))
        for item in summary.skipped:
            logger.warning("  %s: %s", item.image, item.reason)

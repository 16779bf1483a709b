"""Benchmark evaluation: per-class image and pixel metrics, as the paper's tables report them.

Every image is scored once, by the method's own path engine where it has one
(AnomalyCLIP's feature cache, which can also keep the embeddings on disk for later
evaluations of other prompts) or through the Predictor's loop (tiles, references). Maps
are evaluated at model resolution (S x S), against masks resized as the original does
(binary, bilinear, > 0.5). Pixel metrics use only images whose pixels are known (normal
images and anomalous ones with a mask) and only in datasets that have masks; a metric
that is undefined or not applicable is NaN, written "-" in Markdown, empty in CSV and
null in JSON, never a number. The mean row averages each metric over the classes where
it is defined, as the paper averages over classes.

Under ``torchrun`` the work is shared: each class is cut into batches as in a single
process, and batch ``k`` (counted over the whole dataset) is scored by rank ``k mod
world``. Scores and maps go to rank 0 one round of batches at a time, rank 0 computes the
metrics in the original order, and every rank returns the same result. As every batch
holds the same images as in a single process, the numbers are identical to the last bit.

An image that cannot be decoded (or whose mask cannot) is skipped with a warning and
listed with the results instead of aborting the run: one damaged file in thousands must
not cost the evaluation. A batch that fails is probed image by image, so a healthy batch
is still decoded once; every rank skips the same images of the same batches, so sharded
runs stay equal to one process. The tables themselves (and the per-image scores, defect
rows, pooled row and verdicts at the threshold) live in :mod:`anomalyclip.evaluation.tables`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalyclip import distributed
from anomalyclip.data.core import AnomalyDataset, Sample
from anomalyclip.evaluation.metrics import AuproMethod
from anomalyclip.evaluation.tables import (
    METRICS,
    ClassResult,
    Details,
    EvaluationResult,
    ImageScore,
    Pool,
    SkippedSample,
    class_metrics,
    defect_results,
    summary_table,
    write_summary,
)
from anomalyclip.methods import path_scorer
from anomalyclip.predictor import AnomalyPrediction, PathScorer, Predictor
from anomalyclip.preprocess import ImageLoadError, PreProcessor, load_image
from anomalyclip.utils.atomic import atomic_open

__all__ = [
    "METRICS",
    "ClassResult",
    "EvaluationResult",
    "class_metrics",
    "evaluate",
    "load_masks",
    "summary_table",
    "write_summary",
]

logger = logging.getLogger(__name__)


# computing ----------------------------------------------------------------------------


def load_masks(samples: Sequence[Sample], preprocessor: PreProcessor) -> np.ndarray:
    """(N, S, S) bool masks at model resolution, placed as the model's preprocessing
    places the images; normal images are all False."""
    size = preprocessor.size
    masks = np.zeros((len(samples), size, size), dtype=bool)
    for index, sample in enumerate(samples):
        if sample.label and sample.mask is not None:
            masks[index] = preprocessor.load_mask(sample.mask).numpy() > 0.5
    return masks


def say_empty_masks(title: str, samples: Sequence[Sample], masks: np.ndarray) -> int:
    """Warn when anomalous images' masks mark no pixel: they then count as defect-free
    in the pixel metrics, which is nearly always a mask written wrongly (all black, or
    0/1 values in an 8-bit file). Returns how many."""
    empty = [
        str(sample.image)
        for sample, mask in zip(samples, masks, strict=True)
        if sample.label and not mask.any()
    ]
    anomalous = sum(1 for sample in samples if sample.label)
    if empty:
        logger.warning(
            "%s: %d of %d anomalous images have an empty mask (%s%s); their pixels count as "
            "normal in the pixel metrics: check the masks",
            title,
            len(empty),
            anomalous,
            ", ".join(empty[:3]),
            ", ..." if len(empty) > 3 else "",
        )
    return len(empty)


def _load_masks_skipping(
    samples: Sequence[Sample], preprocessor: PreProcessor
) -> tuple[np.ndarray, dict[int, str]]:
    """:func:`load_masks`, with an unreadable mask reported (by position) instead of
    raised: one damaged annotation must not cost the whole evaluation."""
    size = preprocessor.size
    masks = np.zeros((len(samples), size, size), dtype=bool)
    unreadable: dict[int, str] = {}
    for index, sample in enumerate(samples):
        if sample.label and sample.mask is not None:
            try:
                masks[index] = preprocessor.load_mask(sample.mask).numpy() > 0.5
            except ImageLoadError as error:
                logger.warning("skipping %s: its mask is unusable (%s)", sample.image, error)
                unreadable[index] = f"mask {sample.mask}: {error.reason}"
    return masks, unreadable


def map_path(directory: Path, sample: Sample, suffix: str) -> Path:
    """``<category>/<defect>/<stem><suffix>`` under ``directory``."""
    return directory / (sample.category or "all") / sample.defect / f"{sample.image.stem}{suffix}"


def save_outputs(
    sample: Sample,
    prediction: AnomalyPrediction,
    image: Image.Image,
    model_map: np.ndarray,
    maps_dir: Path,
) -> None:
    """The map at model resolution (``maps/…npy``) and an overlay on the original image."""
    from anomalyclip.visualize import render_overlay

    with atomic_open(map_path(maps_dir / "maps", sample, ".npy"), "wb") as handle:
        np.save(handle, model_map.astype(np.float32))
    picture = render_overlay(image, prediction).image
    with atomic_open(map_path(maps_dir / "overlays", sample, ".png"), "wb") as handle:
        picture.save(handle, format="PNG")


@dataclass
class _ClassPlan:
    """One class's images cut into batches, and which rank scores each batch."""

    category: str
    samples: list[Sample]
    batches: list[range]
    owners: list[int]

    def batches_of(self, rank: int) -> list[range]:
        return [b for b, owner in zip(self.batches, self.owners, strict=True) if owner == rank]

    @property
    def rounds(self) -> int:
        """Gathers per class: the most batches any rank has."""
        return max((self.owners.count(r) for r in set(self.owners)), default=0)


def _plan_batches(dataset: AnomalyDataset, batch_size: int, world: int = 1) -> list[_ClassPlan]:
    """Each class's batches as one process makes them; batch ``k`` (counted over the
    dataset) belongs to rank ``k mod world``."""
    plans = []
    counter = 0
    for category, samples in dataset.by_category().items():
        if not samples:
            continue
        batches = [
            range(start, min(start + batch_size, len(samples)))
            for start in range(0, len(samples), batch_size)
        ]
        owners = [distributed.owner(counter + k, world) for k in range(len(batches))]
        counter += len(batches)
        plans.append(_ClassPlan(category, samples, batches, owners))
    return plans


@dataclass
class _Batch:
    """One scored batch: its positions in the class, which of them were scored, their
    scores, map maxima and (if kept) maps, and the skipped ones with why."""

    positions: range
    kept: list[int]
    scores: np.ndarray
    map_max: np.ndarray
    maps: np.ndarray | None
    skipped: dict[int, str]


@dataclass
class _Scored:
    """One class's outputs, assembled on rank 0: NaN scores where an image was skipped."""

    scores: np.ndarray
    map_max: np.ndarray
    maps: np.ndarray | None
    skipped: dict[int, str]


def _split_readable(
    samples: Sequence[Sample], positions: Sequence[int]
) -> tuple[list[int], dict[int, str]]:
    """Which images of a batch decode. Called only once the batch has failed, so a
    healthy batch is decoded once; each bad image is warned about by the rank that
    found it, as ``predict`` does."""
    kept: list[int] = []
    skipped: dict[int, str] = {}
    for index in positions:
        try:
            load_image(samples[index].image)
        except ImageLoadError as error:
            logger.warning("skipping %s", error)
            skipped[index] = error.reason
        else:
            kept.append(index)
    return kept, skipped


def _score_batches(
    model: Predictor,
    scorer: PathScorer,
    plan: _ClassPlan,
    batches: Sequence[range],
    keep_maps: bool,
    maps_dir: Path | None,
    bar: Any,
) -> Iterator[_Batch]:
    """Each batch scored by the method's path engine, its unreadable images skipped. The
    batches are the same in one process and under torchrun, and so are the images left
    in each, so sharded results stay identical to a single process's."""
    size = model.preprocessor.size
    category = plan.samples[0].category if plan.samples else ""
    for positions in batches:
        kept: list[int] = list(positions)
        skipped: dict[int, str] = {}
        scores = np.zeros(0, dtype=np.float64)
        chunk_maps = np.zeros((0, size, size), dtype=np.float32)
        try:
            scores, chunk_maps = scorer.score_paths([plan.samples[i].image for i in kept], category)
        except (ImageLoadError, OSError):
            kept, skipped = _split_readable(plan.samples, positions)
            if not skipped:
                raise
            if kept:
                paths = [plan.samples[i].image for i in kept]
                scores, chunk_maps = scorer.score_paths(paths, category)
        if maps_dir is not None:
            for index, anomaly_map, score in zip(kept, chunk_maps, scores, strict=True):
                image = load_image(plan.samples[index].image)
                prediction = AnomalyPrediction(
                    str(plan.samples[index].image),
                    float(score),
                    anomaly_map,
                    image.size,
                    model.preprocessor,
                    model.postprocessor,
                )
                save_outputs(plan.samples[index], prediction, image, anomaly_map, maps_dir)
        bar.update(len(positions))
        map_max = chunk_maps.reshape(len(kept), -1).max(axis=1) if kept else np.zeros(0)
        yield _Batch(positions, kept, scores, map_max, chunk_maps if keep_maps else None, skipped)


def _assemble(count: int, size: int, keep_maps: bool) -> _Scored:
    return _Scored(
        np.full(count, np.nan, dtype=np.float64),
        np.full(count, np.nan, dtype=np.float64),
        np.zeros((count, size, size), dtype=np.float32) if keep_maps else None,
        {},
    )


def _place(scored: _Scored, part: _Batch) -> None:
    scored.scores[part.kept] = part.scores
    scored.map_max[part.kept] = part.map_max
    if scored.maps is not None and part.maps is not None:
        scored.maps[part.kept] = part.maps
    scored.skipped.update(part.skipped)


def _score_class(
    model: Predictor,
    scorer: PathScorer,
    plan: _ClassPlan,
    keep_maps: bool,
    maps_dir: Path | None,
    bar: Any,
) -> _Scored | None:
    """Image scores (N,) and, if kept, maps (N, S, S) of one class: on rank 0 only.

    Other ranks score their batches and send them to rank 0 a round at a time, so rank 0
    never holds more than one batch per rank besides the class's arrays.
    """
    batches = plan.batches_of(distributed.rank())
    mine = _score_batches(model, scorer, plan, batches, keep_maps, maps_dir, bar)
    return _gathered(plan, mine, model.preprocessor.size, keep_maps)


def _gathered(
    plan: _ClassPlan, mine: Iterator[_Batch], size: int, keep_maps: bool
) -> _Scored | None:
    """Every rank's batches of a class, sent to rank 0 a round at a time: the class's
    arrays on rank 0, None elsewhere."""
    main = distributed.is_main_process()
    scored = _assemble(len(plan.samples), size, keep_maps) if main else None
    for _ in range(plan.rounds):
        gathered = distributed.gather_to_main(next(mine, None))
        for part in gathered or ():
            if part is not None:
                assert scored is not None  # parts are gathered on rank 0, which has the arrays
                _place(scored, part)
    return scored


def _score_class_with(
    model: Predictor,
    plan: _ClassPlan,
    keep_maps: bool,
    maps_dir: Path | None,
    bar: Any,
) -> _Scored | None:
    """A predictor without a path engine, through its own loop: image scores and maps.

    A method that scores sets (MuSc) gets the whole class in one call, as its paper
    evaluates (unreadable images are left out of the set); every rank makes that call,
    since such a method shares the set's work between the ranks itself (MuSc: backbone
    batches and mutual scoring, summed back so every rank holds the whole set), and rank
    0 returns it. Other methods (tiling, references, ONNX) get the class's batches,
    spread over the ranks and gathered on rank 0 as the path engine's are.
    """
    if not model.scores_sets:
        batches = plan.batches_of(distributed.rank())
        mine = _predictor_batches(model, plan, batches, keep_maps, maps_dir, bar, True)
        return _gathered(plan, mine, model.preprocessor.size, keep_maps)
    main = distributed.is_main_process()
    scored = _assemble(len(plan.samples), model.preprocessor.size, keep_maps)
    whole = [range(len(plan.samples))]
    # every rank scores the whole set: rank 0 alone saves maps and names skipped images
    parts = _predictor_batches(model, plan, whole, keep_maps, maps_dir if main else None, bar, main)
    for part in parts:
        _place(scored, part)
    return scored if main else None


def _predictor_batches(
    model: Predictor,
    plan: _ClassPlan,
    batches: Sequence[range],
    keep_maps: bool,
    maps_dir: Path | None,
    bar: Any,
    say_skips: bool,
) -> Iterator[_Batch]:
    """Each batch decoded and scored, its unreadable images skipped (with a warning where
    ``say_skips``)."""
    samples = plan.samples
    preprocessor = model.preprocessor
    for positions in batches:
        kept: list[int] = []
        skipped: dict[int, str] = {}
        images = []
        for index in positions:
            try:
                images.append(load_image(samples[index].image))
            except ImageLoadError as error:
                if say_skips:
                    logger.warning("skipping %s", error)
                skipped[index] = error.reason
            else:
                kept.append(index)
        # the Predictor's own loop, so wrappers (tiles, references, ONNX) score as in predict
        predictions = model.predict_images(images)
        size = preprocessor.size
        chunk_scores = np.array([p.score for p in predictions], dtype=np.float64)
        chunk_maps = np.zeros((len(kept), size, size), dtype=np.float32)
        for position, prediction in enumerate(predictions):
            chunk_maps[position] = _at_model_resolution(prediction, preprocessor)
        if maps_dir is not None:
            for position, (index, image) in enumerate(zip(kept, images, strict=True)):
                prediction = predictions[position]
                save_outputs(samples[index], prediction, image, chunk_maps[position], maps_dir)
        bar.update(len(positions))
        map_max = chunk_maps.reshape(len(kept), -1).max(axis=1) if kept else np.zeros(0)
        maps = chunk_maps if keep_maps else None
        yield _Batch(positions, kept, chunk_scores, map_max, maps, skipped)


def _at_model_resolution(prediction: AnomalyPrediction, preprocessor: PreProcessor) -> np.ndarray:
    """The prediction's map where the masks are: as it is when the method made it at
    model resolution, else (tiles stitched on the original) placed there like the masks."""
    size = preprocessor.size
    if prediction.anomaly_map.shape == (size, size) and prediction.preprocessor == preprocessor:
        return prediction.anomaly_map
    return preprocessor.map_from_original(prediction.map_at_original_size())


def _class_tables(
    dataset: AnomalyDataset,
    plan: _ClassPlan,
    scored: _Scored,
    preprocessor: PreProcessor,
    title: str,
    aupro_method: AuproMethod,
    details: Details,
    pool: Pool,
) -> ClassResult:
    """One class's row, from its scored images (skipped ones left out); its defect rows,
    per-image scores, skipped images and pooled data go to ``details`` and ``pool``."""
    category = plan.category or title
    skipped = dict(scored.skipped)
    samples = plan.samples
    masks = maps = None
    known: list[int] = []
    if scored.maps is not None:
        candidates = [
            i for i, s in enumerate(samples) if i not in skipped and dataset.has_pixel_truth(s)
        ]
        masks, unreadable = _load_masks_skipping([samples[i] for i in candidates], preprocessor)
        for position, reason in unreadable.items():
            skipped[candidates[position]] = reason
        readable = [p for p in range(len(candidates)) if p not in unreadable]
        known = [candidates[p] for p in readable]
        masks = masks[readable]
        say_empty_masks(title, [samples[i] for i in known], masks)
    kept = [i for i in range(len(samples)) if i not in skipped]
    # positions of the pixel-known images among the kept ones
    where = {index: position for position, index in enumerate(kept)}
    labels = np.array([samples[i].label for i in kept], dtype=np.int64)
    scores = scored.scores[kept]
    if scored.maps is not None:
        maps = scored.maps[known]
    values = class_metrics(labels, scores, masks, maps, aupro_method)
    pixels = None
    if masks is not None and maps is not None:
        pixels = (np.array([where[i] for i in known], dtype=np.int64), masks, maps)
    defects = [samples[i].defect for i in kept]
    details.defects += defect_results(category, defects, labels, scores, pixels, aupro_method)
    pool.add(labels, scores, masks, maps)
    for index in sorted(skipped):
        details.skipped.append(SkippedSample(str(samples[index].image), category, skipped[index]))
    for position, index in enumerate(kept):
        sample = samples[index]
        score, peak = float(scores[position]), float(scored.map_max[index])
        details.images.append(
            ImageScore(str(sample.image), category, sample.defect, sample.label, score, peak)
        )
    normal = int((labels == 0).sum())
    return ClassResult(category, normal, len(labels) - normal, values)


def evaluate(
    model: Predictor,
    dataset: AnomalyDataset,
    *,
    batch_size: int = 8,
    scorer: PathScorer | None = None,
    aupro_method: AuproMethod = "original",
    maps_dir: str | Path | None = None,
    name: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Score every image of ``dataset`` and compute the metrics of every class.

    ``model``: any :class:`Predictor`. A bare method with a path engine (``scorer``,
    default: the method's own, :func:`anomalyclip.methods.path_scorer`; AnomalyCLIP's
    encodes each image once through its feature cache and scores each class with its
    own name under object-aware prompts) scores files by path; anything else (tiles,
    references, ONNX) scores decoded images through the Predictor's loop, as
    ``predict`` does. Batches are shared between the ranks under torchrun; a method that
    scores sets (MuSc) scores each class as one set. ``maps_dir`` receives
    ``maps/<class>/<defect>/<stem>.npy`` and ``overlays/…png``. ``name`` titles the table
    (default: the dataset's reader name). An image that cannot be decoded, or whose mask
    cannot, is skipped with a warning and listed in ``details.skipped``; the metrics are
    those of the rest.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if scorer is None:
        scorer = path_scorer(model)
    size = model.preprocessor.size
    title = name or dataset.name
    pixel_level = dataset.has_masks
    if not pixel_level:
        logger.info("%s has no masks: pixel-level metrics are not applicable", title)
    maps_dir = Path(maps_dir) if maps_dir is not None else None
    # batches spread over the ranks, except a set method's (it shares a set's work itself)
    sharded = not model.scores_sets
    plans = _plan_batches(dataset, batch_size, distributed.world_size() if sharded else 1)
    rank = distributed.rank() if sharded else 0
    mine = sum(len(b) for plan in plans for b in plan.batches_of(rank))
    bar = tqdm(
        total=mine,
        desc=f"test {title}",
        unit="img",
        disable=not (progress and distributed.is_main_process()),
    )
    postprocessor = model.postprocessor
    details = Details(
        threshold=postprocessor.image_threshold,
        threshold_source=postprocessor.image_threshold_source,
    )
    pool = Pool()
    classes = []
    for plan in plans:
        if scorer is not None:
            scored = _score_class(model, scorer, plan, pixel_level, maps_dir, bar)
        else:
            scored = _score_class_with(model, plan, pixel_level, maps_dir, bar)
        if scored is None:
            continue  # another rank than 0: rank 0 computes the metrics
        classes.append(
            _class_tables(
                dataset, plan, scored, model.preprocessor, title, aupro_method, details, pool
            )
        )
    bar.close()
    if distributed.is_main_process():
        details.pooled = pool.result(aupro_method)
        if details.skipped:
            logger.warning(
                "%s: %d images skipped, metrics computed on the other %d (listed in the tables)",
                title,
                len(details.skipped),
                len(details.images),
            )
    classes, details = distributed.broadcast_from_main((classes, details))
    settings = {
        "root": str(dataset.root),
        "split": dataset.split,
        "method": model.method,
        "config": model.settings(),
        "aupro": aupro_method,
        "map_resolution": size,
    }
    return EvaluationResult(title, classes, settings, details)

"""``anomalyclip watch``: a folder scored file by file as a line fills it.

The files already in the folder are scored first, then each new one once it is closed
for writing, into a run folder written exactly as ``predict`` writes one
(``predictions.jsonl`` a result at a time, the CSV, summary and report after each round,
overlays and thumbnails), each record carrying the bank it was judged with
(:mod:`anomalyclip.inspection.stream`). A killed watch continues with ``resume``: the
records on disk are kept, the bank is rebuilt from them in order, and the files not yet
recorded are scored as they would have been.

Why polling, not inotify: cameras and line PCs usually drop files on network shares
(SMB, NFS), where inotify sees nothing of writes made by other machines; polling works on
every file system and needs no extra package. A file is taken as closed for writing when
its size and modification time are the same over two polls (``poll_interval`` apart) and
its size is not zero; files are taken in name order within a poll, so a resumed run
scores in the order an uninterrupted one did.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalyclip.inspection.bank import image_sha256
from anomalyclip.inspection.files import OverlayStyle, write_images, write_outputs
from anomalyclip.inspection.records import InspectionResult, InspectionSummary
from anomalyclip.inspection.run import full_size_map, run_settings, scored_result
from anomalyclip.inspection.run_folder import (
    ResultStream,
    check_resumable,
    claim_output_dir,
    finished_records,
)
from anomalyclip.inspection.stream import StreamItem, StreamResult, StreamScorer
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor, SkippedImage
from anomalyclip.preprocess import IMAGE_EXTENSIONS, ImageLoadError, load_image
from anomalyclip.visualize import colour_scale

logger = logging.getLogger(__name__)

__all__ = ["FolderPoller", "WatchOptions", "watch"]


@dataclass
class FolderPoller:
    """The image files of a folder that are closed for writing (see module notes)."""

    folder: Path
    seen: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def poll(self) -> tuple[list[Path], int]:
        """Files stable since the last poll (name order), and how many are still changing."""
        now: dict[Path, tuple[int, int]] = {}
        for entry in os.scandir(self.folder):
            path = Path(entry.path)
            if entry.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:  # removed between the listing and the stat
                continue
            if entry.is_file():
                now[path] = (stat.st_size, stat.st_mtime_ns)
        ready = sorted(p for p, s in now.items() if s[0] > 0 and self.seen.get(p) == s)
        changing = sum(1 for p in now if p not in ready)
        self.seen = now
        return ready, changing


@dataclass(frozen=True)
class WatchOptions:
    """How ``watch`` runs: the rolling bank's size, stop when the folder is done
    (``once``), the poll interval, thresholds, and the run folder's rules."""

    window: int = 32
    once: bool = False
    poll_interval: float = 1.0
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    resume: bool = False
    overwrite: bool = False
    style: OverlayStyle = field(default_factory=lambda: OverlayStyle(0.5, "jet", "png", None))
    identity: dict[str, Any] = field(default_factory=dict)
    title: str = "anomalyclip watch"


class _RunFolder:
    """The run folder a watch appends to, and the summary it keeps up to date."""

    def __init__(self, out: Path, stream: ResultStream, summary: InspectionSummary) -> None:
        self.out = out
        self.stream = stream
        self.summary = summary

    def add(self, outcome: StreamResult, post: PostProcessor, style: OverlayStyle) -> None:
        prediction = outcome.prediction
        prediction.postprocessor = post
        prediction.source = str(outcome.item.source)
        image = outcome.item.image
        full_map = full_size_map(prediction)
        extra = outcome.extra_fields()
        result = scored_result(prediction, image, outcome.item.name, full_map, extra)
        result.prediction = None  # a watch runs for days: maps are not kept
        scale = self.summary.colour_scale
        write_images(self.out, result, image, prediction, style, full_map, scale)
        self.stream.add(result.to_record(post.image_threshold))
        self.stream.commit()  # one line per image: a kill loses at most the one being scored
        self.summary.results.append(result)

    def write(self, started: float) -> None:
        self.summary.seconds = time.perf_counter() - started
        write_outputs(
            self.summary,
            self.out,
            self.stream.path,
            self.stream.records,
            "anomalyclip watch",
        )


def watch(
    folder: str | Path,
    model: Predictor,
    output_dir: str | Path,
    options: WatchOptions | None = None,
    stop: Callable[[], bool] | None = None,
) -> InspectionSummary:
    """Score the images of ``folder`` as they arrive into ``output_dir`` (see module).

    Returns when ``options.once`` and every file there is scored, or when ``stop()``
    says so (checked between polls); else it runs until interrupted.
    """
    options = options or WatchOptions()
    source, out = Path(folder), Path(output_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder to watch")
    started = time.perf_counter()
    # the given threshold, else the calibrated one (refused where on another scale than
    # the bank's scores), checked before the output folder is claimed
    scorer = StreamScorer(model, options.window, options.image_threshold)
    claim_output_dir(out, options.overwrite, options.resume)
    post = model.postprocessor.with_given(options.image_threshold, options.pixel_threshold)
    settings = run_settings(model, post, options.style, None, options.identity)
    settings["stream"] = {"folder": str(source.resolve()), "window": options.window}
    jsonl = out / "predictions.jsonl"
    kept = _resumed(jsonl, settings, scorer) if options.resume else []
    summary = InspectionSummary(
        image_threshold=post.image_threshold,
        image_threshold_source=post.image_threshold_source,
        pixel_threshold=post.pixel_threshold,
        pixel_threshold_source=post.pixel_threshold_source,
        map_range=post.map_range,
        output_dir=str(out),
        resumed=len(kept),
        colour_map=options.style.colormap,
    )
    # images arrive one by one, with no first batch to take a range from: the threshold
    # mid-scale, else the method's map range (as the service draws)
    scale = colour_scale(post.map_range, post.pixel_threshold)
    summary.colour_scale, summary.colour_scale_source = (scale.low, scale.high), scale.source
    names: set[str] = set()
    for record in kept:
        name = _unique_name(Path(record["image"]), names)
        summary.results.append(InspectionResult.from_record(record, name, _extras(record)))
    done = {os.path.abspath(record["image"]) for record in kept}
    with ResultStream.open(jsonl, settings, kept) as stream:
        run = _RunFolder(out, stream, summary)
        for items in _arrivals(source, options, (done, names), summary, stop):
            for item in items:
                done.add(os.path.abspath(item.source))  # type: ignore[arg-type]
            batches = [[item] for item in items] if items else [[]]
            for batch in batches:  # one at a time: each result is on disk before the next
                outcomes = scorer.submit(batch) if batch else scorer.seed()
                for outcome in outcomes:
                    run.add(outcome, post, options.style)
                if outcomes:
                    run.write(started)
                    logger.info(
                        "%d scored; bank %s of %d images",
                        len(summary.results),
                        scorer.bank.id,
                        scorer.bank.size,
                    )
        for item in scorer.pending:
            reason = f"{model.method} needs a set of at least 2 to start its bank"
            summary.skipped.append(SkippedImage(str(item.source), reason))
        run.write(started)
    return summary


def _arrivals(
    source: Path,
    options: WatchOptions,
    taken: tuple[set[str], set[str]],
    summary: InspectionSummary,
    stop: Callable[[], bool] | None,
) -> Iterator[list[StreamItem]]:
    """Each poll's new readable files as stream items; with ``once``, an empty list last
    (what is waiting for a set is then scored), once nothing is changing. ``taken``: the
    files done (absolute paths) and the output names in use."""
    done, names = taken
    poller = FolderPoller(source)
    first = True
    while True:
        ready, changing = poller.poll()
        fresh = [path for path in ready if os.path.abspath(path) not in done]
        items = []
        for path in fresh:
            try:
                image = load_image(path)
            except ImageLoadError as error:
                logger.warning("skipping %s", error)
                summary.skipped.append(SkippedImage(error.source, error.reason))
                done.add(os.path.abspath(path))
                continue
            items.append(
                StreamItem(str(path), image_sha256(path), _unique_name(path, names), image)
            )
        if items:
            yield items
        if options.once and not first and changing == 0:
            yield []
            return
        if stop is not None and stop():
            return
        first = False
        time.sleep(options.poll_interval)


def _unique_name(path: Path, names: set[str]) -> str:
    name = path.stem if path.stem not in names else f"{path.stem}_{path.suffix.lstrip('.')}"
    names.add(name)
    return name


BANK_FIELDS = (
    "sha256",
    "phase",
    "bank_id",
    "bank_size",
    "bank_admitted",
    "admission_threshold",
)


def _extras(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in BANK_FIELDS}


def _resumed(jsonl: Path, settings: dict[str, Any], scorer: StreamScorer) -> list[dict[str, Any]]:
    """The records of the run being continued, with the bank rebuilt from them."""
    if not jsonl.is_file():
        logger.info("nothing to resume in %s: watching from the start", jsonl)
        return []
    check_resumable(jsonl, settings)
    records, _ = finished_records(jsonl)
    for record in records:
        scorer.replay(record, record["image"])
    logger.info(
        "resuming %s: %d images done, bank %s of %d images",
        jsonl,
        len(records),
        scorer.bank.id,
        scorer.bank.size,
    )
    return records

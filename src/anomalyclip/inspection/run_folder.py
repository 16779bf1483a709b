"""An output folder belongs to one run: stale overlays beside a new report mislead.

A folder that holds another run's results (its ``summary.json`` or
``predictions.jsonl``) is refused unless the caller asks to overwrite or to resume;
overwriting removes exactly the files that run listed (its overlays, masks, thumbnails
and maps inside the folder, and its tables and report), never anything else a user keeps
there. Resuming continues that run, and only with the settings it was made with.

Results are streamed to the JSON Lines file (:class:`ResultStream`) a batch at a time,
so that a run killed or stopped by a full disk keeps every finished image; the settings
of the run go beside it (``<stem>.run.json``) before the first result, so that a resumed
run can be held to them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal, get_args

from anomalyclip.utils.atomic import atomic_open, atomic_write_json, write_failure

logger = logging.getLogger(__name__)

# How overlays may be stored (PNG, or JPEG for photographs: about ten times smaller).
OverlayFormat = Literal["auto", "png", "jpeg"]

# Overlays are for people: a 120-megapixel photo's full-size PNG overlay is 75 MB and
# takes gigabytes to draw. By default ("auto") overlays are at most this side, and JPEG
# for originals over LARGE_PHOTO_PIXELS (PNG, exact, below). Masks stay full size.
DEFAULT_OVERLAY_SIDE = 4096
LARGE_PHOTO_PIXELS = 4_000_000
OVERLAY_FORMATS: tuple[str, ...] = get_args(OverlayFormat)

RUN_FILES = (
    "predictions.jsonl",
    "predictions.run.json",
    "predictions.csv",
    "summary.json",
    "report.html",
)
RECORD_FILES = ("overlay", "mask", "thumbnail", "map")
RUN_FOLDERS = ("overlays", "masks", "thumbnails")


class OutputFolderInUse(ValueError):
    """The output folder holds another run's results and overwriting was not asked for."""


def check_output_dir(folder: Path, overwrite: bool, resume: bool = False) -> list[str]:
    """The earlier run's marks in ``folder``; refuse (changing nothing) where they may not
    be replaced or continued. Callers check this before loading weights: minutes lost to
    a refusal that was known from the start are a bug."""
    if overwrite and resume:
        raise ValueError("--overwrite starts again and --resume continues: pass one of them")
    marks = [name for name in ("summary.json", "predictions.jsonl") if (folder / name).is_file()]
    if marks and not (overwrite or resume):
        raise OutputFolderInUse(
            f"{folder} holds the results of an earlier run ({', '.join(marks)}, "
            f"{len(_previous_files(folder))} files in all); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output-dir"
        )
    return marks


def claim_output_dir(folder: Path, overwrite: bool, resume: bool = False) -> None:
    """Make ``folder`` ready for a new run's files (or the rest of an earlier run's, with
    ``resume``), or refuse naming what is there."""
    marks = check_output_dir(folder, overwrite, resume)
    if resume or overwrite:
        _remove_leftover_temporaries(folder)
    if not marks or resume:
        return
    previous = _previous_files(folder)
    for path in previous:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for name in RUN_FOLDERS:
        with contextlib.suppress(OSError):  # kept when something else lives there
            (folder / name).rmdir()
    logger.info("removed %d files of the earlier run in %s", len(previous), folder)


def _previous_files(folder: Path) -> list[Path]:
    """The files the earlier run wrote, as its JSON Lines lists them, inside ``folder``."""
    root = folder.resolve()
    files = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    records = folder / "predictions.jsonl"
    if records.is_file():
        for line in records.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key in RECORD_FILES:
                value = record.get(key) if isinstance(record, dict) else None
                if not isinstance(value, str) or not value:
                    continue
                path = (folder / value).resolve()
                if path.is_relative_to(root) and path.is_file():
                    files.append(path)
    return list(dict.fromkeys(files))


def _remove_leftover_temporaries(folder: Path) -> None:
    """The ``.<name>.*.tmp`` files of writes a kill interrupted (:func:`atomic_open`)."""
    for sub in (folder, *(folder / name for name in RUN_FOLDERS)):
        for path in sub.glob(".*.tmp") if sub.is_dir() else ():
            with contextlib.suppress(OSError):
                path.unlink()


# the streamed results --------------------------------------------------------------------


class CannotResume(ValueError):
    """The results on disk were made with other settings, or without a record of them."""


def settings_path(jsonl: Path) -> Path:
    """Where the settings of the run that writes ``jsonl`` are kept: ``<stem>.run.json``."""
    return jsonl.with_name(f"{jsonl.stem}.run.json")


def finished_records(jsonl: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete records of ``jsonl`` in order, and how many lines were left out.

    A line is complete when it ends with a newline and holds a JSON object with an
    ``image``: a line a kill or a full disk cut short is left out (and said).
    """
    if not jsonl.is_file():
        return [], 0
    records: list[dict[str, Any]] = []
    dropped = 0
    for line in jsonl.read_bytes().splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("image"), str):
            records.append(record)
        elif line.strip():
            dropped += 1
    if dropped:
        logger.info(
            "%s: %d incomplete lines left out (a run stopped while writing)", jsonl, dropped
        )
    return records, dropped


def check_resumable(jsonl: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to add to ``jsonl`` results made with other settings, naming what differs."""
    recorded_at = settings_path(jsonl)
    try:
        recorded = json.loads(recorded_at.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CannotResume(
            f"cannot resume {jsonl}: {recorded_at.name} (the settings it was made with) is "
            "missing; pass --overwrite to start again"
        ) from None
    except (OSError, ValueError) as error:
        raise CannotResume(
            f"cannot resume {jsonl}: {recorded_at} is unreadable ({error})"
        ) from None
    differences = _differences(recorded, _as_json(settings))
    if differences:
        shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
        raise CannotResume(
            f"cannot resume {jsonl}: it was made with other settings ({shown}); run with "
            "those, or pass --overwrite to start again"
        )


def _as_json(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), to compare with a record."""
    return json.loads(json.dumps(value, allow_nan=False))


def _differences(then: Any, now: Any, name: str = "") -> list[str]:
    if isinstance(then, dict) and isinstance(now, dict):
        found = []
        for key in dict.fromkeys([*then, *now]):
            path = f"{name}.{key}" if name else str(key)
            found += _differences(then.get(key), now.get(key), path)
        return found
    if then == now:
        return []
    return [f"{name or 'settings'} {json.dumps(then)} then, {json.dumps(now)} now"]


class ResultStream:
    """``predictions.jsonl`` written as results come: one flush per batch, whole lines only.

    A batch's lines go out in one write and are flushed before the next batch is scored,
    so a kill leaves every finished batch's lines; a write that fails (full disk) is cut
    back to the last whole line and raised as :class:`WriteFailedError` naming the file.
    """

    def __init__(self, path: Path, handle: IO[bytes]) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._handle = handle
        self._pending: list[dict[str, Any]] = []

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, path: str | Path, settings: Mapping[str, Any], kept: Iterable[dict[str, Any]] = ()
    ) -> Iterator[ResultStream]:
        """A stream into ``path`` that starts with the ``kept`` records of an earlier run
        (the file is rewritten only when they are not what it holds)."""
        path = Path(path)
        kept = list(kept)
        atomic_write_json(settings_path(path), _as_json(settings))
        try:
            if kept and finished_records(path) != (kept, 0):
                with atomic_open(path, "wb") as rewrite:
                    rewrite.write(_lines(kept))
            # Unbuffered: each batch is one write() the system has as soon as it returns.
            handle = open(path, "ab" if kept else "wb", buffering=0)  # noqa: SIM115
        except OSError as error:
            raise (write_failure(path, error) or error) from error
        stream = cls(path, handle)
        stream.records = kept
        try:
            yield stream
        finally:
            handle.close()

    def add(self, record: dict[str, Any]) -> None:
        """Hold ``record`` until its batch is :meth:`commit`-ted."""
        self._pending.append(record)

    def commit(self) -> None:
        """Write the held records as whole lines and flush them to the file."""
        if not self._pending:
            return
        start = self._handle.tell()
        data = memoryview(_lines(self._pending))
        try:
            while data:  # a short write is followed by one that raises (ENOSPC)
                written = self._handle.write(data)
                if not written:
                    raise OSError(errno.EIO, "the file took no more bytes")
                data = data[written:]
        except OSError as error:
            with contextlib.suppress(OSError):
                self._handle.truncate(start)
            raise (write_failure(self.path, error) or error) from error
        self.records += self._pending
        self._pending = []


def _lines(records: Iterable[dict[str, Any]]) -> bytes:
    """JSON Lines; NaN and infinity refused (they are not JSON)."""
    return "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode("utf-8")

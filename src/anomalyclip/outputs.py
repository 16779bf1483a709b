"""An output folder belongs to one run: stale overlays beside a new report mislead.

A folder that holds another run's results (its ``summary.json`` or
``predictions.jsonl``) is refused unless the caller asks to overwrite; overwriting
removes exactly the files that run listed (its overlays, masks, thumbnails and maps
inside the folder, and its tables and report), never anything else a user keeps there.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

RUN_FILES = ("predictions.jsonl", "predictions.csv", "summary.json", "report.html")
RECORD_FILES = ("overlay", "mask", "thumbnail", "map")
RUN_FOLDERS = ("overlays", "masks", "thumbnails")


class OutputFolderInUse(ValueError):
    """The output folder holds another run's results and overwriting was not asked for."""


def claim_output_dir(folder: Path, overwrite: bool) -> None:
    """Make ``folder`` ready for a new run's files, or refuse naming what is there."""
    marks = [name for name in ("summary.json", "predictions.jsonl") if (folder / name).is_file()]
    if not marks:
        return
    previous = _previous_files(folder)
    if not overwrite:
        raise OutputFolderInUse(
            f"{folder} holds the results of an earlier run ({', '.join(marks)}, "
            f"{len(previous)} files in all); pass --overwrite to replace them, or choose "
            "another --output-dir"
        )
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

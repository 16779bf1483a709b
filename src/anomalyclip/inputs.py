"""What a user points the tools at, turned into a list of image files.

Files as given, folders searched recursively (links followed once, annotation folders
skipped and said), glob patterns, and CSV lists with a column ``image`` whose other
columns travel into the results. One module for ``predict``, ``calibrate``, references
and the Python API, so that every command reads the same inputs the same way.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anomalyclip.preprocess import IMAGE_EXTENSIONS, ImageSource

logger = logging.getLogger(__name__)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class ImageRow:
    """One row of an image list CSV: the image and, for calibration, its label and mask."""

    image: Path
    label: str | None = None
    mask: Path | None = None
    columns: dict[str, str] = field(default_factory=dict)  # every cell but the image's


def read_image_csv(path: str | Path) -> list[ImageRow]:
    """Rows of a CSV with a column ``image`` (optional ``label``, ``mask``).

    Paths are relative to the CSV's folder unless absolute. Listed files are not checked
    here: a missing one is skipped, and reported, when it is read.
    """
    path = Path(path)
    base = path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "image" not in columns:
                raise ValueError(
                    f"{path}: an image list needs a column 'image' "
                    f"(found: {', '.join(columns) or 'no header'})"
                )
            rows = []
            for raw in reader:
                number = reader.line_num  # blank lines and quoted line breaks counted
                if None in raw:  # DictReader files the cells beyond the header under None
                    cells = len(raw) - 1 + len(raw[None])
                    raise ValueError(
                        f"{path}, line {number}: {cells} cells, but the header names "
                        f"{len(columns)} columns"
                    )
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
                if not row.get("image"):
                    raise ValueError(f"{path}, line {number}: the 'image' cell is empty")
                mask = row.get("mask") or None
                rows.append(
                    ImageRow(
                        base / row["image"],
                        row.get("label") or None,
                        base / mask if mask else None,
                        {k: v for k, v in row.items() if k and k != "image"},
                    )
                )
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a UTF-8 text CSV: {error}") from None
    except csv.Error as error:
        raise ValueError(f"{path} is not a readable CSV: {error}") from None
    if not rows:
        raise ValueError(f"{path} lists no images")
    return rows


# Folders that dataset layouts use for annotations, not product images (MVTec AD's
# ground_truth/, VisA's Masks/, the masks/ of folder datasets), compared case-insensitively.
ANNOTATION_FOLDERS = frozenset({"ground_truth", "groundtruth", "masks", "mask", "gt"})


def _nothing_at(item: str | Path, path: Path) -> str:
    """Why an input gave no images: a path that does not exist is not an empty folder."""
    if path.is_dir():
        return f"no images found in folder {item}"
    if glob.has_magic(str(item)):
        return f"no image files match {item}"
    return f"{item} does not exist"


@dataclass
class GatheredInputs:
    """The image files the inputs name, and the other cells of those a CSV list names
    (label, category, ...: a user's own annotations, carried beside the scores)."""

    images: list[Path]
    columns: dict[Path, dict[str, str]] = field(default_factory=dict)


def gather_images(
    inputs: Sequence[str | Path],
    include_annotations: bool = False,
    exclude: Sequence[str | Path | None] = (),
) -> list[Path]:
    """The image files of :func:`gather_inputs`."""
    return gather_inputs(inputs, include_annotations, exclude).images


def gather_inputs(
    inputs: Sequence[str | Path],
    include_annotations: bool = False,
    exclude: Sequence[str | Path | None] = (),
) -> GatheredInputs:
    """Files as given, folders searched recursively, glob patterns expanded, CSV lists read.

    Folders are walked following symbolic links (each real folder once) and keep image
    files (by extension, case-insensitive), skipping hidden names and, unless
    ``include_annotations``, the annotation folders of :data:`ANNOTATION_FOLDERS` (the
    skip is logged once). Files without an extension and broken links are kept, so that
    reading them reports them (decoded if they are images, else listed as skipped).
    Matches are sorted per input and duplicates dropped. An input that matches nothing
    raises FileNotFoundError naming it. Folders in ``exclude`` (a run's own output
    folder inside its input folder: its overlays and thumbnails are not parts) are never
    searched, wherever they are met. Each CSV list is read once, for its images and their
    other columns alike.
    """
    found: list[Path] = []
    columns: dict[Path, dict[str, str]] = {}
    skipped_annotations: list[Path] = []
    excluded = {os.path.realpath(folder) for folder in exclude if folder is not None}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = _walk(path, include_annotations, skipped_annotations, excluded)
        elif path.is_file() and path.suffix.lower() == ".csv":
            rows = read_image_csv(path)
            matches = [row.image for row in rows]
            columns.update((row.image, row.columns) for row in rows)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(
                Path(p)
                for p in glob.glob(str(item), recursive=True)
                if Path(p).is_file() and is_image_file(Path(p))
            )
        if not matches:
            raise FileNotFoundError(_nothing_at(item, path))
        logger.debug("%s: %d images", item, len(matches))
        found.extend(matches)
    if skipped_annotations:
        folders = sorted({str(p) for p in skipped_annotations})
        logger.info(
            "not scoring annotation folders (%s%s); pass --include-annotations to score them",
            ", ".join(folders[:3]),
            f" and {len(folders) - 3} more" if len(folders) > 3 else "",
        )
    return GatheredInputs(list(dict.fromkeys(found)), columns)


def _walk(
    root: Path, include_annotations: bool, skipped: list[Path], excluded: set[str]
) -> list[Path]:
    matches: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree: walked already
            subfolders.clear()
            continue
        seen.add(real)
        if real in excluded:
            logger.info("not reading %s: it is this run's own output", folder)
            subfolders.clear()
            continue
        here = Path(folder)
        kept = []
        for name in sorted(subfolders):
            if name.startswith("."):
                continue
            if not include_annotations and name.lower() in ANNOTATION_FOLDERS:
                skipped.append(here / name)
                continue
            kept.append(name)
        subfolders[:] = kept
        for name in files:
            candidate = here / name
            if name.startswith("."):
                continue
            if is_image_file(candidate) or not candidate.suffix:
                matches.append(candidate)
    return sorted(matches)


def expand_sources(sources: Sequence[ImageSource]) -> list[ImageSource]:
    """Folders, CSV lists and glob patterns expanded; files and in-memory images kept.

    A file that does not exist is kept too: it is skipped, and reported, when read.
    """
    return expand_inputs(sources)[0]


def expand_inputs(
    sources: Sequence[ImageSource],
) -> tuple[list[ImageSource], dict[Path, dict[str, str]]]:
    """:func:`expand_sources`, with the other columns of the images CSV lists name (each
    list read once)."""
    items: list[ImageSource] = []
    columns: dict[Path, dict[str, str]] = {}
    for source in sources:
        if isinstance(source, (str, Path)) and _is_collection(Path(source)):
            gathered = gather_inputs([source])
            items.extend(gathered.images)
            columns.update(gathered.columns)
        else:
            items.append(source)
    return items, columns


def _is_collection(path: Path) -> bool:
    if path.is_dir():
        return True
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return glob.has_magic(str(path))

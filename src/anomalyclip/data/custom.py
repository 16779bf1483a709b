"""Users' own data: a folder per label, or a CSV manifest.

Folder dataset::

    root/good/*.png             normal images (``normal=``)
    root/scratch/*.png          one folder per defect type (``anomalous=``, default: the rest)
    root/masks/scratch/a_mask.png   optional masks (``masks=``), matched by stem plus
    root/masks/a_mask.png           ``mask_suffix``, in a per-defect sub-folder or not

CSV manifest (header required; paths relative to the CSV file, or absolute; inside the
CSV's folder unless outside paths are allowed, :mod:`anomalyclip.data.paths`)::

    image,label,mask,category,defect
    good/001.png,0,,bottle,
    bad/002.png,1,masks/002.png,bottle,scratch

``label`` is 0/1, a word (normal, good, ok / anomalous, anomaly, abnormal, bad, defect,
ng) or a number in [0, 1] read as a probability of a defect, anomalous from 0.5 on
(:func:`~anomalyclip.data.core.parse_label`; 0.0/1.0 included); ``mask``, ``category``
and ``defect`` may be left out. Masks make the dataset pixel-level. The normal folder,
when not named, is the first of good/, normal/, ok/ that exists (as detection decides).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from anomalyclip.data.core import (
    NORMAL_DEFECT,
    UNKNOWN_DEFECT,
    AnomalyDataset,
    DatasetError,
    MaskIndex,
    MaskMismatch,
    Sample,
    find_child,
    list_dirs,
    list_images,
    parse_label,
)
from anomalyclip.data.paths import listed_path

MASK_DIR_NAMES = ("masks", "mask", "ground_truth", "groundtruth", "gt")
# The normal folder when none is named, in this order: for read_folder and detection alike.
NORMAL_FOLDER_NAMES = ("good", "normal", "ok")
MANIFEST_COLUMNS = ("image", "label", "mask", "category", "defect")


def find_mask_dir(root: Path) -> Path | None:
    """The conventional mask folder of ``root`` (``masks/``, ``ground_truth/``, ...)."""
    for name in MASK_DIR_NAMES:
        folder = find_child(root, name)
        if folder is not None and folder.is_dir():
            return folder
    return None


def read_folder(
    root: str | Path,
    *,
    normal: str | Path | None = None,
    anomalous: Sequence[str | Path] | None = None,
    masks: str | Path | None = None,
    mask_suffix: str = "_mask",
    category: str | None = None,
    name: str = "folder",
    split: str = "test",
    allow_missing_masks: bool = False,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
) -> AnomalyDataset:
    """Images sorted into a normal folder and anomalous folders; one category.

    ``normal`` defaults to the first of :data:`NORMAL_FOLDER_NAMES` present. Folders are
    relative to ``root`` unless absolute. ``anomalous`` defaults to every
    other sub-folder of ``root`` except mask folders. A mask for ``scratch/a.png`` is
    ``<masks>/scratch/a<mask_suffix>.*`` or ``<masks>/a<mask_suffix>.*`` (an image
    extension, any case), falling back to the bare stem ``a.*``. Normal images are looked
    up the same way, so that a mask given for one is reported; when every folder is read
    (``anomalous`` not given), masks that no image takes are reported too.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    if normal is None:
        found = next((d for d in list_dirs(root) if d.name.lower() in NORMAL_FOLDER_NAMES), None)
        if found is None and anomalous is None:
            raise DatasetError(
                f"{root}: no normal folder ({', '.join(NORMAL_FOLDER_NAMES)}); name yours with "
                "--normal-folder NAME"
            )
        normal = found
    normal_dir = root / normal if normal is not None else None
    mask_dir = root / masks if masks is not None else None
    if anomalous is None:
        skip = {normal_dir, mask_dir}
        anomalous_dirs = [
            d for d in list_dirs(root) if d not in skip and d.name.lower() not in MASK_DIR_NAMES
        ]
    else:
        anomalous_dirs = [root / folder for folder in anomalous]
    missing = [
        d for d in [normal_dir, mask_dir, *anomalous_dirs] if d is not None and not d.is_dir()
    ]
    if missing:
        raise DatasetError(f"{root}: folder(s) not found: {', '.join(map(str, missing))}")
    if not anomalous_dirs and normal_dir is None:
        raise DatasetError(f"{root}: no image folders given")
    category = category or root.name
    suffixes = (mask_suffix, "") if mask_suffix else ("",)
    flat = MaskIndex(mask_dir) if mask_dir is not None else None
    per_folder = {
        d.name: MaskIndex(d) for d in (list_dirs(mask_dir) if mask_dir is not None else [])
    }

    def find_mask(image: Path) -> Path | None:
        indexes = [per_folder[image.parent.name]] if image.parent.name in per_folder else []
        found = (index.find(image.stem, suffixes) for index in [*indexes, *filter(None, [flat])])
        return next((mask for mask in found if mask is not None), None)

    samples: list[Sample] = []
    if normal_dir is not None:
        samples.extend(
            Sample(image=image, label=0, mask=find_mask(image), category=category)
            for image in list_images(normal_dir)
        )
    for folder in anomalous_dirs:
        samples.extend(
            Sample(
                image=image, label=1, mask=find_mask(image), category=category, defect=folder.name
            )
            for image in list_images(folder)
        )
    # With folders chosen, the others' masks are simply not wanted.
    unmatched = [] if anomalous is not None or flat is None else flat.unused()
    if anomalous is None:
        unmatched.extend(mask for index in per_folder.values() for mask in index.unused())
    return AnomalyDataset.create(
        name,
        root,
        split,
        samples,
        pixel_level=mask_dir is not None,
        categories=[category],
        allow_missing_masks=allow_missing_masks,
        mask_mismatch=mask_mismatch,
        unmatched_masks=unmatched,
        verify=verify,
    )


def read_csv_manifest(
    path: str | Path,
    *,
    name: str = "csv",
    split: str = "test",
    category: str | None = None,
    allow_missing_masks: bool = False,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
    allow_outside_paths: bool = False,
) -> AnomalyDataset:
    """A CSV of ``image,label[,mask][,category][,defect]`` rows.

    Rows without a category get ``category`` (default: the CSV's file stem). Every bad
    row is reported, by line number, in one :class:`DatasetError`. A path outside the
    CSV's folder is refused unless ``allow_outside_paths`` (:mod:`anomalyclip.data.paths`).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found")
    base = path.parent
    default_category = category or path.stem
    samples = []
    problems = []
    first_line: dict[str, int] = {}
    try:
        rows = list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="")))
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except csv.Error as error:
        raise DatasetError(f"{path}: not a readable CSV file ({error})") from None
    reader = iter(rows)
    header = [cell.strip().lower() for cell in next(reader, [])]
    missing = [column for column in ("image", "label") if column not in header]
    if missing:
        raise DatasetError(
            f"{path}: header must name the columns image and label (optionally mask, "
            f"category, defect); missing {', '.join(missing)}, got {','.join(header)}"
        )
    column = {name: header.index(name) for name in MANIFEST_COLUMNS if name in header}
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))
        if len(row) > len(header):
            problems.append(f"{path}, line {line}: {len(row)} cells, header has {len(header)}")
            continue
        cells = {name: row[index].strip() for name, index in column.items()}
        label = parse_label(cells["label"])
        if label is None:
            problems.append(
                f"{path}, line {line}: label {cells['label']!r} is not 0/1, "
                "normal/anomalous or a probability in [0, 1]"
            )
            continue
        if not cells["image"]:
            problems.append(f"{path}, line {line}: empty image path")
            continue
        where = f"{path}, line {line}"
        image = listed_path(base, cells["image"], where, "image", allow_outside_paths)
        if not image.is_file():
            problems.append(f"{path}, line {line}: image {image} not found")
            continue
        key = os.path.normcase(os.path.abspath(image))
        if key in first_line:
            problems.append(
                f"{path}, line {line}: image {image} already listed on line {first_line[key]}"
            )
            continue
        first_line[key] = line
        mask = (
            listed_path(base, cells["mask"], where, "mask", allow_outside_paths)
            if cells.get("mask")
            else None
        )
        if mask is not None and not mask.is_file():
            problems.append(f"{path}, line {line}: mask {mask} not found")
            continue
        defect = cells.get("defect") or (UNKNOWN_DEFECT if label else NORMAL_DEFECT)
        samples.append(
            Sample(
                image=image,
                label=label,
                mask=mask,
                category=cells.get("category") or default_category,
                defect=defect if label else NORMAL_DEFECT,
            )
        )
    return AnomalyDataset.create(
        name,
        base,
        split,
        samples,
        pixel_level=any(sample.mask is not None for sample in samples),
        allow_missing_masks=allow_missing_masks,
        mask_mismatch=mask_mismatch,
        verify=verify,
        problems=problems,
    )

"""Readers for the industrial benchmarks, each in the layout its publishers distribute.

* MVTec AD, MPDD, DTD-Synthetic (and KolektorSDD as converted for AnomalyCLIP):
  ``<category>/{train,test}/<defect>/<image>``, normal images in ``good/``, masks in
  ``<category>/ground_truth/<defect>/<stem>_mask.png``. A single category folder
  (``<category>/test/...``) is read as a dataset of one category.
* BTAD: the same with normal images in ``ok/`` and masks named like their images
  (``ground_truth/ko/0000.png`` for ``test/ko/0000.bmp``).
* VisA: ``split_csv/1cls.csv`` (columns object, split, label, image, mask; label
  ``normal`` or ``anomaly``; paths relative to the root).
* KolektorSDD: ``kosNN/PartN.jpg`` with ``PartN_label.bmp``; KolektorSDD2:
  ``{train,test}/NNNNN.png`` with ``NNNNN_GT.png``. Neither has defect folders: an
  image is anomalous when its mask marks any pixel (the publisher's own definition).
* DAGM 2007 (the Kaggle upload the original uses): ``ClassN/{Train,Test}/NNNN.PNG`` with
  masks ``ClassN/{Train,Test}/Label/NNNN_label.PNG`` for the defective images only.

AnomalyCLIP evaluates on the test split; MVTec AD and VisA also serve as auxiliary
training data, and then their *test* split is what is trained on, as in the original.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    select_categories,
)
from anomalyclip.data.paths import listed_path
from anomalyclip.decoding import ImageLoadError

MVTEC_MASK_SUFFIXES = ("_mask", "")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}
KSDD_CATEGORY = "electrical_commutators"


def mvtec_category_dirs(root: Path) -> list[Path]:
    """``root`` itself when it is one category (holds ``test/`` or ``train/``), else its
    sub-folders that are."""
    if (root / "test").is_dir() or (root / "train").is_dir():
        return [root]
    return [d for d in list_dirs(root) if (d / "test").is_dir() or (d / "train").is_dir()]


def read_mvtec(
    root: str | Path,
    split: str = "test",
    *,
    categories: Sequence[str] | None = None,
    normal_names: Sequence[str] = ("good",),
    mask_suffixes: Sequence[str] = MVTEC_MASK_SUFFIXES,
    name: str = "mvtec",
    allow_missing_masks: bool = False,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
) -> AnomalyDataset:
    """MVTec AD layout: defect folders under ``<category>/<split>/``, masks matched by stem.

    Pixel-level when the categories have a ``ground_truth/`` folder. Masks of the defects
    read that no image takes, and (test split) ``ground_truth/<defect>/`` folders without
    a ``test/<defect>/`` folder, are masks without an image.
    """
    root = Path(root)
    category_dirs = {d.name: d for d in mvtec_category_dirs(root)}
    if not category_dirs:
        raise DatasetError(
            f"{root}: not an MVTec-style dataset (no test/ or train/ folder in it or in "
            "any of its sub-folders)"
        )
    chosen = select_categories(list(category_dirs), categories, root)
    normal = {n.lower() for n in normal_names}
    samples: list[Sample] = []
    problems: list[str] = []
    unmatched: list[Path] = []
    pixel_level = any((category_dirs[c] / "ground_truth").is_dir() for c in chosen)
    for category in chosen:
        category_dir = category_dirs[category]
        split_dir = category_dir / split
        if not split_dir.is_dir():
            problems.append(f"{split_dir}: no {split}/ folder for category {category!r}")
            continue
        defect_dirs = list_dirs(split_dir)
        defect_dirs.sort(key=lambda d: d.name.lower() not in normal)  # normal images first
        if split == "test":
            read = {d.name for d in defect_dirs}
            for mask_dir in list_dirs(category_dir / "ground_truth"):
                if mask_dir.name not in read and mask_dir.name.lower() not in normal:
                    unmatched.extend(list_images(mask_dir))
        for defect_dir in defect_dirs:
            is_normal = defect_dir.name.lower() in normal
            masks = (
                None if is_normal else MaskIndex(category_dir / "ground_truth" / defect_dir.name)
            )
            for image in list_images(defect_dir):
                samples.append(
                    Sample(
                        image=image,
                        label=0 if is_normal else 1,
                        mask=masks.find(image.stem, mask_suffixes) if masks else None,
                        category=category,
                        defect=NORMAL_DEFECT if is_normal else defect_dir.name,
                    )
                )
            if masks is not None:
                unmatched.extend(masks.unused())
    return AnomalyDataset.create(
        name,
        root,
        split,
        samples,
        pixel_level=pixel_level,
        categories=chosen,
        allow_missing_masks=allow_missing_masks,
        mask_mismatch=mask_mismatch,
        unmatched_masks=unmatched,
        verify=verify,
        problems=problems,
    )


def read_mpdd(root: str | Path, split: str = "test", **options: Any) -> AnomalyDataset:
    """MPDD (Jezek et al.): the MVTec AD layout, six metal-part categories."""
    return read_mvtec(root, split, name="mpdd", **options)


def read_dtd_synthetic(root: str | Path, split: str = "test", **options: Any) -> AnomalyDataset:
    """DTD-Synthetic (Aota et al.): the MVTec AD layout over twelve DTD textures."""
    return read_mvtec(root, split, name="dtd_synthetic", **options)


def read_btad(root: str | Path, split: str = "test", **options: Any) -> AnomalyDataset:
    """BTAD (BTech_Dataset_transformed): MVTec-like, normal folder ``ok``, masks named as
    their images (any extension)."""
    options.setdefault("normal_names", ("ok",))
    return read_mvtec(root, split, name="btad", **options)


def read_visa(
    root: str | Path,
    split: str = "test",
    *,
    categories: Sequence[str] | None = None,
    split_csv: str | Path = "split_csv/1cls.csv",
    allow_missing_masks: bool = False,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
    allow_outside_paths: bool = False,
) -> AnomalyDataset:
    """VisA through its split file (``split_csv/1cls.csv`` by default); its paths must
    stay inside ``root`` unless ``allow_outside_paths`` (:mod:`anomalyclip.data.paths`)."""
    root = Path(root)
    csv_path = root / split_csv
    if not csv_path.is_file():
        raise DatasetError(f"{root}: VisA split file {csv_path} not found")
    rows: list[tuple[int, dict[str, str]]] = []
    problems: list[str] = []
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [column.strip() for column in reader.fieldnames or []]
        missing = [c for c in VISA_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{csv_path}: missing column(s) {', '.join(missing)}; expected "
                f"{','.join(VISA_COLUMNS)}"
            )
        for line, row in enumerate(reader, start=2):
            rows.append((line, {k.strip(): (v or "").strip() for k, v in row.items() if k}))
    splits = sorted({row["split"] for _, row in rows})
    if split not in splits:
        raise DatasetError(f"{csv_path}: no rows of split {split!r}; it has {', '.join(splits)}")
    available = list(dict.fromkeys(row["object"] for _, row in rows))
    chosen = select_categories(available, categories, csv_path)
    wanted = set(chosen)
    samples = []
    for line, row in rows:
        if row["split"] != split or row["object"] not in wanted:
            continue
        label = VISA_LABELS.get(row["label"].lower())
        if label is None:
            problems.append(
                f"{csv_path}, line {line}: label {row['label']!r} is not normal/anomaly"
            )
            continue
        if not row["image"]:
            problems.append(f"{csv_path}, line {line}: empty image path")
            continue
        where = f"{csv_path}, line {line}"
        image = listed_path(root, row["image"], where, "image", allow_outside_paths)
        mask = (
            listed_path(root, row["mask"], where, "mask", allow_outside_paths)
            if label == 1 and row["mask"]
            else None
        )
        samples.append(
            Sample(
                image=image,
                label=label,
                mask=mask,
                category=row["object"],
                defect=UNKNOWN_DEFECT if label else NORMAL_DEFECT,
            )
        )
    return AnomalyDataset.create(
        "visa",
        root,
        split,
        samples,
        pixel_level=True,
        categories=chosen,
        allow_missing_masks=allow_missing_masks,
        mask_mismatch=mask_mismatch,
        verify=verify,
        problems=problems,
    )


def _mask_marks_anything(mask: Path, problems: list[str]) -> bool:
    from anomalyclip.preprocess import load_mask_array  # torch: only where masks are read

    try:
        return bool(load_mask_array(mask).any())
    except ImageLoadError as error:
        problems.append(str(error))
        return False


def read_ksdd(
    root: str | Path,
    split: str = "test",
    *,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
) -> AnomalyDataset:
    """KolektorSDD (``kosNN/PartN.jpg`` + ``PartN_label.bmp``; no split: every image is
    in ``test``) or KolektorSDD2 (``<split>/NNNNN.png`` + ``NNNNN_GT.png``).

    Labels come from the masks (anomalous when any pixel is marked), so the masks are
    decoded here: about 400 small files for KolektorSDD.
    """
    root = Path(root)
    problems: list[str] = []
    samples = []
    unmatched: list[Path] = []
    part_dirs = [d for d in list_dirs(root) if re.fullmatch(r"kos\d+", d.name, re.IGNORECASE)]
    if part_dirs:
        name = "ksdd"
        if split != "test":
            raise DatasetError(f"{root}: KolektorSDD has no {split!r} split; use 'test'")
        pairs: list[tuple[Path, Path | None]] = []
        for part_dir in part_dirs:
            masks = MaskIndex(part_dir)
            pairs.extend(
                (image, masks.find(image.stem, ("_label",)))
                for image in list_images(part_dir)
                if not image.stem.lower().endswith("_label")
            )
            unmatched.extend(p for p in masks.unused() if p.stem.lower().endswith("_label"))
    else:
        name = "ksdd2"
        split_dir = find_child(root, split)
        if split_dir is None or not split_dir.is_dir():
            raise DatasetError(
                f"{root}: neither KolektorSDD (kosNN/ folders) nor KolektorSDD2 "
                f"({split}/ folder of NNNNN.png + NNNNN_GT.png)"
            )
        masks = MaskIndex(split_dir)
        pairs = [
            (image, masks.find(image.stem, ("_GT",)))
            for image in list_images(split_dir)
            if not image.stem.endswith("_GT")
        ]
        unmatched.extend(p for p in masks.unused() if p.stem.endswith("_GT"))
    for image, mask in pairs:
        if mask is None:
            problems.append(f"{image}: no mask beside it ({image.stem}_label.* or _GT.*)")
            continue
        anomalous = _mask_marks_anything(mask, problems)
        samples.append(
            Sample(
                image=image,
                label=int(anomalous),
                mask=mask if anomalous else None,
                category=KSDD_CATEGORY,
                defect="defect" if anomalous else NORMAL_DEFECT,
            )
        )
    return AnomalyDataset.create(
        name,
        root,
        split,
        samples,
        pixel_level=True,
        categories=[KSDD_CATEGORY],
        mask_mismatch=mask_mismatch,
        unmatched_masks=unmatched,
        verify=verify,
        problems=problems,
    )


def dagm_category_dirs(root: Path) -> list[Path]:
    return [
        d
        for d in list_dirs(root)
        if find_child(d, "Train") is not None and find_child(d, "Test") is not None
    ]


def read_dagm(
    root: str | Path,
    split: str = "test",
    *,
    categories: Sequence[str] | None = None,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
) -> AnomalyDataset:
    """DAGM 2007, Kaggle upload: an image is defective when ``Label/<stem>_label.*`` exists."""
    root = Path(root)
    category_dirs = {d.name: d for d in dagm_category_dirs(root)}
    if not category_dirs:
        raise DatasetError(f"{root}: no DAGM class folders (ClassN/ with Train/ and Test/)")
    chosen = select_categories(list(category_dirs), categories, root)
    samples = []
    problems = []
    unmatched: list[Path] = []
    for category in chosen:
        split_dir = find_child(category_dirs[category], split)
        if split_dir is None or not split_dir.is_dir():
            problems.append(f"{category_dirs[category]}: no {split}/ folder")
            continue
        label_dir = find_child(split_dir, "Label")
        masks = MaskIndex(label_dir) if label_dir is not None else None
        for image in list_images(split_dir):
            mask = masks.find(image.stem, ("_label",)) if masks else None
            samples.append(
                Sample(
                    image=image,
                    label=int(mask is not None),
                    mask=mask,
                    category=category,
                    defect="defect" if mask is not None else NORMAL_DEFECT,
                )
            )
        if masks is not None:
            unmatched.extend(masks.unused())
    return AnomalyDataset.create(
        "dagm",
        root,
        split,
        samples,
        pixel_level=True,
        categories=chosen,
        mask_mismatch=mask_mismatch,
        unmatched_masks=unmatched,
        verify=verify,
        problems=problems,
    )

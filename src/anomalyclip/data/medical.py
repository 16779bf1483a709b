"""Readers for the medical benchmarks, each in the layout its publishers distribute.

Image-level (normal and anomalous images, no masks):

* HeadCT (Kaggle "Head CT - hemorrhage"): ``labels.csv`` (``id, hemorrhage``) beside a
  ``head_ct/`` folder of ``NNN.png`` (the file whose number is the id); or ``good/`` +
  ``anomaly/``.
* BrainMRI (Kaggle "Brain MRI images for brain tumor detection"):
  ``[brain_tumor_dataset/]{no,yes}/``; Br35H: ``{no,yes}/`` (its unlabelled ``pred/`` is
  left out); either also as ``good/`` + ``anomaly/``.
* COVID-19 Radiography: one folder per class, images directly in it or in its
  ``images/`` sub-folder (the ``masks/`` there outline lungs, not anomalies, and are not
  used). ``Normal`` is normal; every other class is anomalous, as in the original,
  unless ``anomalous_classes`` narrows them.

Pixel-level, anomalous images only (image-level metrics are undefined there, the
readers warn about it):

* ISIC 2016 (ISBI challenge, part 1): ``ISBI2016_ISIC_Part1_Test_Data/ISIC_NNNNNNN.jpg``
  with ``ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_NNNNNNN_Segmentation.png``
  (``Training`` for the train split).
* CVC-ClinicDB, CVC-ColonDB, Kvasir-SEG, EndoTect 2020: ``images/`` + ``masks/``
  (ClinicDB's own release: ``[PNG|TIF]/Original/`` + ``[PNG|TIF]/Ground Truth/``),
  masks named as their images.
* TN3K: ``test-image/`` + ``test-mask/`` (``trainval-`` for the train split).

Category names are the original's (``brain``, ``chest``, ``skin``, ``colon``,
``thyroid``), so that :func:`~anomalyclip.data.meta.write_meta_json` writes what its
scripts wrote.
"""

from __future__ import annotations

import csv
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
)

POLYP_IMAGE_DIRS = ("images", "Original", "PNG/Original", "TIF/Original")
POLYP_MASK_DIRS = ("masks", "Ground Truth", "GroundTruth", "PNG/Ground Truth", "TIF/Ground Truth")


def _two_folders(
    base: Path,
    folder_pairs: Sequence[tuple[str, str]],
) -> tuple[Path, Path] | None:
    for normal_name, anomalous_name in folder_pairs:
        normal, anomalous = find_child(base, normal_name), find_child(base, anomalous_name)
        if normal is not None and anomalous is not None and normal.is_dir() and anomalous.is_dir():
            return normal, anomalous
    return None


def _image_level(
    name: str,
    root: Path,
    split: str,
    category: str,
    groups: Sequence[tuple[Path, int]],
    verify: bool,
) -> AnomalyDataset:
    samples = [
        Sample(
            image=image,
            label=label,
            category=category,
            defect=UNKNOWN_DEFECT if label else NORMAL_DEFECT,
        )
        for folder, label in groups
        for image in list_images(folder)
    ]
    return AnomalyDataset.create(
        name,
        root,
        split,
        samples,
        pixel_level=False,
        categories=[category],
        verify=verify,
    )


def _check_split(name: str, split: str) -> None:
    if split != "test":
        raise DatasetError(f"{name} is an evaluation set: it has only the 'test' split")


def read_headct(
    root: str | Path, split: str = "test", *, category: str = "brain", verify: bool = False
) -> AnomalyDataset:
    """HeadCT: Kaggle's ``labels.csv`` + ``head_ct/`` or ``good/`` + ``anomaly/``."""
    root = Path(root)
    _check_split("HeadCT", split)
    labels_csv = root / "labels.csv"
    if not labels_csv.is_file():
        folders = _two_folders(root, [("good", "anomaly")])
        if folders is None:
            raise DatasetError(f"{root}: no HeadCT labels.csv, nor good/ and anomaly/ folders")
        return _image_level(
            "headct", root, split, category, [(folders[0], 0), (folders[1], 1)], verify
        )
    image_dir = next(
        (d for d in (root / "head_ct" / "head_ct", root / "head_ct", root) if list_images(d)),
        None,
    )
    if image_dir is None:
        raise DatasetError(f"{root}: labels.csv found but no head_ct/ folder of images")
    by_number: dict[int, Path] = {}
    for path in list_images(image_dir):
        if path.stem.isdigit():
            by_number[int(path.stem)] = path
    samples: list[Sample] = []
    problems = []
    with labels_csv.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [column.strip().lower() for column in next(reader, [])]
        if header[:2] != ["id", "hemorrhage"]:
            raise DatasetError(f"{labels_csv}: expected the columns 'id, hemorrhage', got {header}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                number, label = int(row[0]), int(row[1])
            except (ValueError, IndexError):
                problems.append(f"{labels_csv}, line {line}: expected 'id,0|1', got {row}")
                continue
            image = by_number.get(number)
            if image is None:
                problems.append(
                    f"{labels_csv}, line {line}: no image numbered {number} in {image_dir}"
                )
                continue
            samples.append(
                Sample(
                    image=image,
                    label=label,
                    category=category,
                    defect=UNKNOWN_DEFECT if label else NORMAL_DEFECT,
                )
            )
    return AnomalyDataset.create(
        "headct",
        root,
        split,
        samples,
        pixel_level=False,
        categories=[category],
        verify=verify,
        problems=problems,
    )


def _no_yes(name: str, root: Path, split: str, category: str, verify: bool) -> AnomalyDataset:
    _check_split(name, split)
    nested = find_child(root, "brain_tumor_dataset")
    base = nested if nested is not None and nested.is_dir() else root
    folders = _two_folders(base, [("no", "yes"), ("good", "anomaly")])
    if folders is None:
        raise DatasetError(f"{root}: no {name} folders no/ and yes/ (nor good/ and anomaly/)")
    return _image_level(name, root, split, category, [(folders[0], 0), (folders[1], 1)], verify)


def read_brainmri(
    root: str | Path, split: str = "test", *, category: str = "brain", verify: bool = False
) -> AnomalyDataset:
    """BrainMRI: ``[brain_tumor_dataset/]{no,yes}/`` or ``good/`` + ``anomaly/``."""
    return _no_yes("brainmri", Path(root), split, category, verify)


def read_br35h(
    root: str | Path, split: str = "test", *, category: str = "brain", verify: bool = False
) -> AnomalyDataset:
    """Br35H: ``{no,yes}/``; the unlabelled ``pred/`` folder is not read."""
    return _no_yes("br35h", Path(root), split, category, verify)


def read_covid19(
    root: str | Path,
    split: str = "test",
    *,
    category: str = "chest",
    anomalous_classes: Sequence[str] | None = None,
    verify: bool = False,
) -> AnomalyDataset:
    """COVID-19 Radiography: class folders; ``Normal`` normal, the others anomalous."""
    root = Path(root)
    _check_split("COVID-19 Radiography", split)
    class_dirs = {d.name: d for d in list_dirs(root)}
    normal_name = next((n for n in class_dirs if n.lower() == "normal"), None)
    if normal_name is None:
        raise DatasetError(f"{root}: no Normal/ class folder (found {', '.join(class_dirs)})")
    if anomalous_classes is None:
        anomalous_classes = [n for n in class_dirs if n != normal_name]
    unknown = [n for n in anomalous_classes if n not in class_dirs]
    if unknown:
        raise DatasetError(f"{root}: no class folder {', '.join(map(repr, unknown))}")
    samples: list[Sample] = []
    for class_name, label in [(normal_name, 0)] + [(n, 1) for n in anomalous_classes]:
        folder = class_dirs[class_name]
        images_dir = folder / "images" if (folder / "images").is_dir() else folder
        samples.extend(
            Sample(
                image=image,
                label=label,
                category=category,
                defect=class_name if label else NORMAL_DEFECT,
            )
            for image in list_images(images_dir)
        )
    return AnomalyDataset.create(
        "covid19", root, split, samples, pixel_level=False, categories=[category], verify=verify
    )


def _segmentation(
    name: str,
    root: Path,
    split: str,
    category: str,
    image_dir: Path,
    mask_dir: Path,
    mask_suffixes: Sequence[str],
    allow_missing_masks: bool,
    mask_mismatch: MaskMismatch,
    verify: bool,
) -> AnomalyDataset:
    masks = MaskIndex(mask_dir)
    samples = [
        Sample(
            image=image,
            label=1,
            mask=masks.find(image.stem, mask_suffixes),
            category=category,
            defect=UNKNOWN_DEFECT,
        )
        for image in list_images(image_dir)
    ]
    return AnomalyDataset.create(
        name,
        root,
        split,
        samples,
        pixel_level=True,
        categories=[category],
        allow_missing_masks=allow_missing_masks,
        mask_mismatch=mask_mismatch,
        unmatched_masks=masks.unused(),
        verify=verify,
    )


def read_isic2016(
    root: str | Path,
    split: str = "test",
    *,
    category: str = "skin",
    allow_missing_masks: bool = False,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
) -> AnomalyDataset:
    """ISIC 2016 part 1 (lesion segmentation); ``split`` 'test' or 'train'."""
    root = Path(root)
    part = {"test": "Test", "train": "Training"}.get(split)
    if part is None:
        raise DatasetError(f"ISIC 2016 has the splits 'test' and 'train', not {split!r}")
    image_dir = root / f"ISBI2016_ISIC_Part1_{part}_Data"
    mask_dir = root / f"ISBI2016_ISIC_Part1_{part}_GroundTruth"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DatasetError(f"{root}: ISIC 2016 folder {folder.name}/ not found")
    return _segmentation(
        "isic2016",
        root,
        split,
        category,
        image_dir,
        mask_dir,
        ("_Segmentation", ""),
        allow_missing_masks,
        mask_mismatch,
        verify,
    )


def read_images_masks(
    root: str | Path,
    split: str = "test",
    *,
    name: str = "segmentation",
    category: str | None = None,
    image_dirs: Sequence[str] = POLYP_IMAGE_DIRS,
    mask_dirs: Sequence[str] = POLYP_MASK_DIRS,
    mask_suffixes: Sequence[str] = ("", "_mask"),
    allow_missing_masks: bool = False,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
) -> AnomalyDataset:
    """A segmentation set of anomalous images: an image folder and a mask folder.

    The first of ``image_dirs`` and of ``mask_dirs`` that exists under ``root`` is used;
    masks are matched by stem.
    """
    root = Path(root)
    image_dir = next((root / d for d in image_dirs if (root / d).is_dir()), None)
    mask_dir = next((root / d for d in mask_dirs if (root / d).is_dir()), None)
    if image_dir is None or mask_dir is None:
        raise DatasetError(
            f"{root}: expected an image folder (one of {', '.join(image_dirs)}) and a mask "
            f"folder (one of {', '.join(mask_dirs)})"
        )
    return _segmentation(
        name,
        root,
        split,
        category or root.name,
        image_dir,
        mask_dir,
        mask_suffixes,
        allow_missing_masks,
        mask_mismatch,
        verify,
    )


def _polyp(
    name: str, title: str, root: str | Path, split: str, options: dict[str, Any]
) -> AnomalyDataset:
    _check_split(title, split)
    options.setdefault("category", "colon")
    return read_images_masks(root, split, name=name, **options)


def read_cvc_clinicdb(root: str | Path, split: str = "test", **options: Any) -> AnomalyDataset:
    """CVC-ClinicDB: ``images/`` + ``masks/`` or ``[PNG|TIF]/Original`` + ``Ground Truth``."""
    return _polyp("cvc_clinicdb", "CVC-ClinicDB", root, split, options)


def read_cvc_colondb(root: str | Path, split: str = "test", **options: Any) -> AnomalyDataset:
    """CVC-ColonDB: ``images/`` + ``masks/``."""
    return _polyp("cvc_colondb", "CVC-ColonDB", root, split, options)


def read_kvasir(root: str | Path, split: str = "test", **options: Any) -> AnomalyDataset:
    """Kvasir-SEG: ``images/`` + ``masks/`` (JPEG masks)."""
    return _polyp("kvasir", "Kvasir-SEG", root, split, options)


def read_endo(root: str | Path, split: str = "test", **options: Any) -> AnomalyDataset:
    """EndoTect 2020 segmentation test set: ``images/`` + ``masks/``."""
    return _polyp("endo", "EndoTect 2020", root, split, options)


def read_tn3k(
    root: str | Path,
    split: str = "test",
    *,
    category: str = "thyroid",
    allow_missing_masks: bool = False,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
) -> AnomalyDataset:
    """TN3K thyroid nodules: ``test-image/`` + ``test-mask/`` (or ``trainval-``)."""
    root = Path(root)
    prefix = {"test": "test", "train": "trainval"}.get(split)
    if prefix is None:
        raise DatasetError(f"TN3K has the splits 'test' and 'train', not {split!r}")
    return read_images_masks(
        root,
        split,
        name="tn3k",
        category=category,
        image_dirs=(f"{prefix}-image",),
        mask_dirs=(f"{prefix}-mask",),
        allow_missing_masks=allow_missing_masks,
        mask_mismatch=mask_mismatch,
        verify=verify,
    )

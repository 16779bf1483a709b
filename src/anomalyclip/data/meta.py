"""The original implementation's dataset index, ``<root>/meta.json``.

Its ``generate_dataset_json/*.py`` scripts write, and its ``dataset.py`` reads::

    {"train": {<cls_name>: [entry, ...]}, "test": {<cls_name>: [entry, ...]}}
    entry = {"img_path": "bottle/test/broken_large/000.png",
             "mask_path": "bottle/ground_truth/broken_large/000_mask.png",  # "" if none
             "cls_name": "bottle", "specie_name": "broken_large", "anomaly": 1}

Paths are joined to the root the way ``os.path.join`` does, so the absolute paths some
of its scripts wrote work too (inside the root; others only when allowed,
:mod:`anomalyclip.data.paths`). A ``mask_path`` that names a folder (or is empty) means
"no mask", as in the original, and so does the ``mask_path`` of a normal entry (the
original's ``dataset.py`` gives normal images an empty mask whatever the entry says). The
split key is matched ignoring case (its DAGM script wrote ``Train``/``Test``). Training
reads the ``test`` split, as the original does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from anomalyclip.data.core import (
    NORMAL_DEFECT,
    UNKNOWN_DEFECT,
    AnomalyDataset,
    DatasetError,
    MaskMismatch,
    Sample,
    select_categories,
)
from anomalyclip.data.paths import listed_path
from anomalyclip.utils.atomic import atomic_write_json

META_FILE = "meta.json"


def _split_entries(meta: Any, split: str, path: Path) -> tuple[str, dict[str, Any]]:
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected an object with 'train' and 'test' keys")
    key = next((k for k in meta if k.lower() == split.lower()), None)
    if key is None:
        raise DatasetError(f"{path}: no {split!r} split; it has {', '.join(map(repr, meta))}")
    classes = meta[key]
    if not isinstance(classes, dict):
        raise DatasetError(f"{path}: {key!r} must map class names to lists of entries")
    return key, classes


def read_meta_json(
    root: str | Path,
    split: str = "test",
    *,
    categories: Sequence[str] | None = None,
    meta_file: str | Path | None = None,
    name: str = "meta",
    allow_missing_masks: bool = False,
    mask_mismatch: MaskMismatch = "error",
    verify: bool = False,
    allow_outside_paths: bool = False,
) -> AnomalyDataset:
    """A dataset from ``meta.json``.

    ``root`` is the folder its paths are relative to, or the index file itself (its
    folder then being the root); ``meta_file`` names an index kept elsewhere. A path
    outside ``root`` (absolute ones included) is refused unless ``allow_outside_paths``
    (:mod:`anomalyclip.data.paths`).
    """
    root = Path(root)
    if meta_file is not None:
        path = Path(meta_file)
    elif root.suffix.lower() == ".json":
        path, root = root, root.parent
    else:
        path = root / META_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: meta.json not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    key, classes = _split_entries(meta, split, path)
    chosen = select_categories(list(classes), categories, path)
    samples = []
    problems = []
    pixel_level = False
    for category in chosen:
        entries = classes[category]
        if not isinstance(entries, list):
            problems.append(f"{path}: {key}/{category} is not a list of entries")
            continue
        for index, entry in enumerate(entries):
            where = f"{path}: {key}/{category}[{index}]"
            if not isinstance(entry, dict) or "img_path" not in entry or "anomaly" not in entry:
                problems.append(f"{where}: an entry needs at least img_path and anomaly")
                continue
            label = entry["anomaly"]
            if label not in (0, 1) or isinstance(label, bool):
                problems.append(f"{where}: anomaly must be 0 or 1, not {label!r}")
                continue
            image = listed_path(root, entry["img_path"], where, "img_path", allow_outside_paths)
            mask_path = entry.get("mask_path") or ""
            mask = None
            if label == 1 and mask_path:
                listed = listed_path(root, mask_path, where, "mask_path", allow_outside_paths)
                if not listed.is_dir():
                    mask = listed
                    pixel_level = True
            defect = entry.get("specie_name") or UNKNOWN_DEFECT
            samples.append(
                Sample(
                    image=image,
                    label=label,
                    mask=mask,
                    category=category,
                    defect=defect if label else NORMAL_DEFECT,
                )
            )
    return AnomalyDataset.create(
        name,
        root,
        split,
        samples,
        pixel_level=pixel_level,
        categories=chosen,
        allow_missing_masks=allow_missing_masks,
        mask_mismatch=mask_mismatch,
        verify=verify,
        problems=problems,
    )


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators, or absolute when outside it."""
    absolute, base = os.path.abspath(path), os.path.abspath(root)
    if os.path.commonpath([absolute, base]) == base:
        return Path(os.path.relpath(absolute, base)).as_posix()
    return Path(absolute).as_posix()


def meta_entries(dataset: AnomalyDataset, root: Path) -> dict[str, list[dict[str, Any]]]:
    """The dataset as meta.json's ``{cls_name: [entry, ...]}`` for one split."""
    return {
        category: [
            {
                "img_path": _relative(sample.image, root),
                "mask_path": _relative(sample.mask, root) if sample.mask and sample.label else "",
                "cls_name": category,
                "specie_name": sample.defect,
                "anomaly": sample.label,
            }
            for sample in group
        ]
        for category, group in dataset.by_category().items()
    }


def write_meta_json(
    root: str | Path, splits: Mapping[str, AnomalyDataset], path: str | Path | None = None
) -> Path:
    """Write ``meta.json`` (default ``<root>/meta.json``) that the original can train on.

    ``splits`` maps split names to datasets, e.g. ``{"test": read_mvtec(root)}``; the
    ``train`` and ``test`` keys are always present, empty when not given.
    """
    root = Path(root)
    target = Path(path) if path is not None else root / META_FILE
    meta: dict[str, Any] = {"train": {}, "test": {}}
    for split, dataset in splits.items():
        meta[split] = meta_entries(dataset, root)
    atomic_write_json(target, meta)
    return target

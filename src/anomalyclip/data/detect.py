"""Opening a dataset by its layout, named or recognised.

A folder can look like several layouts at once (an MVTec tree with a partial
``meta.json`` in it). Recognition therefore lists every layout that matches, in the
order of :data:`LAYOUTS`, and reads the first that reads without problems, saying which
ones failed and why; when none does, one error quotes each one's first problems and the
``KIND=PATH`` spelling that forces it.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anomalyclip.data.core import AnomalyDataset, DatasetError, find_child, list_dirs, list_images
from anomalyclip.data.custom import (
    NORMAL_FOLDER_NAMES,
    find_mask_dir,
    read_csv_manifest,
    read_folder,
)
from anomalyclip.data.industrial import (
    dagm_category_dirs,
    mvtec_category_dirs,
    read_btad,
    read_dagm,
    read_dtd_synthetic,
    read_ksdd,
    read_mpdd,
    read_mvtec,
    read_visa,
)
from anomalyclip.data.medical import (
    POLYP_IMAGE_DIRS,
    POLYP_MASK_DIRS,
    read_br35h,
    read_brainmri,
    read_covid19,
    read_cvc_clinicdb,
    read_cvc_colondb,
    read_endo,
    read_headct,
    read_images_masks,
    read_isic2016,
    read_kvasir,
    read_tn3k,
)
from anomalyclip.data.meta import META_FILE, read_meta_json

logger = logging.getLogger(__name__)

READERS: dict[str, Callable[..., AnomalyDataset]] = {
    "mvtec": read_mvtec,
    "visa": read_visa,
    "mpdd": read_mpdd,
    "btad": read_btad,
    "ksdd": read_ksdd,
    "dagm": read_dagm,
    "dtd_synthetic": read_dtd_synthetic,
    "headct": read_headct,
    "brainmri": read_brainmri,
    "br35h": read_br35h,
    "covid19": read_covid19,
    "isic2016": read_isic2016,
    "cvc_clinicdb": read_cvc_clinicdb,
    "cvc_colondb": read_cvc_colondb,
    "kvasir": read_kvasir,
    "endo": read_endo,
    "tn3k": read_tn3k,
    "segmentation": read_images_masks,
    "folder": read_folder,
    "csv": read_csv_manifest,
    "meta": read_meta_json,
}


def _has_subdirs(folder: Path) -> bool:
    return bool(list_dirs(folder))


def _is_mvtec(root: Path) -> bool:
    return any(
        _has_subdirs(category / "test") or _has_subdirs(category / "train")
        for category in mvtec_category_dirs(root)
    )


def _is_btad(root: Path) -> bool:
    return any(
        (category / "test" / "ok").is_dir() and not (category / "test" / "good").is_dir()
        for category in mvtec_category_dirs(root)
    )


def _is_ksdd(root: Path) -> bool:
    if any(re.fullmatch(r"kos\d+", d.name, re.IGNORECASE) for d in list_dirs(root)):
        return True
    test = find_child(root, "test")
    return test is not None and any(p.stem.endswith("_GT") for p in list_images(test))


def _is_covid(root: Path) -> bool:
    names = {d.name.lower(): d for d in list_dirs(root)}
    return "normal" in names and ((names["normal"] / "images").is_dir() or "covid" in names)


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _folder_options(root: Path) -> dict[str, Any] | None:
    normal = next(
        (d for d in list_dirs(root) if d.name.lower() in NORMAL_FOLDER_NAMES and list_images(d)),
        None,
    )
    if normal is None:
        return None
    mask_dir = find_mask_dir(root)
    others = [d for d in list_dirs(root) if d not in (normal, mask_dir)]
    if not others:
        return None
    return {"normal": normal.name, "masks": mask_dir.name if mask_dir else None}


LAYOUTS: list[tuple[str, str, Callable[[Path], bool]]] = [
    ("meta", f"{META_FILE} (the original's index)", lambda r: (r / META_FILE).is_file()),
    ("visa", "split_csv/1cls.csv (VisA)", lambda r: (r / "split_csv" / "1cls.csv").is_file()),
    ("ksdd", "kosNN/ folders or test/*_GT.png (KolektorSDD 1/2)", _is_ksdd),
    ("btad", "[<category>/]test/ok/ (BTAD)", _is_btad),
    ("mvtec", "[<category>/]test/<defect>/ or train/good/ (MVTec AD, MPDD, ...)", _is_mvtec),
    ("dagm", "ClassN/Train/ + ClassN/Test/ (DAGM 2007)", lambda r: bool(dagm_category_dirs(r))),
    (
        "isic2016",
        "ISBI2016_ISIC_Part1_Test_Data/ (ISIC 2016)",
        lambda r: (r / "ISBI2016_ISIC_Part1_Test_Data").is_dir(),
    ),
    ("tn3k", "test-image/ + test-mask/ (TN3K)", lambda r: (r / "test-image").is_dir()),
    (
        "headct",
        "labels.csv + head_ct/ (HeadCT)",
        lambda r: (r / "labels.csv").is_file() and (r / "head_ct").is_dir(),
    ),
    (
        "br35h",
        "no/ + yes/ + pred/ (Br35H)",
        lambda r: all((r / n).is_dir() for n in ("no", "yes", "pred")),
    ),
    (
        "brainmri",
        "[brain_tumor_dataset/]no/ + yes/ (BrainMRI)",
        lambda r: (
            (r / "brain_tumor_dataset").is_dir() or all((r / n).is_dir() for n in ("no", "yes"))
        ),
    ),
    ("covid19", "Normal/images/ or Normal/ + COVID/ (COVID-19 Radiography)", _is_covid),
    (
        "segmentation",
        "images/ + masks/ (CVC-ClinicDB, CVC-ColonDB, Kvasir, Endo)",
        lambda r: (
            _first_dir(r, POLYP_IMAGE_DIRS) is not None
            and _first_dir(r, POLYP_MASK_DIRS) is not None
        ),
    ),
    (
        "folder",
        "good/ (or normal/, ok/) + anomalous folders [+ masks/ or ground_truth/]",
        lambda r: _folder_options(r) is not None,
    ),
]


DESCRIPTIONS = {kind: description for kind, description, _ in LAYOUTS}
# Reader options whose command-line flag is not simply --<name-with-dashes>.
OPTION_FLAGS = {"normal": "--normal-folder"}
# Problems quoted per layout when no matching layout reads.
QUOTED_PROBLEMS = 3


def detect_layouts(root: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Every reader kind whose layout ``root`` matches, in order, with the options each
    implies (a file: the one kind its extension names).

    Raises :class:`DatasetError` listing every layout looked for when none matches.
    """
    root = Path(root)
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix == ".csv":
            return [("csv", {})]
        if suffix == ".json":
            return [("meta", {})]
        raise DatasetError(f"{root}: a dataset file must be a .csv manifest or a meta.json")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such file or folder")
    found = [
        (kind, (_folder_options(root) if kind == "folder" else None) or {})
        for kind, _, matches in LAYOUTS
        if matches(root)
    ]
    if found:
        return found
    looked_for = "\n".join(f"  - {description}" for _, description, _ in LAYOUTS)
    raise DatasetError(
        f"{root}: no known dataset layout. Looked for:\n{looked_for}\n"
        "  - or pass a .csv manifest (image,label[,mask,category]) or name the kind "
        f"({', '.join(READERS)})"
    )


def detect_layout(root: str | Path) -> tuple[str, dict[str, Any]]:
    """The first reader kind whose layout ``root`` matches, and the options it implies.

    :func:`open_dataset` goes on to the next match when this one does not read.
    """
    return detect_layouts(root)[0]


def _read(kind: str, root: str | Path, split: str, options: dict[str, Any]) -> AnomalyDataset:
    """Read ``root`` with the reader ``kind``; an option it does not take is a
    :class:`DatasetError` naming the command-line flag (not a ``TypeError``)."""
    reader = READERS.get(kind.lower().replace("-", "_"))
    if reader is None:
        raise DatasetError(f"unknown dataset kind {kind!r}; known: {', '.join(READERS)}")
    parameters = inspect.signature(reader).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = [name for name in options if name not in parameters]
        if unknown:
            flags = ", ".join(OPTION_FLAGS.get(n, "--" + n.replace("_", "-")) for n in unknown)
            raise DatasetError(f"{root}: the {kind} layout does not take {flags}")
    return reader(root, split=split, **options)


def _quote(kind: str, root: str | Path, error: DatasetError) -> str:
    """One failed layout in the error of :func:`open_dataset`: why, and how to force it."""
    description = DESCRIPTIONS.get(kind, kind)
    head = f"  - {kind}: {description}; force it with {kind}={root}"
    problems = error.problems
    if problems == (str(error),):
        return f"{head}\n      {str(error).splitlines()[0]}"
    lines = [f"{head}; {len(problems)} problem{'s' if len(problems) != 1 else ''}, first:"]
    lines.extend(f"      - {problem}" for problem in problems[:QUOTED_PROBLEMS])
    if len(problems) > QUOTED_PROBLEMS:
        lines.append(f"      ... and {len(problems) - QUOTED_PROBLEMS} more")
    return "\n".join(lines)


def open_dataset(
    root: str | Path, kind: str | None = None, *, split: str = "test", **options: Any
) -> AnomalyDataset:
    """The dataset at ``root``, read by the reader ``kind`` or by the layout recognised.

    Without ``kind``, every matching layout is tried in order and the first that reads
    without problems is used, with a warning naming those that failed before it; when
    none reads, the :class:`DatasetError` quotes each one's first problems. ``options``
    go to the reader (``categories``, ``allow_missing_masks``, ``mask_mismatch``,
    ``verify``, ...).
    """
    if kind is not None:
        return _read(kind, root, split, options)
    candidates = detect_layouts(root)
    if len(candidates) == 1:
        kind, detected = candidates[0]
        logger.info("%s: recognised the %s layout", root, kind)
        return _read(kind, root, split, {**detected, **options})
    matched = ", ".join(kind for kind, _ in candidates)
    failed: list[tuple[str, DatasetError]] = []
    for kind, detected in candidates:
        try:
            dataset = _read(kind, root, split, {**detected, **options})
        except DatasetError as error:
            failed.append((kind, error))
            continue
        if failed:
            reasons = "; ".join(
                f"{name} failed ({str(error).splitlines()[0]}; first: {error.problems[0]})"
                if error.problems != (str(error),)
                else f"{name} failed ({error})"
                for name, error in failed
            )
            logger.warning(
                "%s: matched the layouts %s; %s; read as %s (force a layout with KIND=%s)",
                root,
                matched,
                reasons,
                kind,
                root,
            )
        else:
            logger.info("%s: matched the layouts %s; read as %s", root, matched, kind)
        return dataset
    quoted = "\n".join(_quote(kind, root, error) for kind, error in failed)
    raise DatasetError(
        f"{root}: {len(failed)} layouts match ({matched}) and none reads without problems:\n"
        f"{quoted}",
        [problem for _, error in failed for problem in error.problems],
    )

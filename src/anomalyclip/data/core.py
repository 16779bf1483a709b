"""The one representation every reader produces: samples, a dataset of them, and its checks.

Conventions shared by all readers:

* ``label`` is 1 for an anomalous image and 0 for a normal one, and it comes from where
  the publisher put the image (folder, CSV column), never from the mask's content. An
  anomalous image whose mask is empty (four of magnetic_tile's "uneven" masks are all
  zero) keeps label 1; its pixels then count as normal in pixel-level metrics.
* ``defect`` is the publisher's defect type; normal images always have ``"good"``, and
  anomalous images of datasets without types have ``"anomaly"``.
* ``mask`` is None for normal images (all zeros) and for every image of an image-level
  dataset (``pixel_level`` False). In a pixel-level dataset an anomalous image without a
  mask is an error, unless ``allow_missing_masks`` is given: it is then kept, with a
  warning, as an image whose pixel truth is unknown (see :meth:`AnomalyDataset.has_pixel_truth`).
* A mask must fit its image: the same size (read from the files' headers, the image's
  EXIF rotation applied), an anomalous image, and every mask in a reader's mask folder
  must belong to an image. A mismatch is an error by default (``mask_mismatch="error"``,
  ``--mask-mismatch error``), because a mask of another image, a mislabelled image or a
  missing image silently corrupts pixel metrics. ``"resize"`` stretches masks of another
  size over their images (what the preprocessor's whole-image resize does anyway) and
  leaves the other misfits out; ``"ignore"`` leaves every misfit out (an anomalous image
  whose mask is left out counts for image-level metrics only). Both warn, with a count.

Checks (:meth:`AnomalyDataset.create`): every problem found is reported in one
:class:`DatasetError` naming the files: missing image or mask files, an image listed
twice, labels other than 0/1, a category without images, anomalous images without masks
in a pixel-level dataset, masks that do not fit their images (above); with
``verify=True`` also images and masks that do not decode.
A category holding only one label is a warning (outside the train split), because its
image-level AUROC and AP are undefined.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

from PIL import Image

from anomalyclip.decoding import IMAGE_EXTENSIONS, ImageLoadError, open_image

logger = logging.getLogger(__name__)

NORMAL_DEFECT = "good"
UNKNOWN_DEFECT = "anomaly"
MAX_LISTED_PROBLEMS = 20
# What to do with a mask that does not fit its image (see the module's docstring).
MaskMismatch = Literal["error", "resize", "ignore"]
MASK_MISMATCH_MODES: tuple[str, ...] = get_args(MaskMismatch)
EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the files and problems.

    ``problems`` holds them one by one (the message alone when there is no list), so that
    layout detection can quote the first few of each layout it tried.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


@dataclass(frozen=True)
class Sample:
    """One image with its ground truth."""

    image: Path
    label: int
    mask: Path | None = None
    category: str = ""
    defect: str = ""

    def __post_init__(self) -> None:
        if not self.defect:
            object.__setattr__(self, "defect", UNKNOWN_DEFECT if self.label else NORMAL_DEFECT)

    @property
    def is_anomalous(self) -> bool:
        return self.label == 1


@dataclass(frozen=True)
class AnomalyDataset:
    """The samples of one split of one dataset, grouped in categories.

    Build it with :meth:`create`, which checks it; the readers all do.
    """

    name: str
    root: Path
    split: str
    samples: tuple[Sample, ...]
    categories: tuple[str, ...]
    pixel_level: bool
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def create(
        cls,
        name: str,
        root: str | Path,
        split: str,
        samples: Iterable[Sample],
        *,
        pixel_level: bool,
        categories: Sequence[str] | None = None,
        allow_missing_masks: bool = False,
        mask_mismatch: MaskMismatch = "error",
        unmatched_masks: Sequence[Path] = (),
        verify: bool = False,
        problems: Sequence[str] = (),
    ) -> AnomalyDataset:
        """A checked dataset; raises :class:`DatasetError` listing every problem found.

        ``categories`` lists the categories that must hold images (default: those of the
        samples, in order of appearance). ``problems`` are those a reader found itself,
        reported together with the rest. ``unmatched_masks`` are the files of the
        reader's mask folders that no image took; they and masks that do not fit their
        images are handled as ``mask_mismatch`` says. ``verify`` also decodes every image
        and mask.
        """
        if mask_mismatch not in MASK_MISMATCH_MODES:
            raise ValueError(
                f"mask_mismatch must be one of {', '.join(MASK_MISMATCH_MODES)}, "
                f"got {mask_mismatch!r}"
            )
        found = list(problems)
        samples, dropped, warnings = fit_masks(samples, mask_mismatch, unmatched_masks, found)
        if categories is None:
            categories = tuple(dict.fromkeys(sample.category for sample in samples))
        dataset = cls(name, Path(root), split, samples, tuple(categories), pixel_level)
        warnings += check(
            dataset, found, allow_missing_masks=allow_missing_masks, masks_left_out=dropped
        )
        if verify and not found:
            found.extend(verify_files(dataset))
        if found:
            raise DatasetError(format_problems(f"{name} dataset at {root} ({split})", found), found)
        for message in warnings:
            logger.warning("%s: %s", name, message)
        return replace(dataset, warnings=tuple(warnings))

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    @property
    def has_masks(self) -> bool:
        """Whether pixel-level metrics can be computed (any anomalous image has a mask)."""
        return self.pixel_level and any(s.mask is not None for s in self.samples if s.label)

    @property
    def labels(self) -> list[int]:
        return [sample.label for sample in self.samples]

    def has_pixel_truth(self, sample: Sample) -> bool:
        """Whether the sample's pixels are known: a normal image or one with a mask."""
        return self.pixel_level and (sample.label == 0 or sample.mask is not None)

    def by_category(self) -> dict[str, list[Sample]]:
        groups: dict[str, list[Sample]] = {category: [] for category in self.categories}
        for sample in self.samples:
            groups[sample.category].append(sample)
        return groups

    def counts(self) -> dict[str, tuple[int, int]]:
        """(normal, anomalous) image counts per category."""
        return {
            category: (sum(s.label == 0 for s in group), sum(s.label == 1 for s in group))
            for category, group in self.by_category().items()
        }

    def subset(self, categories: Sequence[str]) -> AnomalyDataset:
        """The same dataset restricted to some categories, in the order given."""
        unknown = [c for c in categories if c not in self.categories]
        if unknown:
            raise DatasetError(
                f"{self.name} dataset at {self.root}: no category {', '.join(map(repr, unknown))}"
                f"; it has {', '.join(self.categories)}"
            )
        wanted = set(categories)
        samples = tuple(s for s in self.samples if s.category in wanted)
        return replace(self, samples=samples, categories=tuple(categories))

    def summary(self) -> str:
        normal = sum(s.label == 0 for s in self.samples)
        level = "pixel-level" if self.pixel_level else "image-level"
        return (
            f"{self.name} ({self.split}, {level}): {len(self.categories)} categories, "
            f"{normal} normal / {len(self.samples) - normal} anomalous images"
        )


def format_problems(heading: str, problems: Sequence[str]) -> str:
    listed = [f"  - {problem}" for problem in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        listed.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return f"{heading}: {count}\n" + "\n".join(listed)


def check(
    dataset: AnomalyDataset,
    problems: list[str],
    allow_missing_masks: bool,
    masks_left_out: frozenset[Path] = frozenset(),
) -> list[str]:
    """Append the dataset's problems to ``problems``; return its warnings.

    Stats every file once (cheap); decoding is left to :func:`verify_files`. Images in
    ``masks_left_out`` lost a mask that did not fit (``mask_mismatch="ignore"``): they are
    not reported again as anomalous images without a mask.
    """
    warnings: list[str] = []
    if not dataset.samples:
        problems.append(f"no images found under {dataset.root}")
    seen: dict[str, int] = {}
    missing_masks: list[Path] = []
    for index, sample in enumerate(dataset.samples):
        if sample.label not in (0, 1):
            problems.append(f"{sample.image}: label must be 0 or 1, not {sample.label!r}")
        if sample.category not in dataset.categories:
            problems.append(f"{sample.image}: category {sample.category!r} is not listed")
        key = os.path.normcase(os.path.abspath(sample.image))
        if key in seen:
            problems.append(f"{sample.image}: listed twice (samples {seen[key]} and {index})")
        seen.setdefault(key, index)
        if not sample.image.is_file():
            problems.append(f"{sample.image}: image file not found")
        if sample.mask is not None and not sample.mask.is_file():
            problems.append(f"{sample.mask}: mask file not found (for image {sample.image})")
        if (
            dataset.pixel_level
            and sample.label == 1
            and sample.mask is None
            and sample.image not in masks_left_out
        ):
            missing_masks.append(sample.image)
    if missing_masks:
        if allow_missing_masks:
            warnings.append(
                f"{len(missing_masks)} anomalous images have no mask and are left out of "
                f"pixel-level metrics, e.g. {missing_masks[0]}"
            )
        else:
            problems.extend(
                f"{image}: anomalous image has no mask (pass --allow-missing-masks, in "
                "Python allow_missing_masks=True, to keep it for image-level metrics only)"
                for image in missing_masks
            )
    labels_per_category: dict[str, Counter] = {c: Counter() for c in dataset.categories}
    for sample in dataset.samples:
        labels_per_category.setdefault(sample.category, Counter())[sample.label] += 1
    for category in dataset.categories:
        labels = labels_per_category[category]
        if not labels:
            problems.append(f"category {category!r} has no images")
        elif len(labels) == 1 and dataset.split != "train":
            kind = "normal" if 0 in labels else "anomalous"
            warnings.append(
                f"category {category!r} has only {kind} images: image-level AUROC and AP "
                "are undefined for it"
            )
    return warnings


def oriented_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as decoding will give it, from the file's header alone.

    ``load_image`` applies the EXIF rotation, so a portrait photo stored as landscape is
    compared transposed; masks are read as stored, which this also gives for them. None
    when the header cannot be read (reported by ``verify`` or when the file is used).
    PNG keeps EXIF after the pixels, where reading it would decode the image: a PNG's
    rotation is taken only when its header carried it.
    """
    try:
        with open_image(path) as image:
            width, height = image.size
            if image.format == "PNG":
                exif = Image.Exif()
                raw = image.info.get("exif")
                if isinstance(raw, bytes):
                    exif.load(raw)
            else:
                exif = image.getexif()
            orientation = exif.get(EXIF_ORIENTATION, 1)
    except ImageLoadError:  # verify and loading report it, naming the file
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# The fixes, as the command-line flag (the Python argument is mask_mismatch=).
RESIZE_OR_IGNORE = "--mask-mismatch resize to stretch it over the image, or ignore to leave it out"
IGNORE = "--mask-mismatch ignore to leave it out"


def fit_masks(
    samples: Iterable[Sample],
    mode: MaskMismatch,
    unmatched: Sequence[Path],
    problems: list[str],
) -> tuple[tuple[Sample, ...], frozenset[Path], list[str]]:
    """Samples whose masks fit their images, the images whose mask was left out, warnings.

    Three misfits, each a problem (mode ``error``) naming the files, else handled and
    warned about once with a count and an example: a mask on a normal image (left out),
    a mask of another size than its image (stretched with ``resize``, left out with
    ``ignore``) and a mask no image took (``unmatched``, not read). Sizes come from the
    files' headers only; files that are missing or unreadable are someone else's problem.
    """
    kept: list[Sample] = []
    left_out: set[Path] = set()
    normal: list[str] = []  # one line per misfit: the mask, then what is wrong
    resized: list[str] = []
    for sample in samples:
        mask = sample.mask
        if mask is None:
            kept.append(sample)
            continue
        if sample.label == 0:
            normal.append(f"{mask}: mask given for normal image {sample.image}")
            if mode != "error":
                sample = replace(sample, mask=None)
            kept.append(sample)
            continue
        image_size = oriented_size(sample.image) if sample.image.is_file() else None
        mask_size = oriented_size(mask) if image_size and mask.is_file() else None
        if image_size and mask_size and image_size != mask_size:
            resized.append(
                f"{mask}: mask is {_size(mask_size)}, its image {sample.image} is "
                f"{_size(image_size)}"
            )
            if mode == "ignore":
                left_out.add(sample.image)
                sample = replace(sample, mask=None)
        kept.append(sample)
    orphans = [f"{path}: mask without an image" for path in unmatched]
    warnings: list[str] = []
    if mode == "error":
        problems.extend(f"{line} (pass {IGNORE})" for line in normal)
        problems.extend(f"{line} (pass {RESIZE_OR_IGNORE})" for line in resized)
        problems.extend(f"{line} (pass {IGNORE})" for line in orphans)
        return tuple(kept), frozenset(), warnings
    if normal:
        warnings.append(f"{len(normal)} masks of normal images are left out, e.g. {normal[0]}")
    if resized:
        action = (
            "are stretched over their images"
            if mode == "resize"
            else "are left out (those images count for image-level metrics only)"
        )
        warnings.append(f"{len(resized)} masks of another size {action}, e.g. {resized[0]}")
    if orphans:
        warnings.append(f"{len(orphans)} masks without an image are not used, e.g. {unmatched[0]}")
    return tuple(kept), frozenset(left_out), warnings


def verify_files(dataset: AnomalyDataset) -> list[str]:
    """Decode every image and mask; one problem per file that cannot be read. Decoding
    loads torch (preprocess), imported here so that the readers, and the command line's
    parser that lists them, need none."""
    from tqdm.auto import tqdm

    from anomalyclip.preprocess import load_image, load_mask_array

    problems = []
    for sample in tqdm(dataset.samples, desc=f"verify {dataset.name}", unit="img", disable=None):
        try:
            load_image(sample.image)
        except ImageLoadError as error:
            problems.append(str(error))
        if sample.mask is not None:
            try:
                load_mask_array(sample.mask)
            except ImageLoadError as error:
                problems.append(str(error))
    return problems


# Labels ------------------------------------------------------------------------------

# One rule for every place a label is written by hand (CSV manifests, calibration lists).
NORMAL_LABELS = frozenset({"0", "normal", "good", "ok", "false", "negative"})
ANOMALOUS_LABELS = frozenset(
    {"1", "anomalous", "anomaly", "abnormal", "bad", "defect", "defective", "ng", "true"}
)
# A number in [0, 1] is a probability of being anomalous (elpv's defect probabilities,
# 0.0/1.0 from pandas): anomalous at or above this.
PROBABILITY_THRESHOLD = 0.5


def parse_label(value: str) -> int | None:
    """0 (normal) or 1 (anomalous) from a label cell; None when it is neither.

    Words of :data:`NORMAL_LABELS` / :data:`ANOMALOUS_LABELS` (any case), or a number in
    [0, 1] read as a probability: 1 when at least :data:`PROBABILITY_THRESHOLD`.
    """
    word = value.strip().lower()
    if word in NORMAL_LABELS:
        return 0
    if word in ANOMALOUS_LABELS:
        return 1
    try:
        number = float(word)
    except ValueError:
        return None
    if not 0.0 <= number <= 1.0:  # also refuses nan
        return None
    return int(number >= PROBABILITY_THRESHOLD)


# Helpers for readers ------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    """An image by extension, any case; hidden files (``.DS_Store``, ``._x.png``) are not."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """The images directly in ``folder``, sorted by name; none when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def list_dirs(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_child(folder: Path, name: str) -> Path | None:
    """The entry of ``folder`` called ``name``, ignoring case (``Test`` and ``test``)."""
    exact = folder / name
    if exact.exists():
        return exact
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name.lower() == name.lower():
                return child
    return None


class MaskIndex:
    """Masks in one folder, looked up by the stem of their image plus a suffix.

    Extensions are free (BTAD pairs ``.bmp`` images with ``.png`` masks), so one lookup
    tries every mask image whose stem is the image's stem followed by a suffix, trying the
    suffixes in order.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._by_stem: dict[str, list[Path]] = {}
        self._used: set[Path] = set()
        for path in list_images(folder):
            self._by_stem.setdefault(path.stem, []).append(path)

    def find(self, stem: str, suffixes: Sequence[str]) -> Path | None:
        for suffix in suffixes:
            candidates = self._by_stem.get(stem + suffix, [])
            if len(candidates) > 1:
                names = ", ".join(path.name for path in candidates)
                raise DatasetError(f"{self.folder}: several masks for image {stem!r}: {names}")
            if candidates:
                self._used.add(candidates[0])
                return candidates[0]
        return None

    def unused(self) -> list[Path]:
        """The masks no :meth:`find` returned: masks without an image, once all are looked up."""
        return sorted(p for paths in self._by_stem.values() for p in paths if p not in self._used)


def select_categories(
    available: Sequence[str], wanted: Sequence[str] | None, where: Path
) -> list[str]:
    """``wanted`` checked against ``available`` (all when None), with a clear error."""
    if wanted is None:
        return list(available)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        listed = ", ".join(available) or "none"
        raise DatasetError(f"{where}: no category {', '.join(map(repr, unknown))}; found {listed}")
    return list(wanted)

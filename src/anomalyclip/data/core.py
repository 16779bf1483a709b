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

Checks (:meth:`AnomalyDataset.create`): every problem found is reported in one
:class:`DatasetError` naming the files: missing image or mask files, an image listed
twice, labels other than 0/1, a category without images, anomalous images without masks
in a pixel-level dataset; with ``verify=True`` also images and masks that do not decode.
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

from anomalyclip.preprocess import IMAGE_EXTENSIONS, ImageLoadError, load_image, load_mask_array

logger = logging.getLogger(__name__)

NORMAL_DEFECT = "good"
UNKNOWN_DEFECT = "anomaly"
MAX_LISTED_PROBLEMS = 20


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the files and problems."""


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
        verify: bool = False,
        problems: Sequence[str] = (),
    ) -> AnomalyDataset:
        """A checked dataset; raises :class:`DatasetError` listing every problem found.

        ``categories`` lists the categories that must hold images (default: those of the
        samples, in order of appearance). ``problems`` are those a reader found itself,
        reported together with the rest. ``verify`` also decodes every image and mask.
        """
        samples = tuple(samples)
        if categories is None:
            categories = tuple(dict.fromkeys(sample.category for sample in samples))
        dataset = cls(name, Path(root), split, samples, tuple(categories), pixel_level)
        found = list(problems)
        warnings = check(dataset, found, allow_missing_masks=allow_missing_masks)
        if verify and not found:
            found.extend(verify_files(dataset))
        if found:
            raise DatasetError(format_problems(f"{name} dataset at {root} ({split})", found))
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


def check(dataset: AnomalyDataset, problems: list[str], allow_missing_masks: bool) -> list[str]:
    """Append the dataset's problems to ``problems``; return its warnings.

    Stats every file once (cheap); decoding is left to :func:`verify_files`.
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
        if dataset.pixel_level and sample.label == 1 and sample.mask is None:
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


def verify_files(dataset: AnomalyDataset) -> list[str]:
    """Decode every image and mask; one problem per file that cannot be read."""
    from tqdm.auto import tqdm

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
        for path in list_images(folder):
            self._by_stem.setdefault(path.stem, []).append(path)

    def find(self, stem: str, suffixes: Sequence[str]) -> Path | None:
        for suffix in suffixes:
            candidates = self._by_stem.get(stem + suffix, [])
            if len(candidates) > 1:
                names = ", ".join(path.name for path in candidates)
                raise DatasetError(f"{self.folder}: several masks for image {stem!r}: {names}")
            if candidates:
                return candidates[0]
        return None


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

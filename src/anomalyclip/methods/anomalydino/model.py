"""AnomalyDINO as a :class:`~anomalyclip.predictor.Predictor`: few-shot and batched zero-shot.

Damm, Laszkiewicz, Lederer, Fischer, "AnomalyDINO: Boosting Patch-based Few-shot Anomaly
Detection with DINOv2", WACV 2025 (github.com/dammsi/AnomalyDINO, Apache-2.0). No
training and no text: each patch of a test image is scored by its cosine distance to the
nearest DINOv2 patch of a few known-good references (:class:`AnomalyDINO`), or, without
references, to the patches of the other images of the set (:class:`BatchedAnomalyDINO`).
The numerics are :mod:`anomalyclip.methods.anomalydino.core`'s.

Two things differ from the other methods and shape this module:

* The input keeps the image's aspect ratio (shorter side to S, top-left crop to multiples
  of 14), so images of different shapes give tensors of different shapes: images are
  encoded one by one (:meth:`predict_images`), never stacked.
* The authors' map is made at the **original** image size (the patch grid resized onto
  it). :meth:`predict_images` returns exactly that map, and
  :class:`AnomalyDINOPreProcessor` hands it back unchanged from ``map_to_original``.
  :meth:`score_tensors` (the evaluation loop's path, which only has tensors) makes the
  map at the tensor's own size by the same rule.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import anomalyclip.methods.anomalydino.core as core
from anomalyclip.backbone.dinov2 import DINOv2
from anomalyclip.backbone.identity import BackboneIdentity
from anomalyclip.inputs import expand_sources
from anomalyclip.methods.anomalydino.bank import AnomalyDINOBank, BankError
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import AnomalyPrediction, Predictor, check_finite
from anomalyclip.preprocess import ImageSource, PreProcessor, describe, load_image
from anomalyclip.utils.cancellation import checkpoint
from anomalyclip.utils.precision import PrecisionChoice

__all__ = [
    "apply_precision",
    "MAP_RANGE",
    "AnomalyDINO",
    "AnomalyDINOConfig",
    "AnomalyDINOPreProcessor",
    "AnomalyDINOResult",
    "BatchedAnomalyDINO",
    "build_anomalydino",
    "create_anomalydino",
]

logger = logging.getLogger(__name__)

# Cosine distances (1 - cos) lie in [0, 2]; the smoothed map only averages them.
MAP_RANGE = (0.0, 2.0)
# dtypes the few-shot nearest-patch search may pick candidates in (config.similarity_dtype)
SIMILARITY_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class AnomalyDINOConfig:
    """AnomalyDINO's settings; the defaults are the authors' (``run_anomalydino.py``).

    backbone: the name results record (a registered name or the weights file's name).
    image_size: S, the shorter side of the few-shot input (448: a 32 x 32 grid).
    rotation: references rotated to 8 angles (the "agnostic" preset). masking: the
    PCA background mask on test images (the authors turn it on per object).
    neighbours: k of k-NN (mean of the k smallest distances). zero_shot_size: S of the
    batched zero-shot mode (672). batch_size: images per backbone pass (memory only).
    similarity_dtype: "float32" or "bfloat16": the dtype in which the few-shot search
    picks each patch's nearest reference patches (:func:`core.nearest_distances_bfloat16`;
    their distances stay float32). The zero-shot mode keeps float32: its score is a mean
    over the 0.1 % nearest of every other patch, thousands of values per patch.
    """

    backbone: str = "dinov2_vits14"
    image_size: int = 448
    rotation: bool = True
    masking: bool = False
    neighbours: int = 1
    zero_shot_size: int = 672
    sigma: float = core.SIGMA
    mask_threshold: float = core.MASK_THRESHOLD
    batch_size: int = 8
    block_elements: int = core.DEFAULT_BLOCK_ELEMENTS
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    similarity_dtype: str = "float32"

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("image_size", "neighbours", "zero_shot_size", "batch_size")
            if getattr(self, name) < 1
        ]
        if self.block_elements < 1:
            problems.append(f"block_elements must be >= 1, got {self.block_elements}")
        if not self.sigma > 0:
            problems.append(f"sigma must be positive, got {self.sigma}")
        if self.similarity_dtype not in SIMILARITY_DTYPES:
            problems.append(
                f"similarity_dtype must be one of {', '.join(SIMILARITY_DTYPES)}, "
                f"got {self.similarity_dtype!r}"
            )
        if problems:
            raise ValueError("invalid AnomalyDINO configuration: " + "; ".join(problems))

    @property
    def angles(self) -> tuple[int, ...]:
        return core.ROTATION_ANGLES if self.rotation else (0,)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnomalyDINOConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown AnomalyDINO configuration keys: %s", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class AnomalyDINOPreProcessor(PreProcessor):
    """The authors' geometry: shorter side to S (PIL bicubic), ImageNet normalisation,
    top-left crop to multiples of the patch; maps come back at the original size.

    ``resize`` stays "squash" for the base class's checks; every geometric method is
    overridden here.
    """

    mean: tuple[float, float, float] = core.IMAGENET_MEAN
    std: tuple[float, float, float] = core.IMAGENET_STD
    patch: int = 14

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return core.resized_size(size, self.size)

    def crop_box(self, size: tuple[int, int]) -> tuple[int, int]:
        return 0, 0

    def tensor_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the input tensor for an original (width, height)."""
        width, height = self.resized_size(size)
        return width - width % self.patch, height - height % self.patch

    def tensor(self, image: Image.Image) -> Tensor:
        return core.preprocess(np.asarray(image.convert("RGB")), self.size, self.patch)

    def mask(self, mask: np.ndarray) -> Tensor:
        """A boolean mask on the input tensor's pixels (resized, top-left crop)."""
        height, width = mask.shape
        as_image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        resized = np.asarray(
            as_image.resize(self.resized_size((width, height)), Image.Resampling.BILINEAR)
        )
        crop_width, crop_height = self.tensor_size((width, height))
        cropped = resized[:crop_height, :crop_width].astype(np.float32) / 255.0
        return torch.from_numpy((cropped > 0.5).astype(np.float32))

    def map_to_original(
        self, anomaly_map: np.ndarray, size: tuple[int, int], fill: float = 0.0
    ) -> np.ndarray:
        """A map already at the original (width, height) unchanged; any other (a tensor-
        size map) stretched over the whole original with OpenCV's bilinear rule, as the
        authors stretch the patch grid. ``fill`` is unused: the map covers everything."""
        array = np.ascontiguousarray(anomaly_map, dtype=np.float32)
        width, height = size
        if array.shape == (height, width):
            return array
        return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)


@dataclass
class AnomalyDINOResult:
    """One test image's intermediate results. ``patch_dists`` (gh, gw): masked patches
    0; ``mask``/``pc1`` (n,) when masking is on; ``nearest`` (n,) bank rows of the
    nearest neighbours, -1 where masked (few-shot only)."""

    score: float
    patch_dists: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray | None = None
    pc1: np.ndarray | None = None
    nearest: np.ndarray | None = None


def encode(backbone: DINOv2, tensors: Sequence[Tensor], batch_size: int = 8) -> list[Tensor]:
    """(n_i, D) float32 final-norm last-block patch features of (3, H, W) inputs,
    batched where consecutive shapes agree (the rotations of one reference do)."""
    features: list[Tensor] = []
    device = next(backbone.parameters()).device
    with torch.no_grad():
        start = 0
        while start < len(tensors):
            checkpoint()  # a service's abandoned request stops between batches
            stop = start + 1
            shape = tensors[start].shape
            while (
                stop < len(tensors) and stop - start < batch_size and tensors[stop].shape == shape
            ):
                stop += 1
            batch = torch.stack(list(tensors[start:stop])).to(device)
            features.extend(values.float().cpu() for values in backbone.patch_features(batch))
            start = stop
    return features


def bank_identity(
    backbone: DINOv2, identity: BackboneIdentity, config: AnomalyDINOConfig
) -> dict[str, Any]:
    """What a bank's features depend on; a bank made otherwise is refused."""
    return {
        "backbone_sha256": identity.sha256,
        "architecture": backbone.arch.to_dict(),
        "image_size": config.image_size,
        "angles": list(config.angles),
    }


class _DINOScorer(Predictor):
    """What both modes share: the backbone, the configuration, encoding and maps."""

    method = "anomalydino"
    # the precision chosen through --precision / PredictorSpec (None: float32, as built)
    precision: PrecisionChoice | None = None

    def __init__(
        self,
        backbone: DINOv2,
        config: AnomalyDINOConfig | None = None,
        identity: BackboneIdentity | None = None,
    ) -> None:
        self.config = config or AnomalyDINOConfig()
        self.backbone = backbone.requires_grad_(False).eval()
        self.identity = identity or BackboneIdentity(
            self.config.backbone, None, backbone.arch.to_dict()
        )

    @property
    def input_size(self) -> int:
        return self.config.image_size

    @property
    def preprocessor(self) -> AnomalyDINOPreProcessor:
        return AnomalyDINOPreProcessor(self.input_size, patch=self.backbone.arch.patch)

    @property
    def postprocessor(self) -> PostProcessor:
        return PostProcessor.calibrated(
            MAP_RANGE, self.config.image_threshold, self.config.pixel_threshold
        )

    def settings(self) -> dict[str, Any]:
        recorded = {**self.config.to_dict(), "backbone_identity": self.identity.to_dict()}
        if self.precision is not None:
            recorded["precision"] = self.precision.to_dict()
        return recorded

    def encode(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return encode(self.backbone, tensors, self.config.batch_size)

    def _masks(
        self, features: Sequence[Tensor], grids: Sequence[tuple[int, int]]
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        if not self.config.masking:
            return [None] * len(features)
        return [
            core.background_mask(f.numpy(), grid, self.config.mask_threshold)
            for f, grid in zip(features, grids, strict=True)
        ]

    def _predictions(
        self, images: Sequence[Image.Image], results: Sequence[AnomalyDINOResult]
    ) -> list[AnomalyPrediction]:
        preprocessor, postprocessor = self.preprocessor, self.postprocessor
        predictions = []
        for index, (image, result) in enumerate(zip(images, results, strict=True)):
            check_finite(self.method, f"image {index + 1}", result.score, result.anomaly_map)
            predictions.append(
                AnomalyPrediction(
                    describe(image),
                    result.score,
                    result.anomaly_map,
                    image.size,
                    preprocessor,
                    postprocessor,
                )
            )
        return predictions

    @staticmethod
    def _stacked(results: Sequence[AnomalyDINOResult]) -> tuple[np.ndarray, np.ndarray]:
        scores = np.array([r.score for r in results], dtype=np.float32)
        maps = np.stack([r.anomaly_map for r in results]) if results else np.empty((0, 0, 0))
        return scores, maps.astype(np.float32)

    @staticmethod
    def _grid(tensor: Tensor, patch: int) -> tuple[int, int]:
        return tensor.shape[-2] // patch, tensor.shape[-1] // patch


class AnomalyDINO(_DINOScorer):
    """Few-shot AnomalyDINO: each test image against the references' bank, one by one."""

    def __init__(
        self,
        backbone: DINOv2,
        bank: AnomalyDINOBank,
        config: AnomalyDINOConfig | None = None,
        identity: BackboneIdentity | None = None,
    ) -> None:
        super().__init__(backbone, config, identity)
        bank.check_fits(bank_identity(self.backbone, self.identity, self.config))
        if self.config.neighbours > bank.size:
            raise BankError(
                f"neighbours={self.config.neighbours} exceeds the bank's {bank.size} patches"
            )
        self.bank = bank
        self._bank_form: Tensor | None = None

    def reference_bytes(self) -> int:
        return self.bank.features.numel() * self.bank.features.element_size()

    @classmethod
    def from_images(
        cls,
        backbone: DINOv2,
        references: Sequence[ImageSource],
        config: AnomalyDINOConfig | None = None,
        identity: BackboneIdentity | None = None,
    ) -> AnomalyDINO:
        """Build the bank from reference images (paths, bytes, PIL images, arrays)."""
        config = config or AnomalyDINOConfig()
        identity = identity or BackboneIdentity(config.backbone, None, backbone.arch.to_dict())
        patch = backbone.arch.patch
        if not references:
            raise BankError("no reference images given")
        per_image: list[Tensor] = []
        for source in references:
            try:
                array = np.asarray(load_image(source))
            except ValueError as error:
                raise BankError(f"reference {error}") from None
            rotated = [core.rotate(array, angle) for angle in config.angles]
            tensors = [core.preprocess(r, config.image_size, patch) for r in rotated]
            per_image.extend(encode(backbone, tensors, config.batch_size))
        bank = AnomalyDINOBank.from_features(
            per_image,
            config.angles,
            bank_identity(backbone, identity, config),
            [describe(s) for s in references],
        )
        return cls(backbone, bank, config, identity)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "references": {
                "count": self.bank.count,
                "patches": self.bank.size,
                "digest": self.bank.digest,
                "sources": self.bank.sources,
            },
        }

    def score_features(
        self, features: Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> AnomalyDINOResult:
        """One image's result from its (n, D) features; the map at (width, height) ``size``."""
        mask, pc1 = None, None
        kept = torch.ones(len(features), dtype=torch.bool)
        if self.config.masking:
            mask, pc1 = core.background_mask(features.numpy(), grid, self.config.mask_threshold)
            kept = torch.from_numpy(mask)
        distances = torch.zeros(len(features), dtype=torch.float64)
        nearest = torch.full((len(features),), -1, dtype=torch.long)
        if bool(kept.any()):
            queries = F.normalize(features[kept].float(), dim=-1)
            found, rows = self._nearest(queries)
            distances[kept], nearest[kept] = found, rows
        patch_dists = distances.numpy().reshape(grid)
        return AnomalyDINOResult(
            core.mean_top1p(patch_dists),
            patch_dists,
            core.anomaly_map(patch_dists, size, self.config.sigma),
            mask,
            pc1,
            nearest.numpy(),
        )

    def _nearest(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`core.nearest_distances`, or its bfloat16 search when configured (the
        bank's bfloat16 form computed once and kept with this model)."""
        bank, config = self.bank.features, self.config
        if config.similarity_dtype == "float32":
            return core.nearest_distances(queries, bank, config.neighbours, config.block_elements)
        if self._bank_form is None:
            self._bank_form = core.bank_form(bank)
        return core.nearest_distances_bfloat16(
            queries, bank, self._bank_form, config.neighbours, config.block_elements
        )

    def score_images(self, images: Sequence[Image.Image]) -> list[AnomalyDINOResult]:
        """Results with maps at each image's original size (the authors' maps)."""
        preprocessor = self.preprocessor
        results = []
        for image in images:
            tensor = preprocessor.tensor(image)
            (features,) = self.encode([tensor])
            grid = self._grid(tensor, preprocessor.patch)
            results.append(self.score_features(features, grid, image.size))
        return results

    def predict_images(self, images: Sequence[Image.Image]) -> list[AnomalyPrediction]:
        return self._predictions(images, self.score_images(images))

    def score_tensors(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps at the tensors' own size, for callers that only have tensors."""
        patch = self.preprocessor.patch
        features = self.encode(list(images))
        grid = self._grid(images, patch)
        size = (images.shape[-1], images.shape[-2])
        return self._stacked([self.score_features(f, grid, size) for f in features])


class BatchedAnomalyDINO(_DINOScorer):
    """Batched zero-shot AnomalyDINO: the images of one call score each other (no
    references), at ``config.zero_shot_size``. See :func:`core.batched_distances` for
    the decisions on tiny sets and ties, and :func:`core.mean_top1p` for n < 100."""

    scores_sets = True

    @property
    def input_size(self) -> int:
        return self.config.zero_shot_size

    def score_set_features(
        self,
        features: Sequence[Tensor],
        grids: Sequence[tuple[int, int]],
        sizes: Sequence[tuple[int, int]],
    ) -> list[AnomalyDINOResult]:
        """Results of a set from each image's (n_i, D) features; maps at ``sizes``."""
        masks = self._masks(features, grids)
        results = []
        for index, (grid, size) in enumerate(zip(grids, sizes, strict=True)):
            scores = core.batched_distances(list(features), index, self.config.block_elements)
            masked = masks[index]
            if masked is not None:
                scores = torch.where(torch.from_numpy(masked[0]), scores, torch.zeros_like(scores))
            patch_dists = scores.numpy().reshape(grid)
            results.append(
                AnomalyDINOResult(
                    core.mean_top1p(patch_dists),
                    patch_dists,
                    core.anomaly_map(patch_dists, size, self.config.sigma),
                    None if masked is None else masked[0],
                    None if masked is None else masked[1],
                )
            )
        return results

    def score_images(self, images: Sequence[Image.Image]) -> list[AnomalyDINOResult]:
        preprocessor = self.preprocessor
        tensors = [preprocessor.tensor(image) for image in images]
        grids = [self._grid(t, preprocessor.patch) for t in tensors]
        return self.score_set_features(
            self.encode(tensors), grids, [image.size for image in images]
        )

    def predict_images(self, images: Sequence[Image.Image]) -> list[AnomalyPrediction]:
        return self._predictions(images, self.score_images(images))

    def with_references(
        self, references: Sequence[ImageSource] | str | os.PathLike[str]
    ) -> AnomalyDINO:
        """The few-shot form on the same backbone and settings: reference images, a
        folder of them, or a saved bank file (the hook ``--reference`` needs). The
        precision chosen for this model is kept."""
        if isinstance(references, (str, os.PathLike)):
            path = Path(references)
            if path.is_file() and path.suffix == ".pt":
                bank = AnomalyDINOBank.load(path)
                model = AnomalyDINO(self.backbone, bank, self.config, self.identity)
                model.precision = self.precision
                return model
            # the one rule for folders, globs and CSV lists (predict's)
            references = expand_sources([path])
        model = AnomalyDINO.from_images(self.backbone, references, self.config, self.identity)
        model.precision = self.precision
        return model

    def score_tensors(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        patch = self.preprocessor.patch
        grid = self._grid(images, patch)
        size = (images.shape[-1], images.shape[-2])
        results = self.score_set_features(
            self.encode(list(images)), [grid] * len(images), [size] * len(images)
        )
        return self._stacked(results)


def create_anomalydino(
    backbone: str | os.PathLike[str] | DINOv2,
    references: Sequence[ImageSource] | str | os.PathLike[str] | None = None,
    *,
    config: AnomalyDINOConfig | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> AnomalyDINO | BatchedAnomalyDINO:
    """AnomalyDINO in one call: few-shot with ``references`` (images, a folder of them,
    or a saved bank file), batched zero-shot without.

    ``backbone``: a registered DINOv2 name ("dinov2_vits14"), a weights file or folder
    (any layout :func:`~anomalyclip.backbone.dinov2_layouts.load_dinov2` reads) or a
    model in memory.
    ``overrides``: :class:`AnomalyDINOConfig` fields; None values mean "not given".
    """
    zero_shot = build_anomalydino(backbone, config=config, overrides=overrides, device=device)
    return zero_shot if references is None else zero_shot.with_references(references)


def build_anomalydino(
    backbone: str | os.PathLike[str] | DINOv2 | None = None,
    *,
    config: AnomalyDINOConfig | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> BatchedAnomalyDINO:
    """The zero-shot predictor, in the ``METHODS`` builder's signature
    (``builder(weights, overrides=..., device=..., dtype=...)``); references are added
    by :meth:`BatchedAnomalyDINO.with_references`. ``backbone``: a registered name
    ("dinov2_vits14", the default; fetched into the verified cache like CLIP names), a
    weights file or folder, or a model in memory.
    """
    from anomalyclip.backbone.dinov2_layouts import load_dinov2, resolve_dinov2

    config = config or AnomalyDINOConfig()
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(AnomalyDINOConfig)})
    if unknown:
        raise ValueError(f"AnomalyDINO has no setting {', '.join(map(repr, unknown))}")
    if isinstance(backbone, DINOv2):
        model, name, sha256 = backbone, config.backbone, None
    else:
        path, name, sha256 = resolve_dinov2(backbone if backbone is not None else config.backbone)
        model = load_dinov2(path)
    config = dataclasses.replace(config, **changes, backbone=name)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return BatchedAnomalyDINO(model, config, BackboneIdentity(name, sha256, model.arch.to_dict()))


def apply_precision(predictor: Predictor, choice: PrecisionChoice) -> Predictor:
    """AnomalyDINO in ``choice``'s precision: bfloat16 picks each patch's nearest
    reference patches from bfloat16 products (``similarity_dtype``; distances float32),
    2 to 4 times the float32 rate where oneDNN has AVX-512 BF16 or AMX. The backbone and
    the zero-shot mode stay float32 (see :class:`AnomalyDINOConfig`). Kept by
    ``with_references`` (the configuration carries it) and recorded with every result."""
    if not isinstance(predictor, _DINOScorer):
        raise ValueError(f"precision {choice.precision} needs the torch AnomalyDINO model")
    if choice.precision not in SIMILARITY_DTYPES:
        raise ValueError(f"AnomalyDINO offers float32 and bfloat16, not {choice.precision}")
    predictor.config = dataclasses.replace(predictor.config, similarity_dtype=choice.precision)
    predictor.precision = choice
    logger.info("AnomalyDINO nearest-patch search in %s (%s)", choice.precision, choice.reason)
    return predictor

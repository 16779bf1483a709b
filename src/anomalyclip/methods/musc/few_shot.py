"""MuSc with references: each image scored against known-good images, one at a time.

Zero-shot MuSc needs a set: its images score each other. With a few known-good parts a
user can score a single image instead: the references take the place of the set's other
images, with everything else as in :mod:`anomalyclip.methods.musc.model`:

* the references' LNAMD vectors (per feature layer and aggregation degree) are computed
  once, from the same features, and kept as the bank;
* for a patch p of the test image and each reference r, d_r(p) is the Euclidean distance
  to the nearest LNAMD vector of r (the distance computed on the pair, as MSM does);
* the patch's score is the mean of the smallest ``max(1, int(R * interval))`` of the R
  values: the same 0-30 % interval rule, over the references instead of the N - 1
  other images of a set;
* patch scores are averaged over layers, then degrees; the map is their bilinear
  upsampling (align_corners True) and the image score its maximum.

Coverage: the references decide it, as a set's images do for MuSc
(:meth:`~anomalyclip.methods.musc.model.MuSc.cover`): the paper's centre crop where it
loses nothing, else (``auto``) the whole image resized, and the images scored are fitted
the same way, so their patches meet the references' at the same scale. Images the bank's
crop would cut (non-square images against a bank of centre crops) are said in the log.

RsCIN is skipped: it smooths scores over the images of one set (min-max normalised over
the set), which a single image does not have. Scores are therefore the raw MuSc scores
(distances, not normalised to [0, 1]), comparable across images scored against the same
references, and thresholds calibrated with those references hold for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from anomalyclip.methods.musc.model import (
    CROP_LOSS_TOLERANCE,
    MAP_RANGE,
    MuSc,
    lnamd,
    neighbour_count,
)
from anomalyclip.methods.references import (
    ReferenceError,
    bank_dtype,
    identity_differences,
    load_references,
)
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import AnomalyPrediction, Predictor
from anomalyclip.preprocess import ImageSource, PreProcessor, ResizeMode, describe
from anomalyclip.utils.atomic import atomic_open
from anomalyclip.utils.safe_load import refuse_non_finite, safe_torch_load

logger = logging.getLogger(__name__)

BANK_FORMAT = "anomalyclip-musc-reference-bank"
BANK_VERSION = 1
# how a bank's references were fitted to S x S (banks written before it: the centre crop)
BANK_RESIZES: tuple[ResizeMode, ...] = ("center-crop", "squash")


def nearest_gaps(queries: Tensor, reference: Tensor, block: int = 2048) -> Tensor:
    """(L,) Euclidean distance of each query vector to its nearest reference vector.

    Unit vectors: the nearest is the largest dot product (one matrix product); the
    distance is then taken on that pair, which keeps float32 rounding at 1e-7.
    """
    gaps = torch.empty(len(queries), device=queries.device)
    for start in range(0, len(queries), block):
        part = queries[start : start + block]
        nearest = (part @ reference.T).argmax(dim=1)
        gaps[start : start + block] = (reference[nearest] - part).norm(dim=1)
    return gaps


def _vectors(musc: MuSc, images: Tensor) -> dict[tuple[int, int], Tensor]:
    """(degree, layer) -> (N, L, C) LNAMD vectors of preprocessed images."""
    tokens, _ = musc.features(images)
    return {
        (degree, layer): lnamd(tokens[layer], degree)
        for layer in musc.config.features
        for degree in musc.config.degrees
    }


class MuScWithReferences(Predictor):
    """MuSc scoring each image against a bank of known-good images (see module notes)."""

    method = "musc"

    def __init__(
        self,
        musc: MuSc,
        bank: dict[tuple[int, int], Tensor],
        sources: Sequence[str],
        resize: ResizeMode = "center-crop",
    ) -> None:
        self.musc = musc
        self.bank = bank
        self.sources = list(sources)
        self.resize = resize  # how the references, and so the images scored, are fitted
        self.keep = neighbour_count(len(self.sources) + 1, musc.config.interval)
        self._said_rscin = False
        self._said_cropped = False

    @classmethod
    def from_images(cls, musc: MuSc, references: Sequence[ImageSource]) -> MuScWithReferences:
        """Encode the references once, fitted as their shapes need (see the module
        notes): their LNAMD vectors are the bank."""
        images = load_references(references)
        resize = musc.cover([image.size for image in images])
        preprocessor = PreProcessor(musc.config.image_size, resize)
        batch = torch.stack([preprocessor.tensor(image) for image in images])
        with torch.no_grad():
            bank = _vectors(musc, batch)
        return cls(musc, bank, [describe(source) for source in references], resize)

    def identity(self) -> dict[str, Any]:
        """What the bank's vectors depend on: another backbone or setting makes them
        incomparable."""
        config = self.musc.config
        return {
            "backbone_sha256": self.musc.backbone.sha256,
            "image_size": config.image_size,
            "features": [int(layer) for layer in config.features],
            "degrees": [int(degree) for degree in config.degrees],
        }

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """The bank as one file, written atomically (``dtype`` float16 halves it)."""
        record = {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "vectors": {f"{d},{layer}": v.to(dtype).cpu() for (d, layer), v in self.bank.items()},
            "identity": self.identity(),
            "sources": self.sources,
            "resize": self.resize,
        }
        target = Path(path)
        with atomic_open(target, "wb") as handle:
            torch.save(record, handle)
        return target

    @classmethod
    def load(cls, musc: MuSc, path: str | Path) -> MuScWithReferences:
        """A saved bank, refused when made with another backbone or settings."""
        data = safe_torch_load(path, "MuSc reference bank")
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT:
            raise ReferenceError(f"{path} is not a MuSc reference bank written by anomalyclip")
        bank = {
            (int(key.split(",")[0]), int(key.split(",")[1])): value.float()
            for key, value in data["vectors"].items()
        }
        # NaN vectors would make every score NaN, which reads as "normal"
        refuse_non_finite(
            {f"vectors.{d},{layer}": v for (d, layer), v in bank.items()}, f"{path}: "
        )
        resize = data.get("resize", "center-crop")
        if resize not in BANK_RESIZES:
            raise ReferenceError(
                f"{path}: resize is {resize!r}, not one of {', '.join(BANK_RESIZES)}"
            )
        loaded = cls(musc, bank, data["sources"], resize)
        differences = identity_differences(data["identity"], loaded.identity())
        if differences:
            raise ReferenceError(
                f"{path} was made for another model (" + "; ".join(differences) + ")"
            )
        return loaded

    @property
    def count(self) -> int:
        return len(self.sources)

    def reference_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.bank.values())

    @property
    def preprocessor(self) -> PreProcessor:
        return PreProcessor(self.musc.config.image_size, self.resize)

    def predict_images(self, images: Sequence[Image.Image]) -> list[AnomalyPrediction]:
        """Scored as the bank was made; where that is the centre crop and an image is not
        square, the log says how much of it is not scored (once per model)."""
        if self.resize == "center-crop" and not self._said_cropped:
            lost = [1 - min(image.size) / max(image.size) for image in images]
            cropped = sum(share > CROP_LOSS_TOLERANCE for share in lost)
            if cropped:
                logger.warning(
                    "MuSc with references: the bank holds centre crops (its references are "
                    "square or --musc-coverage center-crop); %d of %d images are not square, "
                    "up to %.0f %% of each lies outside the centre square and is not scored",
                    cropped,
                    len(lost),
                    100 * max(lost),
                )
                self._said_cropped = True
        return super().predict_images(images)

    @property
    def postprocessor(self) -> PostProcessor:
        return PostProcessor(map_range=MAP_RANGE)

    def settings(self) -> dict[str, Any]:
        return {
            **self.musc.settings(),
            "references": {"count": self.count, "sources": self.sources, "resize": self.resize},
            "rscin": "skipped: images are scored one at a time against the references",
        }

    def patch_scores(self, images: Tensor) -> np.ndarray:
        """(B, L) float64 patch scores, each image against the references."""
        config = self.musc.config
        tested = _vectors(self.musc, images)
        per_degree = []
        for degree in config.degrees:
            per_layer = []
            for layer in config.features:
                queries, bank = tested[(degree, layer)], self.bank[(degree, layer)]
                scores = torch.empty(queries.shape[:2], dtype=torch.float64)
                for index, query in enumerate(queries):
                    gaps = torch.stack([nearest_gaps(query, reference) for reference in bank])
                    smallest = gaps.topk(self.keep, dim=0, largest=False).values
                    scores[index] = smallest.double().mean(dim=0)
                per_layer.append(scores.numpy())
            per_degree.append(np.mean(per_layer, axis=0))
        return np.mean(per_degree, axis=0)

    def score_tensors(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        if not self._said_rscin:
            logger.info("MuSc with references: RsCIN skipped (images scored one at a time)")
            self._said_rscin = True
        with torch.no_grad():
            maps, maxima = self.musc.maps_from_patch_scores(self.patch_scores(images))
        return maxima.astype(np.float32), maps


def _bare(predictor: Predictor) -> MuSc:
    """The method under a reference mode (new references replace the old ones); anything
    else of this name (an exported model) has no reference mode."""
    bare = predictor.musc if isinstance(predictor, MuScWithReferences) else predictor
    if not isinstance(bare, MuSc):
        raise ReferenceError(f"references need the torch {predictor.method} model")
    return bare


def references_for(predictor: Predictor, references: Sequence[ImageSource]) -> MuScWithReferences:
    """The reference mode of ``predictor`` for these known-good images (the registry's
    entry point: :mod:`anomalyclip.methods`)."""
    return MuScWithReferences.from_images(_bare(predictor), references)


def bank_for(predictor: Predictor, path: str | Path) -> MuScWithReferences:
    """The reference mode of ``predictor`` for a bank saved earlier."""
    return MuScWithReferences.load(_bare(predictor), path)


def save_bank(predictor: Predictor, path: str | Path, dtype: str = "float32") -> Path:
    """Write the bank a reference-mode MuSc scores with (float16 halves it)."""
    if not isinstance(predictor, MuScWithReferences):
        raise ReferenceError(f"{predictor.method} has no reference bank here: give --reference")
    return predictor.save(path, getattr(torch, bank_dtype(dtype)))


# A bank kept by content (anomalyclip watch's rolling bank) -------------------------------


@dataclass(frozen=True)
class EncodedReference:
    """One reference's LNAMD vectors, and its size and the fitting they were made with
    (a bank's fitting depends on all its images' shapes: :meth:`MuSc.cover`)."""

    size: tuple[int, int]
    resize: ResizeMode
    vectors: dict[tuple[int, int], Tensor]


def _encode(musc: MuSc, image: Image.Image, resize: ResizeMode) -> EncodedReference:
    preprocessor = PreProcessor(musc.config.image_size, resize)
    with torch.no_grad():
        vectors = _vectors(musc, preprocessor.tensor(image)[None])
    return EncodedReference(image.size, resize, vectors)


def encode_references(
    predictor: Predictor, references: Sequence[ImageSource]
) -> list[EncodedReference]:
    """Each reference's LNAMD vectors, encoded on its own: the bank :meth:`from_images`
    makes is their concatenation in order. A stream keeps them by the images' content,
    so a bank that changes by one image encodes only that one."""
    musc = _bare(predictor)
    images = load_references(references)
    resize = musc.cover([image.size for image in images])
    return [_encode(musc, image, resize) for image in images]


def references_from_encoded(
    predictor: Predictor, encoded: Sequence[EncodedReference], sources: Sequence[ImageSource]
) -> MuScWithReferences:
    """The reference mode for references encoded earlier by :func:`encode_references`:
    the bank :meth:`MuScWithReferences.from_images` of ``sources`` makes (a reference
    fitted otherwise than the whole bank's shapes now ask is encoded again)."""
    if not encoded:
        raise ReferenceError("no reference images given")
    musc = _bare(predictor)
    resize = musc.cover([one.size for one in encoded])
    fitted = [
        one if one.resize == resize else _encode(musc, load_references([source])[0], resize)
        for one, source in zip(encoded, sources, strict=True)
    ]
    bank = {key: torch.cat([one.vectors[key] for one in fitted]) for key in fitted[0].vectors}
    return MuScWithReferences(musc, bank, [describe(source) for source in sources], resize)

"""MuSc with references: each image scored against known-good images, one at a time.

Zero-shot MuSc needs a set: its images score each other. With a few known-good parts a
user can score a single image instead: the references take the place of the set's other
images, with everything else as in :mod:`anomalyclip.methods.musc`:

* the references' LNAMD vectors (per feature layer and aggregation degree) are computed
  once, from the same features, and kept as the bank;
* for a patch p of the test image and each reference r, d_r(p) is the Euclidean distance
  to the nearest LNAMD vector of r (the distance computed on the pair, as MSM does);
* the patch's score is the mean of the smallest ``max(1, int(R * interval))`` of the R
  values: the same 0-30 % interval rule, over the references instead of the N - 1
  other images of a set;
* patch scores are averaged over layers, then degrees; the map is their bilinear
  upsampling (align_corners True) and the image score its maximum.

RsCIN is skipped: it smooths scores over the images of one set (min-max normalised over
the set), which a single image does not have. Scores are therefore the raw MuSc scores
(distances, not normalised to [0, 1]), comparable across images scored against the same
references, and thresholds calibrated with those references hold for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomalyclip.methods.musc import MAP_RANGE, MuSc, lnamd, neighbour_count
from anomalyclip.methods.references import ReferenceError
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import ImageSource, PreProcessor, describe, load_image

logger = logging.getLogger(__name__)


class MuScReferenceError(ReferenceError):
    """References MuSc cannot use: none, or unreadable."""


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


class MuScWithReferences(Predictor):
    """MuSc scoring each image against a bank of known-good images (see module notes)."""

    method = "musc"

    def __init__(self, musc: MuSc, references: Sequence[ImageSource]) -> None:
        if not references:
            raise MuScReferenceError("no reference images given")
        images = []
        for source in references:
            try:
                images.append(load_image(source))
            except ValueError as error:
                raise MuScReferenceError(f"reference {error}") from None
        self.musc = musc
        self.sources = [describe(source) for source in references]
        batch = torch.stack([musc.preprocessor.tensor(image) for image in images])
        self.bank = self._vectors(batch)
        self.keep = neighbour_count(len(images) + 1, musc.config.interval)
        self._said_rscin = False

    @property
    def count(self) -> int:
        return len(self.sources)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.bank.values())

    def _vectors(self, images: Tensor) -> dict[tuple[int, int], Tensor]:
        """(degree, layer) -> (N, L, C) LNAMD vectors of preprocessed images."""
        tokens, _ = self.musc.features(images)
        return {
            (degree, layer): lnamd(tokens[layer], degree)
            for layer in self.musc.config.features
            for degree in self.musc.config.degrees
        }

    @property
    def preprocessor(self) -> PreProcessor:
        return self.musc.preprocessor

    @property
    def postprocessor(self) -> PostProcessor:
        return PostProcessor(map_range=MAP_RANGE)

    def settings(self) -> dict[str, Any]:
        return {
            **self.musc.settings(),
            "references": {"count": self.count, "sources": self.sources},
            "rscin": "skipped: images are scored one at a time against the references",
        }

    def patch_scores(self, images: Tensor) -> np.ndarray:
        """(B, L) float64 patch scores, each image against the references."""
        config = self.musc.config
        tested = self._vectors(images)
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

"""Tiled scoring: big or elongated images scored in overlapping square tiles.

Squashing a 20-megapixel photo or a 2700 x 900 ball screw whole into the model's S x S
input shrinks a small defect below the patch size (and distorts the aspect), so it
vanishes from the map. :class:`TiledPredictor` wraps any per-image
:class:`~anomalyclip.predictor.Predictor` instead:

* **Tiles.** Square tiles of ``tile_size`` original pixels (never more than the
  image's shorter side, so a tile is never squashed), ``overlap`` of a tile shared with
  each neighbour; the last row and column are aligned with the image's edges, so every
  pixel is covered and no tile is padded.
* **Scoring.** Each tile goes through the wrapped method's own preprocessing (a square
  tile resized to S x S keeps its aspect), tiles of all images batched together.
* **Stitching.** Each tile's S x S map is resized bilinearly to the tile's footprint on a
  canvas at the maps' native scale (S / tile pixels per original pixel) and blended with
  weights that fall linearly to the tile's border within the overlap, so seams do not
  show; the canvas is mapped to the original size like any other map, on demand.
* **References.** A reference mode under tiles compares tiles with tiles: the bank is
  made from the references cut with the same tiling (:func:`reference_tiles`), so a
  tile's patches meet good patches at the same scale. A bank made from whole references
  is at another scale (a whole image squashed to S x S), and every tile then looks
  unlike it: detection inverts.
* **Image score.** The maximum over the tiles' scores: a defect in one tile makes the
  image anomalous, as with the maximum of a map. Thresholds calibrated with tiling are
  for tiling (the maximum over more tiles is higher on normal images too).
* **Set methods** (MuSc, whose images score each other: :class:`TiledSetPredictor`,
  chosen by :func:`tiled`). The tiles at one position of every image (the k-th tile of
  each, row by row) form a set, scored as one: a tile meets the same region of the
  other parts at the same scale, and the work stays that of the untiled set per
  position. A position fewer than two images reach (images of other sizes) joins the
  first position's set. A tile's score is its map's maximum (the raw score: a set's
  image scores are relative to that set, so maxima over sets would not compare), and
  the image's the maximum over its tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from anomalyclip.maps import upsample
from anomalyclip.methods.references import load_references
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import AnomalyPrediction, Predictor, check_finite
from anomalyclip.preprocess import ImageSource, PreProcessor, describe


@dataclass(frozen=True)
class Tiling:
    """Tile side in original pixels and the share of it each neighbour overlaps."""

    tile_size: int
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ValueError(f"tile size must be a positive number of pixels, got {self.tile_size}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"tile overlap must be in [0, 1), got {self.overlap}")

    def side(self, size: tuple[int, int]) -> int:
        """The tile side for an image of (width, height): at most its shorter side."""
        return min(self.tile_size, *size)

    def starts(self, length: int, side: int) -> list[int]:
        """Tile starts along one axis: stride side * (1 - overlap), the last at the edge."""
        if length <= side:
            return [0]
        stride = max(1, int(side * (1 - self.overlap)))
        count = math.ceil((length - side) / stride) + 1
        starts = [min(index * stride, length - side) for index in range(count)]
        return sorted(set(starts))

    def boxes(self, size: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(left, top, side) of every tile of an image of (width, height), row by row."""
        width, height = size
        side = self.side(size)
        return [
            (left, top, side)
            for top in self.starts(height, side)
            for left in self.starts(width, side)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"tile_size": self.tile_size, "overlap": self.overlap}


def reference_tiles(references: Sequence[ImageSource], tiling: Tiling) -> list[Image.Image]:
    """The references decoded and cut into tiles as :class:`TiledPredictor` cuts the
    images it scores: the bank of a reference mode under tiles (see the module notes)."""
    return [
        image.crop((left, top, left + side, top + side))
        for image in load_references(references)
        for left, top, side in tiling.boxes(image.size)
    ]


def blend_weights(height: int, width: int, ramp: int) -> np.ndarray:
    """(height, width) weights: 1 inside, falling linearly to 1 / (ramp + 1) at the border.

    Never zero, so a pixel covered by a single tile (an image edge) keeps its value.
    """

    def profile(length: int) -> np.ndarray:
        position = np.arange(length, dtype=np.float32)
        distance = np.minimum(position, length - 1 - position)
        return np.minimum(1.0, (distance + 1) / (max(ramp, 0) + 1))

    return np.outer(profile(height), profile(width)).astype(np.float32)


class TiledPredictor(Predictor):
    """Any per-image method, scored tile by tile on big or elongated images."""

    def __init__(self, inner: Predictor, tiling: Tiling, batch_size: int = 8) -> None:
        if inner.scores_sets and not self.scores_sets:
            raise ValueError(
                f"{inner.method} scores the images of a set against each other: tile it "
                "with tiled(), which scores each tile position as a set"
            )
        self.inner = inner
        self.tiling = tiling
        self.batch_size = batch_size
        self.method = inner.method

    def layers(self) -> tuple[Predictor, Callable[[Predictor], Predictor]]:
        inner, wrap = self.inner.layers()
        return inner, lambda method: tiled(wrap(method), self.tiling, self.batch_size)

    def decodes_full_resolution(self) -> bool:
        return True  # tiles are cut from the full-size image

    def reference_views(self, references: Sequence[ImageSource]) -> Sequence[ImageSource]:
        """The references' tiles, cut as the images scored are cut."""
        return self.inner.reference_views(reference_tiles(references, self.tiling))

    @property
    def preprocessor(self) -> PreProcessor:
        return self.inner.preprocessor

    @property
    def postprocessor(self) -> PostProcessor:
        return self.inner.postprocessor

    def settings(self) -> dict[str, Any]:
        return {**self.inner.settings(), "tiling": self.tiling.to_dict()}

    def score_tensors(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed inputs are already model-sized: they are scored as they are."""
        return self.inner.score_tensors(images)

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the stitched map: the original at the maps' native scale."""
        scale = self.preprocessor.size / self.tiling.side(size)
        width, height = size
        return max(1, round(width * scale)), max(1, round(height * scale))

    def score_tiles(
        self, images: Sequence[Image.Image], tiles: list[tuple[int, tuple[int, int, int]]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and (S, S) maps of ``tiles`` ((image index, box) each), in batches."""
        preprocessor = self.preprocessor
        scores = np.zeros(len(tiles), dtype=np.float64)
        maps = np.zeros((len(tiles), preprocessor.size, preprocessor.size), dtype=np.float32)
        for start in range(0, len(tiles), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(tiles))))
            scores[chunk], maps[chunk] = self.inner.score_tensors(self.batch(images, tiles, chunk))
        return scores, maps

    def batch(
        self,
        images: Sequence[Image.Image],
        tiles: list[tuple[int, tuple[int, int, int]]],
        numbers: list[int],
    ) -> torch.Tensor:
        """The tiles numbered ``numbers``, cut and preprocessed, as one tensor."""
        crops = []
        for number in numbers:
            index, (left, top, side) = tiles[number]
            crops.append(images[index].crop((left, top, left + side, top + side)))
        return torch.stack([self.preprocessor.tensor(crop) for crop in crops])

    def predict_images(self, images: Sequence[Image.Image]) -> list[AnomalyPrediction]:
        preprocessor = self.preprocessor
        tiles = [
            (index, box)
            for index, image in enumerate(images)
            for box in self.tiling.boxes(image.size)
        ]
        scores, maps = self.score_tiles(images, tiles)
        results = []
        for index, image in enumerate(images):
            own = [position for position, (owner, _) in enumerate(tiles) if owner == index]
            stitched = self._stitch(image.size, [tiles[p][1] for p in own], maps[own])
            score = float(scores[own].max())
            check_finite(self.method, f"image {index + 1} of the batch", score, stitched)
            results.append(
                AnomalyPrediction(
                    describe(image),
                    score,
                    stitched,
                    image.size,
                    PreProcessor(preprocessor.size, "squash", preprocessor.mean, preprocessor.std),
                    self.postprocessor,
                )
            )
        return results

    def _stitch(
        self, size: tuple[int, int], boxes: list[tuple[int, int, int]], maps: np.ndarray
    ) -> np.ndarray:
        """Tile maps blended on a canvas at the maps' native scale (see the module notes)."""
        canvas_width, canvas_height = self.canvas_size(size)
        scale_x, scale_y = canvas_width / size[0], canvas_height / size[1]
        total = np.zeros((canvas_height, canvas_width), dtype=np.float64)
        weight = np.zeros_like(total)
        for (left, top, side), tile_map in zip(boxes, maps, strict=True):
            x0, y0 = round(left * scale_x), round(top * scale_y)
            x1 = min(canvas_width, round((left + side) * scale_x))
            y1 = min(canvas_height, round((top + side) * scale_y))
            footprint = torch.from_numpy(np.ascontiguousarray(tile_map))[None]
            placed = upsample(footprint, (y1 - y0, x1 - x0))[0].numpy()
            ramp = round(self.tiling.overlap * min(y1 - y0, x1 - x0))
            blend = blend_weights(y1 - y0, x1 - x0, ramp)
            total[y0:y1, x0:x1] += blend * placed
            weight[y0:y1, x0:x1] += blend
        return (total / np.maximum(weight, 1e-12)).astype(np.float32)


class TiledSetPredictor(TiledPredictor):
    """A set method (its images score each other) in tiles: each tile position's tiles
    scored as one set (see the module notes)."""

    scores_sets: ClassVar[bool] = True

    def score_tiles(
        self, images: Sequence[Image.Image], tiles: list[tuple[int, tuple[int, int, int]]]
    ) -> tuple[np.ndarray, np.ndarray]:
        size = self.preprocessor.size
        maps = np.zeros((len(tiles), size, size), dtype=np.float32)
        for numbers in position_sets(tiles):
            _, maps[numbers] = self.inner.score_tensors(self.batch(images, tiles, numbers))
        return maps.reshape(len(tiles), -1).max(axis=1).astype(np.float64), maps


def position_sets(tiles: list[tuple[int, tuple[int, int, int]]]) -> list[list[int]]:
    """The tile numbers of each set: the k-th tiles of all images; a position fewer than
    two images reach joins the first position's set."""
    positions: dict[int, list[int]] = {}
    seen: dict[int, int] = {}
    for number, (owner, _) in enumerate(tiles):
        position = seen.get(owner, 0)
        seen[owner] = position + 1
        positions.setdefault(position, []).append(number)
    sets = [numbers for numbers in positions.values() if len(numbers) >= 2]
    lone = [number for numbers in positions.values() if len(numbers) < 2 for number in numbers]
    if lone and sets:
        sets[0] = sorted(sets[0] + lone)
    elif lone:
        sets = [lone]
    return sets


def tiled(inner: Predictor, tiling: Tiling, batch_size: int = 8) -> TiledPredictor:
    """``inner`` scored in tiles: a set method's tiles in sets, one per tile position."""
    kind = TiledSetPredictor if inner.scores_sets else TiledPredictor
    return kind(inner, tiling, batch_size)

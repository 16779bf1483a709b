"""Tiled scoring: tile geometry, stitching placed on the original, and a small defect on a
real wide image that squashing the whole image loses and tiles keep."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomalyclip.methods.tiled import TiledPredictor, Tiling, blend_weights, tiled
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import PreProcessor

SIZE = 64


class Brightness(Predictor):
    """Map = the input's grey level; score = its mean. Placement errors show as offsets."""

    method = "brightness"

    @property
    def preprocessor(self) -> PreProcessor:
        return PreProcessor(SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    @property
    def postprocessor(self) -> PostProcessor:
        return PostProcessor(map_range=(0.0, 1.0))

    def settings(self) -> dict[str, Any]:
        return {}

    def score_tensors(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        grey = images.mean(dim=1)
        return grey.mean(dim=(1, 2)).numpy(), grey.numpy()


class LocalContrast(Brightness):
    """Map = |grey - its 5 x 5 box mean|: a patch-comparison stand-in that finds spots."""

    method = "contrast"

    def score_tensors(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        grey = images.mean(dim=1, keepdim=True)
        local = F.avg_pool2d(F.pad(grey, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
        contrast = (grey - local).abs()[:, 0]
        return contrast.amax(dim=(1, 2)).numpy(), contrast.numpy()


def test_tiles_are_square_cover_the_image_and_end_at_its_edges():
    tiling = Tiling(tile_size=100, overlap=0.25)
    boxes = tiling.boxes((330, 120))
    assert {side for _, _, side in boxes} == {100}
    lefts, tops = sorted({b[0] for b in boxes}), sorted({b[1] for b in boxes})
    assert lefts == [0, 75, 150, 225, 230] and tops == [0, 20]
    covered = np.zeros((120, 330), dtype=int)
    for left, top, side in boxes:
        covered[top : top + side, left : left + side] += 1
    assert covered.min() >= 1
    # a tile larger than the shorter side shrinks to it, so no tile is ever squashed
    assert Tiling(tile_size=500).boxes((900, 300)) == [
        (0, 0, 300),
        (225, 0, 300),
        (450, 0, 300),
        (600, 0, 300),
    ]
    assert Tiling(tile_size=64).boxes((64, 64)) == [(0, 0, 64)]
    with pytest.raises(ValueError, match="overlap must be in"):
        Tiling(tile_size=64, overlap=1.0)


def test_blend_weights_fall_to_the_border_and_never_vanish():
    weights = blend_weights(6, 8, ramp=2)
    assert weights.shape == (6, 8)
    assert weights[2:4, 2:6].min() == 1.0
    assert weights[0, 0] == pytest.approx(1 / 9) and weights.min() > 0


def test_stitched_map_lands_where_its_pixels_are(shared_dir):
    folder = shared_dir / "datasets" / "metal_plate" / "test" / "good"
    parts = [Image.open(path).convert("RGB") for path in sorted(folder.iterdir())[:3]]
    wide = Image.new("RGB", (sum(p.width for p in parts), parts[0].height))
    for index, part in enumerate(parts):
        wide.paste(part, (index * part.width, 0))
    tiled = TiledPredictor(Brightness(), Tiling(tile_size=256, overlap=0.25), batch_size=5)
    (prediction,) = tiled.predict_images([wide])
    assert prediction.anomaly_map.shape == (SIZE * 2, SIZE * 6)  # 512 x 1536 at 64/256
    placed = prediction.map_at_original_size()
    assert placed.shape == (wide.height, wide.width)
    grey = np.asarray(wide.convert("RGB"), dtype=np.float32).mean(axis=2) / 255.0
    # the map is the image at a quarter of its resolution: blurred, never shifted
    blurred = np.asarray(
        Image.fromarray(grey).resize((384, 128), Image.Resampling.BOX).resize(wide.size)
    )
    assert np.abs(placed - blurred).mean() < 0.02
    assert np.corrcoef(placed.ravel(), grey.ravel())[0, 1] > 0.9
    assert tiled.settings()["tiling"] == {"tile_size": 256, "overlap": 0.25}


def test_a_small_defect_on_a_wide_image_survives_tiling_not_squashing(shared_dir):
    folder = shared_dir / "datasets" / "metal_plate" / "test" / "good"
    parts = [Image.open(path).convert("RGB") for path in sorted(folder.iterdir())[3:7]]
    wide = Image.new("RGB", (sum(p.width for p in parts), parts[0].height))
    for index, part in enumerate(parts):
        wide.paste(part, (index * part.width, 0))
    array = np.asarray(wide).copy()
    top, left, side = 300, 1400, 8  # an 8 x 8 px bright speck on a 2048 x 512 plate
    array[top : top + side, left : left + side] = 255
    defective = Image.fromarray(array)
    defect = np.zeros((wide.height, wide.width), dtype=bool)
    defect[top : top + side, left : left + side] = True

    def contrast_of(predictor: Predictor) -> tuple[float, float]:
        """(defect's peak, 99.9th percentile elsewhere) of the map on the original."""
        (prediction,) = predictor.predict_images([defective])
        placed = prediction.map_at_original_size()
        return float(placed[defect].max()), float(np.quantile(placed[~defect], 0.999))

    squashed_peak, squashed_rest = contrast_of(LocalContrast())
    tiled_peak, tiled_rest = contrast_of(TiledPredictor(LocalContrast(), Tiling(64)))
    assert squashed_peak < 0.5 * squashed_rest  # lost among the plate's texture (0.07, 0.32)
    assert tiled_peak > 2 * tiled_rest  # stands out (0.52 against 0.19)


def test_set_methods_are_tiled_through_tiled_only():
    class SetMethod(Brightness):
        scores_sets = True

    with pytest.raises(ValueError, match="tile it with tiled\\(\\), which scores each tile"):
        TiledPredictor(SetMethod(), Tiling(64))
    assert tiled(SetMethod(), Tiling(64)).scores_sets is True
    assert tiled(Brightness(), Tiling(64)).scores_sets is False


def test_musc_in_tiles_scores_each_position_as_a_set_on_wide_parts(shared_dir):
    """Issue 24, item 6b: --tile-size was refused for MuSc. Three 1536 x 512 parts of real
    metal plates, tiles the plates: the middle plates are one MuSc set, and the stitched
    map's middle third is exactly that set's maps."""
    from anomalyclip.methods.musc.model import MuSc, MuScConfig
    from tests.factories import tiny_clip

    plates = sorted((shared_dir / "datasets" / "metal_plate" / "test" / "good").iterdir())
    parts, middles = [], []
    for index in range(3):
        part = Image.new("RGB", (1536, 512))
        for slot in range(3):
            part.paste(Image.open(plates[3 * index + slot]).convert("RGB"), (512 * slot, 0))
        parts.append(part)
        middles.append(part.crop((512, 0, 1024, 512)))
    musc = MuSc(tiny_clip(), MuScConfig(backbone="tiny", image_size=32, features=(2, 4)))
    predictor = tiled(musc, Tiling(512, 0.0))
    predictions = predictor.predict_images(parts)
    _, middle_maps = musc.score_tensors(musc.preprocessor(middles))
    for prediction, middle in zip(predictions, middle_maps, strict=True):
        assert prediction.anomaly_map.shape == (32, 96)  # the plates side by side
        assert prediction.anomaly_map[:, 32:64] == pytest.approx(middle, abs=1e-5)
        assert prediction.score == pytest.approx(float(prediction.anomaly_map.max()), abs=1e-5)
    # every plate is scored: the outer thirds vary too
    assert all(
        p.anomaly_map[:, :32].std() > 0 and p.anomaly_map[:, 64:].std() > 0 for p in predictions
    )

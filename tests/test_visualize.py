"""Overlays, masks and colour maps: exact colours, sizes and the fixed normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from anomalyclip.colormaps import COLORMAPS, colormap_table
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyPrediction
from anomalyclip.visualize import (
    colorbar,
    colorize,
    defect_mask,
    encode_png,
    normalise,
    overlay,
    resize_map,
)


def pixel(image: Image.Image, x: int = 0, y: int = 0) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[y, x])


def test_jet_table_matches_opencv_anchor_colours():
    table = colormap_table("jet")
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert tuple(table[0]) == (0, 0, 128)  # dark blue
    assert tuple(table[255]) == (128, 0, 0)  # dark red
    # blue at 1/8, cyan at 3/8, yellow at 5/8 (the anchors fall between table entries)
    expected = [(0, 0, 255), (0, 255, 255), (255, 255, 0)]
    np.testing.assert_allclose(table[[32, 96, 159]], expected, atol=2)


@pytest.mark.parametrize("name", [n for n in COLORMAPS if n != "jet"])
def test_other_colour_maps_brighten_steadily(name):
    brightness = colormap_table(name).astype(int).sum(axis=1)
    assert brightness.shape == (256,)
    assert np.all(np.diff(brightness) >= -1)  # rounding may wobble by one
    assert brightness[-1] - brightness[0] > 300


def test_unknown_colour_map_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown colour map 'rainbow'; choose one of jet"):
        colormap_table("rainbow")


def test_fixed_range_gives_the_same_colour_for_the_same_value_on_every_image():
    quiet = np.full((4, 4), 1.0, np.float32)
    loud = quiet.copy()
    loud[0, 0] = 4.0
    assert pixel(colorize(quiet, 0.0, 4.0), 1, 1) == pixel(colorize(loud, 0.0, 4.0), 1, 1)
    expected = tuple(colormap_table("jet")[round(1.0 / 4.0 * 255)])
    assert pixel(colorize(quiet, 0.0, 4.0), 1, 1) == expected
    # Per-image stretching paints the same value differently.
    assert pixel(colorize(quiet, vmin=None, vmax=None), 1, 1) == (0, 0, 128)
    assert pixel(colorize(loud, vmax=None), 1, 1) != pixel(colorize(quiet, vmax=None), 1, 1)


def test_normalise_clips_to_the_range_and_handles_flat_and_nan_maps():
    values = np.array([[-1.0, 0.0, 2.0, 4.0, 9.0, np.nan]], np.float32)
    np.testing.assert_allclose(normalise(values, 0.0, 4.0), [[0.0, 0.0, 0.5, 1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(normalise(np.full((2, 2), 3.0), None, None), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="vmax 1.0 is below vmin 2.0"):
        normalise(values, vmin=2.0, vmax=1.0)


def test_map_range_is_zero_to_the_number_of_layers():
    assert AnomalyCLIPConfig().map_range == (0.0, 4.0)
    assert AnomalyCLIPConfig(features=(3, 6, 9)).postprocessor().map_range == (0.0, 3.0)


def test_default_overlay_of_a_prediction_uses_the_models_map_range():
    """Bug: overlays of the registered one-layer checkpoints were painted over [0, 4]."""
    config = AnomalyCLIPConfig(features=(24,))  # the registered mvtec/visa setting
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    prediction = AnomalyPrediction(
        "x",
        0.9,
        np.full((8, 8), 1.0, np.float32),
        (8, 8),
        config.preprocessor(),
        config.postprocessor(),
    )
    top = tuple(colormap_table("jet")[255])
    assert pixel(overlay(image, prediction, alpha=1.0), 3, 3) == top
    # The same map under a four-layer model sits at a quarter of the range.
    four = AnomalyCLIPConfig().postprocessor()
    prediction.postprocessor = four
    quarter = tuple(colormap_table("jet")[round(255 / 4)])
    assert pixel(overlay(image, prediction, alpha=1.0), 3, 3) == quarter


def test_overlay_is_at_the_image_resolution_and_blends_by_alpha():
    image = Image.new("L", (50, 30), 200)  # grayscale input, as magnetic_tile's JPGs
    low = np.zeros((8, 8), np.float32)
    high = np.full((8, 8), 4.0, np.float32)
    blended = overlay(image, low, alpha=0.5)
    assert blended.size == (50, 30) and blended.mode == "RGB"
    assert pixel(blended) == (100, 100, 164)  # (200 + 0) / 2, (200 + 128) / 2
    assert pixel(overlay(image, high, alpha=1.0), 49, 29) == (128, 0, 0)
    assert pixel(overlay(image, high, alpha=0.0)) == (200, 200, 200)
    with pytest.raises(ValueError, match="alpha must be in"):
        overlay(image, low, alpha=1.5)


def test_overlay_places_the_hot_spot_where_the_map_has_it():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    anomaly_map = np.zeros((8, 8), np.float32)
    anomaly_map[:, 6:] = 4.0  # right quarter
    shown = np.asarray(overlay(image, anomaly_map, alpha=1.0))
    assert tuple(shown[16, 60]) == (128, 0, 0)
    assert tuple(shown[16, 4]) == (0, 0, 128)


def test_resize_map_equals_the_prediction_at_original_size():
    rng = np.random.default_rng(0)
    anomaly_map = rng.random((16, 16), dtype=np.float32) * 4
    prediction = AnomalyPrediction("x", 0.5, anomaly_map, original_size=(37, 23))
    resized = resize_map(anomaly_map, (37, 23))
    assert resized.shape == (23, 37)
    np.testing.assert_allclose(resized, prediction.map_at_original_size(), atol=1e-6)
    np.testing.assert_array_equal(resize_map(resized, (37, 23)), resized)


def test_defect_mask_is_binary_and_inclusive_at_the_threshold():
    anomaly_map = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    mask = defect_mask(anomaly_map, 2.0)
    assert mask.mode == "L" and mask.size == (2, 2)
    np.testing.assert_array_equal(np.asarray(mask), [[0, 0], [255, 255]])
    large = defect_mask(anomaly_map, 2.0, size=(20, 10))
    assert large.size == (20, 10)
    assert set(np.unique(np.asarray(large))) == {0, 255}
    assert np.asarray(large)[0, 0] == 0 and np.asarray(large)[9, 19] == 255


def test_maps_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"must be 2-D \(H, W\), got shape \(2, 3, 4\)"):
        defect_mask(np.zeros((2, 3, 4)), 0.5)
    assert defect_mask(np.zeros((1, 3, 4)), 0.5).size == (4, 3)


def test_encode_png_round_trips():
    image = overlay(Image.new("RGB", (9, 7), (10, 20, 30)), np.eye(3, dtype=np.float32))
    data = encode_png(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = Image.open(io.BytesIO(data))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))


def test_colorbar_runs_from_low_to_high():
    bar = colorbar(100, 5)
    assert bar.size == (100, 5)
    assert pixel(bar, 0, 0) == (0, 0, 128) and pixel(bar, 99, 4) == (128, 0, 0)
    with pytest.raises(ValueError, match="colorbar size must be positive"):
        colorbar(0, 5)


def test_the_service_a_run_folder_and_the_report_draw_with_one_renderer(tmp_path):
    """One renderer for every output: the service's overlay of an image is the run
    folder's, pixel for pixel (same reduction, colour map and scale: the pixel threshold
    mid-scale), and the report's legend is drawn in the run's colour map."""
    import base64

    from fastapi.testclient import TestClient

    from anomalyclip.inspection.run import inspect
    from anomalyclip.serving import ServiceSettings, create_app
    from tests.helpers import decode_png, noise_png, tiny_service_model

    data = noise_png(300, 180, seed=4)
    source = tmp_path / "part.png"
    source.write_bytes(data)
    model = tiny_service_model(pixel_threshold=0.9)
    summary = inspect(
        [source],
        model,
        tmp_path / "run",
        progress=False,
        overlay_format="png",
        overlay_max_side=100,
    )
    written = np.asarray(Image.open(tmp_path / "run" / summary.results[0].overlay))
    assert summary.colour_scale == pytest.approx((0.0, 1.8))  # threshold mid-scale
    with TestClient(create_app(model, ServiceSettings(overlay_max_side=100))) as client:
        answer = client.post("/v1/predict", files={"file": ("part.png", data, "image/png")})
    served = np.asarray(decode_png(answer.json()["overlay_png"]))
    assert served.shape == written.shape == (60, 100, 3)
    np.testing.assert_array_equal(served, written)

    inspect([source], model, tmp_path / "viridis", progress=False, colormap="viridis")
    report = (tmp_path / "viridis" / "report.html").read_text()
    viridis = base64.b64encode(encode_png(colorbar(200, 12, "viridis"))).decode("ascii")
    assert viridis in report
    jet = base64.b64encode(encode_png(colorbar(200, 12, "jet"))).decode("ascii")
    assert jet not in report

"""Whatever cameras and archives hold: each image works correctly or fails naming the file."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anomalyclip.preprocess import ImageLoadError, PreProcessor, load_image, load_mask_array


def png_bytes(image: Image.Image, format: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "empty"),
        ("text.jpg", b"this is not an image at all", "not a recognised image"),
        ("truncated.png", None, "corrupt or truncated"),
        ("html.png", b"<html><body>404</body></html>", "not a recognised image"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, name, content, reason):
    if content is None:
        content = png_bytes(Image.new("RGB", (64, 64), (10, 200, 30)))[:60]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as error:
        load_image(path)
    assert str(path) in str(error.value)
    assert error.value.source == str(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(Image.new("L", (3000, 3000))))
    with pytest.raises(ImageLoadError, match="9,000,000 pixels, over the limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    array = np.asarray(load_image(path))
    assert array.shape == (16, 16, 3)
    np.testing.assert_array_equal(array[..., 0].ravel(), np.arange(256))


def test_float_tiff_is_scaled(tmp_path):
    values = np.linspace(-3.0, 5.0, 64, dtype=np.float32).reshape(8, 8)
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    array = np.asarray(load_image(path))[..., 0]
    assert array.min() == 0 and array.max() == 255
    assert np.all(np.diff(array.ravel().astype(int)) >= 0)


def test_cmyk_jpeg_palette_and_rgba(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(cmyk)
    red = np.asarray(load_image(cmyk))
    assert red.shape == (10, 20, 3) and red[..., 0].mean() > 200 and red[..., 1].mean() < 60

    palette = tmp_path / "palette.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).convert("P").save(palette)
    assert tuple(np.asarray(load_image(palette))[0, 0]) == (0, 0, 255)

    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (255, 255, 255, 0)).save(rgba)
    assert tuple(np.asarray(load_image(rgba))[0, 0]) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert np.asarray(loaded)[:10, :, 0].mean() > 200


def test_tiny_and_large_images(tmp_path):
    one = tmp_path / "one.png"
    Image.new("L", (1, 1), 128).save(one)
    assert PreProcessor(32).tensor(load_image(one)).shape == (3, 32, 32)
    large = tmp_path / "large.png"
    Image.new("RGB", (4000, 3000), (9, 9, 9)).save(large)
    assert load_image(large).size == (4000, 3000)


def test_arrays_of_every_layout():
    assert load_image(np.zeros((5, 7), np.uint8)).size == (7, 5)
    assert load_image(np.zeros((3, 5, 7), np.float32)).size == (7, 5)
    assert load_image(np.full((5, 7, 1), 2000, np.uint16)).size == (7, 5)
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(np.zeros((2, 3, 4, 5)))


def test_mask_of_any_mode(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray((np.eye(4) * 65535).astype(np.uint16)).save(path)
    np.testing.assert_array_equal(load_mask_array(path), np.eye(4, dtype=bool))
    with pytest.raises(ImageLoadError, match="mask file not found"):
        load_mask_array(tmp_path / "absent.png")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzzed_bytes_never_escape_as_other_errors(content):
    try:
        image = load_image(content)
    except ImageLoadError as error:
        assert error.reason
    else:
        assert image.mode == "RGB"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.sampled_from(["PNG", "JPEG", "BMP", "TIFF"]))
def test_truncated_real_files_fail_cleanly(cut, format):
    content = png_bytes(Image.new("RGB", (32, 32), (1, 2, 3)), format=format)
    try:
        image = load_image(content[:cut])
    except ImageLoadError:
        return
    assert image.size == (32, 32)


def test_any_decoder_exception_becomes_the_files_error(monkeypatch):
    def broken(self):
        raise TypeError("'IFDRational' object cannot be interpreted as an integer")

    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    with pytest.raises(ImageLoadError, match=r"cannot decode \(TypeError: 'IFDRational'"):
        load_image(png_bytes(Image.new("RGB", (4, 4))))


@pytest.mark.parametrize(
    ("peak", "bits"), [(255, 8), (1023, 10), (4095, 12), (4096, 14), (65535, 16)]
)
def test_bit_depth_is_read_off_the_data(peak, bits):
    from anomalyclip.preprocess import used_bit_depth

    assert used_bit_depth(peak) == bits


def test_twelve_bit_data_in_a_sixteen_bit_file_is_not_scored_near_black(tmp_path, caplog):
    """Bug: 12-bit camera data was divided by 65535 and became a near-black image."""
    ramp = np.linspace(0, 4095, 64, dtype=np.uint16).reshape(8, 8)
    path = tmp_path / "camera.png"
    Image.fromarray(ramp).save(path)
    with caplog.at_level(logging.WARNING):
        array = np.asarray(load_image(path))[..., 0]
    assert array.max() == 255 and array.min() == 0
    assert "12-bit image data in a 16-bit file" in caplog.text


def test_pillows_bomb_warning_does_not_leak(tmp_path, recwarn):
    path = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(path)
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 10_000_000  # so this image is above Pillow's warning level
    try:
        load_image(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_given_bit_depth_and_pixel_limit_apply_to_every_read(tmp_path, caplog):
    from anomalyclip.preprocess import DecodeSettings, decoding

    ramp = np.linspace(0, 1000, 64, dtype=np.uint16).reshape(8, 8)  # looks 10-bit
    path = tmp_path / "camera.png"
    Image.fromarray(ramp).save(path)
    assert np.asarray(load_image(path))[..., 0].max() == round(1000 / 1023 * 255)  # 10-bit
    with decoding(bit_depth=12), caplog.at_level(logging.WARNING):
        twelve = np.asarray(load_image(path))[..., 0]
    assert twelve.max() == round(1000 / 4095 * 255)
    with decoding(bit_depth=8), caplog.at_level(logging.WARNING):
        assert np.asarray(load_image(path))[..., 0].max() == 255
    assert "exceeds the 8-bit depth given: clipped" in caplog.text
    with decoding(max_pixels=50), pytest.raises(ImageLoadError, match="over the limit of 50$"):
        load_image(path)
    assert load_image(path).size == (8, 8)  # the block's settings end with it
    with pytest.raises(ValueError, match="bit depth must be from 8 to 16"):
        DecodeSettings(bit_depth=20)


def test_cli_pixel_limit_skips_larger_images(tmp_path):
    import json

    from anomalyclip.cli import main
    from tests.helpers import model_arguments, write_tiny_model

    files = write_tiny_model(tmp_path / "model")
    (tmp_path / "in").mkdir()
    Image.new("L", (1000, 600)).save(tmp_path / "in" / "big.png")
    Image.new("L", (100, 60)).save(tmp_path / "in" / "small.png")
    out = tmp_path / "out"
    arguments = [*map(str, model_arguments(files)), "--no-progress", "--bit-depth", "12"]
    code = main(
        [
            "predict",
            str(tmp_path / "in"),
            *arguments,
            "--max-megapixels",
            "0.5",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 1
    (skipped,) = summary["skipped"]
    assert skipped["image"].endswith("big.png")
    assert skipped["reason"] == "1000x600 = 600,000 pixels, over the limit of 500,000"


def test_bit_depth_is_decided_once_per_run(tmp_path, caplog):
    """Issue 24: two frames of one 12-bit camera, the second under-exposed (largest value
    1000, which alone looks 10-bit), were read as 12- and 10-bit: the dark frame was
    brightened 4x to look like the other. In a run the first frame decides, once."""
    from anomalyclip.preprocess import decoding

    bright = tmp_path / "frame_1.png"
    dark = tmp_path / "frame_2.png"
    Image.fromarray(np.linspace(0, 4095, 64, dtype=np.uint16).reshape(8, 8)).save(bright)
    Image.fromarray(np.linspace(0, 1000, 64, dtype=np.uint16).reshape(8, 8)).save(dark)
    with decoding(), caplog.at_level(logging.WARNING):
        first = np.asarray(load_image(bright))[..., 0]
        second = np.asarray(load_image(dark))[..., 0]
        again = np.asarray(load_image(dark))[..., 0]
    assert first.max() == 255
    assert second.max() == round(1000 / 4095 * 255) == again.max()  # 62, not 255
    decided = [r.getMessage() for r in caplog.records if "scaled as" in r.getMessage()]
    assert decided == [
        f"12-bit image data in a 16-bit file ({bright}, largest value 4095): every 16-bit "
        "image of this run is scaled as 12-bit (--bit-depth sets it)"
    ]
    # a later frame above the run's depth is clipped and said so, once
    brighter = tmp_path / "frame_3.png"
    Image.fromarray(np.full((8, 8), 9000, dtype=np.uint16)).save(brighter)
    caplog.clear()
    with decoding(), caplog.at_level(logging.WARNING):
        load_image(dark)
        load_image(brighter)
        load_image(brighter)
    assert caplog.text.count("over the run's 10-bit depth") == 1
    # each run decides anew
    with decoding():
        assert np.asarray(load_image(bright))[..., 0].max() == 255

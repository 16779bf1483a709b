"""Hostile image files: whatever a decoder raises is the file's error, and geometry that
would cost far more than the file's size is refused from the header.

Issue 15, items 1 and 10: mutated DDS and TIFF files escaped as ``NotImplementedError``
and ``TypeError`` (from mask loading, the service's upload check, dataset headers), and a
77 KB PNG of 1 x 40,000,000 pixels cost 6 s and 2.6 GB. The seeded run here is a short
version of ``benchmarks/bench_fuzz.py`` (same payloads, same outcome rules).
"""

from __future__ import annotations

import functools
import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from anomalyclip.data.core import oriented_size
from anomalyclip.decoding import DecodeSettings
from anomalyclip.preprocess import (
    ImageLoadError,
    PreProcessor,
    decoding,
    load_image,
    load_mask_array,
)
from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.serving.uploads import (
    InvalidUpload,
    Upload,
    UploadTooLarge,
    check_set,
    check_upload,
)
from benchmarks.bench_fuzz import payload, run_range, seed_files


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def dds_unknown_pixel_format() -> bytes:
    """A DDS whose pixel-format flags are 0: Pillow raises NotImplementedError at open."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "DDS"))
    struct.pack_into("<I", data, 80, 0)
    return bytes(data)


def tiff_rational_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag is typed RATIONAL: TypeError ('IFDRational' object
    cannot be interpreted as an integer) at load."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, at + 2, 5)  # RATIONAL
    return bytes(data)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def thin_png(width: int = 1, height: int = 40_000_000) -> bytes:
    """A grey PNG of any size; the default is the attack's 77 KB of 1 x 40,000,000 pixels."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte, then the pixels
    rows_per_piece = max(1, 1_000_000 // len(row))
    pieces = [
        compressor.compress(row * min(rows_per_piece, height - done))
        for done in range(0, height, rows_per_piece)
    ]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(pieces) + compressor.flush())
        + png_chunk(b"IEND", b"")
    )


HOSTILE = {
    "pixels.png": (dds_unknown_pixel_format, "cannot decode (NotImplementedError: Unknown pixel"),
    "strips.tif": (tiff_rational_strip_offsets, "cannot decode (TypeError: 'IFDRational'"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_decoder_exceptions_are_the_files_error_everywhere(tmp_path, name):
    make, reason = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(make())
    for read in (load_image, load_mask_array, PreProcessor(32).load):
        with pytest.raises(ImageLoadError) as error:
            read(path)
        assert error.value.source == str(path)
        assert str(error.value) == f"cannot read image {path}: {error.value.reason}"
        assert "\n" not in str(error.value)
    with pytest.raises(
        ImageLoadError, match=f"^cannot read image <\\d+ bytes>: {reason}".replace("(", r"\(")
    ):
        load_image(path.read_bytes())
    assert oriented_size(path) in (None, (8, 8))


def test_upload_check_turns_decoder_exceptions_into_422():
    settings = ServiceSettings()
    upload = Upload("pixels.dds", "image/x-dds", dds_unknown_pixel_format())
    with pytest.raises(InvalidUpload) as error:
        check_upload(upload, settings)
    assert error.value.detail == (
        "pixels.dds: cannot decode (NotImplementedError: Unknown pixel format flags 0)"
    )
    with pytest.raises(InvalidUpload, match="^pixels.dds: cannot decode"):
        check_set([upload, upload], settings)
    thin = Upload("thin.png", "image/png", thin_png())
    with pytest.raises(UploadTooLarge) as too_large:
        check_upload(thin, settings)
    assert too_large.value.detail == (
        "thin.png is 1x40000000 pixels, a side over the limit of 65,535"
    )


def test_service_answers_422_naming_the_file():
    from fastapi.testclient import TestClient

    from anomalyclip.serving import create_app
    from tests.helpers import tiny_service_model

    with TestClient(create_app(tiny_service_model(), ServiceSettings())) as client:
        for name, make in (
            ("pixels.dds", dds_unknown_pixel_format),
            ("strips.tif", tiff_rational_strip_offsets),
        ):
            response = client.post(
                "/v1/predict", files={"file": (name, make(), "application/octet-stream")}
            )
            assert response.status_code == 422, response.text
            assert response.json()["detail"].startswith(f"{name}: cannot decode (")


def test_thin_png_is_refused_from_its_header_in_milliseconds():
    data = thin_png()
    assert len(data) < 80_000
    started = time.perf_counter()
    with pytest.raises(ImageLoadError) as error:
        load_image(data)
    assert time.perf_counter() - started < 0.5
    assert error.value.reason == "1x40000000 pixels, a side over the limit of 65,535"
    assert error.value.kind == "too-large"
    with pytest.raises(
        ImageLoadError, match="an aspect ratio of 1,000:1, over the limit of 100:1$"
    ):
        load_image(thin_png(30, 30_000))
    assert load_image(thin_png(1, 50), max_pixels=100).size == (1, 50)  # within 100:1
    with decoding(max_side=10), pytest.raises(ImageLoadError, match="a side over the limit of 10$"):
        load_image(thin_png(4, 20))
    with decoding(max_aspect=2.5), pytest.raises(ImageLoadError, match="aspect ratio of 5:1"):
        load_image(thin_png(4, 20))
    with pytest.raises(ValueError, match="aspect-ratio limit must be at least 1"):
        DecodeSettings(max_aspect=0.5)


def test_masks_have_the_same_limits(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(thin_png())
    with pytest.raises(ImageLoadError, match="a side over the limit"):
        load_mask_array(path)


def test_cli_predict_skips_hostile_files_by_name_and_goes_on(tmp_path):
    from anomalyclip.cli import main
    from tests.helpers import model_arguments, write_tiny_model

    files = write_tiny_model(tmp_path / "model")
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (40, 30), (90, 20, 20)).save(folder / "good.png")
    (folder / "pixels.png").write_bytes(dds_unknown_pixel_format())
    (folder / "strips.tif").write_bytes(tiff_rational_strip_offsets())
    (folder / "thin.png").write_bytes(thin_png())
    out = tmp_path / "out"
    arguments = [*map(str, model_arguments(files)), "--no-progress", "--output-dir", str(out)]
    assert main(["predict", str(folder), *arguments, "--max-aspect", "50"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 1
    reasons = {item["image"].rsplit("/", 1)[-1]: item["reason"] for item in summary["skipped"]}
    assert reasons == {
        "pixels.png": "cannot decode (NotImplementedError: Unknown pixel format flags 0)",
        "strips.tif": "cannot decode (TypeError: 'IFDRational' object cannot be interpreted "
        "as an integer)",
        "thin.png": "1x40000000 pixels, a side over the limit of 65,535",
    }


def test_jpeg_much_larger_than_needed_is_draft_decoded_within_tolerance():
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (1600, 1200), Image.Resampling.BICUBIC
    )
    data = encode(smooth, "JPEG", quality=92)
    full = PreProcessor(32).tensor(load_image(data))
    assert load_image(data, needed=32).size == (200, 150)  # 1/8 scale, still >= 4 x 32
    drafted = PreProcessor(32).load(data)
    assert drafted.shape == full.shape == (3, 32, 32)
    difference = (drafted - full).abs() * 0.27  # back to [0, 1] units (std ~ 0.27)
    assert float(difference.max()) < 0.01 and float(difference.mean()) < 0.002
    # an image under 8 x the side needed is decoded in full: results unchanged
    small = encode(smooth.resize((250, 200)), "JPEG")
    assert load_image(small, needed=32).size == (250, 200)
    assert bool((PreProcessor(32).load(small) == PreProcessor(32).tensor(load_image(small))).all())


def test_seeded_fuzz_gives_only_documented_outcomes():
    """Mutated files of every format Pillow writes here, through load_image and the
    upload check (benchmarks/bench_fuzz.py runs 100,000)."""
    seeds = seed_files()
    assert {"PNG", "JPEG", "TIFF-lzw", "TIFF-jpeg", "DDS", "DDS-DXT1", "WEBP", "GIF"} <= set(seeds)
    assert payload(seeds, 15, 7) == payload(seeds, 15, 7)  # reproducible by index
    tally = run_range(seed=15, start=0, stop=4000, megapixels=4.0)
    assert tally.undocumented == []
    outcomes = {outcome for _, outcome in tally.outcomes}
    assert {"decoded", "refused: corrupt", "refused: unsupported"} <= outcomes
    assert any(outcome.startswith("refused: caught") for outcome in outcomes)
    assert {"accepted", "413", "415", "422"} <= set(tally.uploads)
    assert sum(tally.outcomes.values()) == 4000


def test_mutated_masks_give_only_image_load_errors(tmp_path):
    seeds = seed_files()
    path = tmp_path / "mask"
    for index in range(300):
        _, data = payload(seeds, 16, index)
        path.write_bytes(data)
        try:
            mask = load_mask_array(path)
        except ImageLoadError as error:
            assert error.source == str(path) and "\n" not in error.reason
        else:
            assert mask.dtype == bool and mask.ndim == 2

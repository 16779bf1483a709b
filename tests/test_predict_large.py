"""``predict`` on a file far larger than its outputs need: a large PNG is decoded reduced
(a strip at a time) to what the model input and the bounded overlay need, while the
records, the full-size mask and the map placement keep the file's own size."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from anomalyclip import preprocess
from anomalyclip.inspection.run import inspect
from tests.helpers import write_tiny_model

SIDE = 2400


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def large_png(side: int) -> bytes:
    """An RGB PNG of side x side: a textured band every 100 rows, the rest repeated."""
    columns = np.arange(side)
    compressor = zlib.compressobj(9)
    parts = []
    for row in range(side):
        if row % 100 == 0:
            pixels = ((columns[:, None] * 5 + row + np.arange(3)) % 256).astype(np.uint8)
            parts.append(compressor.compress(b"\x00" + pixels.tobytes()))
        else:
            parts.append(compressor.compress(b"\x02" + bytes(3 * side)))
    data = b"".join(parts) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_predict_decodes_a_large_png_reduced_and_records_its_own_size(tmp_path, monkeypatch):
    _, _, model = write_tiny_model(tmp_path / "model")
    image = tmp_path / "large.png"
    image.write_bytes(large_png(SIDE))
    decoded: list[tuple[int, int]] = []
    reduce = preprocess.decode_png_reduced

    def spy(handle, factor, convert):
        result = reduce(handle, factor, convert)
        decoded.append(result.size)
        return result

    monkeypatch.setattr(preprocess, "decode_png_reduced", spy)
    out = tmp_path / "run"
    summary = inspect(image, model, out, pixel_threshold=0.5, overlay_max_side=256, progress=False)
    # the model's 64 px input and a 256 px overlay keep 4 x 64 = 256: reduced by 9
    assert decoded == [(267, 267)]
    (result,) = summary.results
    assert (result.width, result.height) == (SIDE, SIDE)
    with Image.open(out / result.overlay) as overlay:
        assert overlay.size == (256, 256)
    with Image.open(out / result.mask) as mask:
        assert mask.size == (SIDE, SIDE)  # masks stay at the file's size

    # an overlay at full size needs every pixel: the full decode
    inspect(image, model, tmp_path / "full", overlay_max_side=None, progress=False)
    assert decoded == [(267, 267)]


def test_a_draft_decoded_jpeg_keeps_its_size_in_the_file_turned_by_exif():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn
    Image.new("RGB", (1600, 1200), (40, 90, 140)).save(buffer, "JPEG", exif=exif)
    image = preprocess.load_image(buffer.getvalue(), needed=32)
    assert image.size == (150, 200)  # 1/8, turned upright
    assert preprocess.original_size(image) == (1200, 1600)
    assert preprocess.original_size(preprocess.load_image(buffer.getvalue())) == (1200, 1600)

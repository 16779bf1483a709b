"""PNGs decoded at reduced scale a strip at a time (:mod:`anomalyclip.png_reduced`): the
pixels of the full decode reduced, for every filter type and 8-bit layout, damaged files
refused in one line, and (slow) the memory of one strip instead of the image's."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyclip import png_reduced
from anomalyclip.decoding import DRAFT_MARGIN, ImageLoadError
from anomalyclip.preprocess import load_image

# colour type and samples per pixel of each 8-bit layout
LAYOUTS = {"L": (0, 1), "LA": (4, 2), "RGB": (2, 3), "RGBA": (6, 4)}
FILTERS = {"none": 0, "sub": 1, "up": 2, "average": 3, "paeth": 4, "mixed": -1}


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def textured(height: int, width: int, samples: int, seed: int = 0) -> np.ndarray:
    rows, columns = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, samples))
    return (((3 * columns + 2 * rows)[..., None] + noise) % 256).astype(np.uint8)


def filtered_rows(array: np.ndarray, filter_type: int) -> bytes:
    """The PNG filtering of ``array`` (H, W, samples), every row with ``filter_type``
    (-1: the five types in turn), as the specification defines each."""
    height, width, samples = array.shape
    raw = array.reshape(height, width * samples).astype(np.int32)
    out, above = bytearray(), np.zeros(width * samples, np.int32)
    for number, row in enumerate(raw):
        kind = filter_type if filter_type >= 0 else number % 5
        left = np.concatenate([np.zeros(samples, np.int32), row[:-samples]])
        upper_left = np.concatenate([np.zeros(samples, np.int32), above[:-samples]])
        if kind == 4:
            estimate = left + above - upper_left
            near_left = np.abs(estimate - left)
            near_above, near_corner = np.abs(estimate - above), np.abs(estimate - upper_left)
            predicted = np.where(
                (near_left <= near_above) & (near_left <= near_corner),
                left,
                np.where(near_above <= near_corner, above, upper_left),
            )
        else:
            predicted = [0 * row, left, above, (left + above) // 2][kind]
        out.append(kind)
        out += ((row - predicted) % 256).astype(np.uint8).tobytes()
        above = row
    return bytes(out)


def crafted_png(array: np.ndarray, colour_type: int, filter_type: int, extra: bytes = b"") -> bytes:
    height, width = array.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    data = zlib.compress(filtered_rows(array, filter_type), 9)
    return (
        png_reduced.SIGNATURE
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", data[:100])
        + chunk(b"IDAT", data[100:])
        + chunk(b"IEND", b"")
    )


def as_rgb(image: Image.Image) -> Image.Image:
    """What load_image makes of a decoded image: alpha over black, then RGB."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(
            Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA")
        )
    return image.convert("RGB")


def pillow_png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def generated_cases() -> dict[str, bytes]:
    cases = {}
    for mode, (colour_type, samples) in LAYOUTS.items():
        array = textured(97, 61, samples)
        cases[f"{mode} pillow"] = pillow_png(
            Image.fromarray(array.squeeze(2) if samples == 1 else array, mode)
        )
        for name, filter_type in FILTERS.items():
            cases[f"{mode} {name}"] = crafted_png(array, colour_type, filter_type)
    palette = Image.fromarray(textured(97, 61, 3)).quantize(50)
    cases["P tRNS"] = pillow_png(palette, transparency=3)
    cases["RGB tRNS"] = pillow_png(Image.fromarray(textured(97, 61, 3)), transparency=(10, 20, 30))
    return cases


CASES = generated_cases()


@pytest.mark.parametrize("factor", [1, 2, 3, 5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_strips_give_the_full_decode_reduced(case, factor, monkeypatch):
    monkeypatch.setattr(png_reduced, "STRIP_BYTES", 2_000)  # many strips of a few rows
    data = CASES[case]
    with Image.open(io.BytesIO(data)) as full:
        expected = as_rgb(full).reduce(factor)
    reduced = png_reduced.decode_png_reduced(io.BytesIO(data), factor, as_rgb)
    assert reduced is not None
    assert reduced.size == expected.size
    assert reduced.tobytes() == expected.tobytes()


def test_load_image_reduces_a_large_png_to_the_margin(tmp_path):
    needed = 8
    path = tmp_path / "large.png"
    path.write_bytes(crafted_png(textured(200, 130, 3), 2, -1))
    image = load_image(path, needed=needed)
    factor = 130 // (needed * DRAFT_MARGIN)
    assert factor == 4
    with Image.open(path) as full:
        expected = full.convert("RGB").reduce(factor)
    assert image.mode == "RGB" and image.size == (33, 50)
    assert image.tobytes() == expected.tobytes()
    # without needed, or too small to gain, the full decode
    assert load_image(path).size == (130, 200)
    assert load_image(path, needed=20).size == (130, 200)


def test_layouts_without_byte_rows_keep_the_full_decode(tmp_path):
    sixteen = Image.fromarray(textured(80, 80, 1).squeeze(2).astype(np.uint16) * 200)
    plain = crafted_png(textured(80, 80, 3), 2, 1)
    header = png_reduced.read_header(io.BytesIO(plain)).ihdr
    interlaced = plain.replace(
        chunk(b"IHDR", header), chunk(b"IHDR", header[:12] + b"\x01")
    )  # only the header is read: Adam7 rows are not whole rows
    for data in (
        pillow_png(sixteen),
        pillow_png(Image.fromarray(textured(80, 80, 1).squeeze(2) > 9)),
        interlaced,
    ):
        assert png_reduced.decode_png_reduced(io.BytesIO(data), 2, as_rgb) is None
    # an EXIF chunk may turn the image: the full decode applies it
    exif = crafted_png(textured(80, 80, 3), 2, 1, extra=chunk(b"eXIf", b"MM\0*\0\0\0\x08\0\0"))
    assert png_reduced.decode_png_reduced(io.BytesIO(exif), 2, as_rgb) is None
    path = tmp_path / "exif.png"
    path.write_bytes(exif)
    assert load_image(path, needed=2).size == (80, 80)


def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path):
    good = crafted_png(textured(90, 90, 3), 2, 4)
    idat = good.index(b"IDAT", 40)
    damaged = {
        "crc.png": good[: idat + 10] + bytes([good[idat + 10] ^ 1]) + good[idat + 11 :],
        "truncated.png": good[: len(good) // 2],
        "no-data.png": good[:33] + chunk(b"IEND", b""),
    }
    for name, data in damaged.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageLoadError) as caught:
            load_image(path, needed=4)
        message = str(caught.value)
        assert message.startswith(f"cannot read image {path}: ")
        assert "\n" not in message
        assert caught.value.kind == "corrupt"


MEASURE = """
import json, sys
from anomalyclip.preprocess import load_image
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
before = peak()
image = load_image(sys.argv[1], needed=int(sys.argv[2]) or None)
print(json.dumps({"size": image.size, "peak_mb": peak() - before}))
"""


def large_png(path: Path, side: int) -> None:
    """An RGB PNG of side x side, written row by row (kilobytes: its rows repeat)."""
    row = textured(1, side, 3).tobytes()
    compressor = zlib.compressobj(9)
    data = compressor.compress(b"\x01" + row) + b"".join(
        compressor.compress(b"\x02" + bytes(len(row))) for _ in range(side - 1)
    )
    data += compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        png_reduced.SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM")
def test_a_large_png_decodes_in_the_memory_of_a_strip(tmp_path):
    path = tmp_path / "large.png"
    large_png(path, 8000)  # 192 MB of RGB decoded
    figures = {}
    for needed in (0, 224):
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(path), str(needed)],
            capture_output=True,
            text=True,
            check=True,
        )
        figures[needed] = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures[0]["size"] == [8000, 8000]
    assert figures[224]["size"] == [1000, 1000]  # reduced by 8 (4 x 224 = 896 kept)
    assert figures[0]["peak_mb"] > 190
    assert figures[224]["peak_mb"] < 60

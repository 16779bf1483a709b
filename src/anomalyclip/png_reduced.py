"""A PNG decoded at 1/k scale a strip at a time: memory of one strip, not of the image.

Pillow has no reduced-scale PNG decode (JPEG has ``Image.draft``): a 174 KB PNG of
13,376 x 13,376 pixels is 537 MB of RGB once decoded, though the model needs 224 x 224.
A non-interlaced PNG's IDAT is one zlib stream of filtered scanlines, each filtered
against the row above. So the stream is inflated incrementally (``decompressobj`` with
``max_length``) a strip of K rows at a time, and each strip handed to Pillow (C speed)
as a small PNG of its own: the same header with K + 1 rows, PLTE and tRNS copied, whose
first row is the previous strip's last row as Pillow reconstructed it, stored unfiltered
(filter type 0), followed by the strip's K rows exactly as filtered in the file, stored
uncompressed (zlib level 0). Pillow undoes the filters against that first row as it
would have against the original, so the strip's pixels are the full decode's, bit for
bit; the first row is dropped, the strip converted (``convert``, per pixel) and reduced
(``Image.reduce``: k x k box means), and pasted into the small result. K is a multiple
of k, so every box lies inside one strip and the result equals reducing the full decode.

That holds where a reconstructed row's bytes are what Pillow returns for it: 8 bits per
sample in grey (L), grey + alpha (LA), RGB, RGBA and palette (P) images. 16-bit, fewer
than 8 bits, interlaced files, and files whose EXIF (an ``eXIf`` chunk or a raw EXIF
text profile) could turn the image, are left to the full decode (:func:`reducible`).
Every chunk's CRC is checked, so a damaged file fails here as it would in Pillow.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from PIL import Image

__all__ = ["PngHeader", "decode_png_reduced", "read_header", "reducible"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> samples per pixel (8-bit only: one byte each)
SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# ancillary chunks that change no pixel (and no turn) of the decoded image
HARMLESS = frozenset(
    {b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs", b"tIME", b"sBIT", b"bKGD", b"tEXt", b"zTXt"}
    | {b"iTXt"}
)
# copied into every strip's PNG: what Pillow needs to give the same pixels and mode
COPIED = (b"PLTE", b"tRNS")
# bytes of filtered rows inflated per strip (the strip's decoded image is about as large)
STRIP_BYTES = 2 << 20
# bytes of a chunk read at once (a chunk may claim up to 2 GiB)
READ_BYTES = 1 << 20


class PngError(ValueError):
    """A damaged PNG: its message is the one-line reason the caller reports."""


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool
    ihdr: bytes  # the IHDR chunk's 13 data bytes

    @property
    def row_bytes(self) -> int:
        """Bytes of one filtered row: the filter type byte, then the samples."""
        return 1 + self.width * SAMPLES[self.colour_type]


def read_header(handle: IO[bytes]) -> PngHeader:
    """The IHDR of the PNG at ``handle``'s start (the handle left after the IHDR)."""
    if handle.read(8) != SIGNATURE:
        raise PngError("not a PNG file")
    kind, data = _read_small_chunk(handle)
    if kind != b"IHDR" or len(data) != 13:
        raise PngError("the PNG does not start with its IHDR chunk")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data)
    return PngHeader(width, height, depth, colour, interlace != 0, data)


def reducible(header: PngHeader) -> bool:
    """Whether :func:`decode_png_reduced` gives this layout the full decode's pixels."""
    return header.bit_depth == 8 and header.colour_type in SAMPLES and not header.interlaced


def _read_small_chunk(handle: IO[bytes]) -> tuple[bytes, bytes]:
    length, kind = _chunk_start(handle)
    if length > 1 << 24:
        raise PngError(f"a {kind.decode('latin-1')} chunk of {length:,} bytes")
    data = handle.read(length)
    _check_crc(handle, kind, zlib.crc32(kind + data), len(data) != length)
    return kind, data


def _chunk_start(handle: IO[bytes]) -> tuple[int, bytes]:
    start = handle.read(8)
    if len(start) != 8:
        raise PngError("truncated PNG (no IEND chunk)")
    length, kind = struct.unpack(">I4s", start)
    if length > 0x7FFFFFFF:
        raise PngError(f"a chunk length of {length:,} bytes, over PNG's limit")
    return length, kind


def _check_crc(handle: IO[bytes], kind: bytes, crc: int, short: bool) -> None:
    stored = handle.read(4)
    if short or len(stored) != 4:
        raise PngError(f"truncated PNG (inside a {kind.decode('latin-1')} chunk)")
    if struct.unpack(">I", stored)[0] != crc & 0xFFFFFFFF:
        raise PngError(f"broken PNG file (CRC error in a {kind.decode('latin-1')} chunk)")


def _raw_exif_text(data: bytes) -> bool:
    return data.split(b"\0", 1)[0].lower().startswith(b"raw profile type")


def _scan(handle: IO[bytes], copied: dict[bytes, bytes]) -> int:
    """Every chunk after the IHDR looked at by its header, seeking over the data: the
    offset of the first IDAT returned, PLTE and tRNS put into ``copied``. Raises
    :class:`Unreducible` for a chunk that could turn the image (EXIF, before or after
    the image data, where Pillow also looks) or one this decoder does not know."""
    first_data = 0
    while True:
        length, kind = _chunk_start(handle)
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            first_data = first_data or handle.tell() - 8
            handle.seek(length + 4, io.SEEK_CUR)
        elif kind in COPIED:
            handle.seek(-8, io.SEEK_CUR)
            copied[kind] = _read_small_chunk(handle)[1]
        elif kind not in HARMLESS:
            raise Unreducible(kind.decode("latin-1"))
        else:
            head = handle.read(min(length, 80)) if kind in (b"tEXt", b"zTXt") else b""
            if _raw_exif_text(head):
                raise Unreducible(kind.decode("latin-1"))
            handle.seek(length + 4 - len(head), io.SEEK_CUR)
    if not first_data:
        raise PngError("the PNG has no image data (no IDAT chunk)")
    return first_data


def _image_data(handle: IO[bytes], start: int) -> Iterator[bytes]:
    """The IDAT payload from offset ``start`` in pieces, every CRC checked."""
    handle.seek(start)
    while True:
        length, kind = _chunk_start(handle)
        if kind != b"IDAT":
            return
        crc = zlib.crc32(kind)
        left = length
        while left:
            piece = handle.read(min(left, READ_BYTES))
            if not piece:
                raise PngError("truncated PNG (inside an IDAT chunk)")
            crc = zlib.crc32(piece, crc)
            left -= len(piece)
            yield piece
        _check_crc(handle, kind, crc, False)


class Unreducible(Exception):
    """A chunk the strip decode cannot carry over (EXIF that may turn the image)."""


def _strip_png(header: PngHeader, rows: int, copied: dict[bytes, bytes], data: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">II", header.width, rows) + header.ihdr[8:]
    parts = [SIGNATURE, chunk(b"IHDR", ihdr)]
    parts += [chunk(kind, copied[kind]) for kind in COPIED if kind in copied]
    parts += [chunk(b"IDAT", zlib.compress(data, 0)), chunk(b"IEND", b"")]
    return b"".join(parts)


class _Inflater:
    """The IDAT zlib stream inflated on demand, ``count`` bytes at a time."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.inflater = zlib.decompressobj()

    def take(self, count: int) -> bytes:
        out = bytearray()
        while len(out) < count:
            source = self.inflater.unconsumed_tail
            if not source:
                if self.inflater.eof:
                    break
                source = next(self.pieces, b"")
                if not source:
                    break
            try:
                out += self.inflater.decompress(source, count - len(out))
            except zlib.error as error:
                raise PngError(f"broken PNG file (image data: {error})") from None
        if len(out) < count:
            raise PngError("truncated PNG (image data ends early)")
        return bytes(out)


def decode_png_reduced(
    handle: IO[bytes], factor: int, convert: Callable[[Image.Image], Image.Image]
) -> Image.Image | None:
    """The PNG at ``handle``'s start, ``convert``-ed and reduced by ``factor`` (``Image.
    reduce``), decoded a strip at a time; None where the layout or a chunk needs the full
    decode (the handle is then at an undefined place: rewind it). Damage raises
    :class:`PngError` with a one-line reason."""
    header = read_header(handle)
    if not reducible(header) or factor < 1:
        return None
    copied: dict[bytes, bytes] = {}
    try:
        start = _scan(handle, copied)
    except Unreducible:
        return None
    rows_per_strip = max(factor, STRIP_BYTES // header.row_bytes // factor * factor)
    inflater = _Inflater(_image_data(handle, start))
    result: Image.Image | None = None
    previous = bytes(header.row_bytes)  # the row above the first: zeros, unfiltered
    for top in range(0, header.height, rows_per_strip):
        rows = min(rows_per_strip, header.height - top)
        filtered = inflater.take(rows * header.row_bytes)
        with Image.open(
            io.BytesIO(_strip_png(header, rows + 1, copied, previous + filtered))
        ) as strip:
            strip.load()
            previous = b"\0" + strip.crop((0, rows, header.width, rows + 1)).tobytes()
            reduced = convert(strip.crop((0, 1, header.width, rows + 1))).reduce(factor)
        if result is None:
            width = -(-header.width // factor)
            result = Image.new(reduced.mode, (width, -(-header.height // factor)))
        result.paste(reduced, (0, top // factor))
    return result

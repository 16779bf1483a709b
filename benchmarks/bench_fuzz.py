"""Fuzzing the image decoders: mutated files of every format through ``load_image`` and
the service's upload check, counting what comes out.

Seeds are small valid files of every format this Pillow writes and opens (PNG, JPEG,
GIF, BMP, TIFF raw and compressed, WebP, DDS, ICO, TGA, PPM, JPEG 2000, AVIF, ...; a
writer the build lacks is left out). Payload ``i`` is a seed (round robin, so every
format gets the same share) mutated by a generator seeded with ``(seed, i)``: bit flips,
extreme values, header fields overwritten with boundary integers, truncation, deleted,
duplicated or random runs, and splices from other seeds. Any payload can be rebuilt
from its index alone (``payload``), so a failure is reproduced with ``--start I
--count 1``.

The documented outcomes are a decoded RGB image or an ``ImageLoadError`` from
``load_image``, and acceptance or an ``UploadError`` from ``check_upload``. Anything
else is an undocumented exception: it is listed with its index, and the script exits 1.
Payloads run in a child process; one that runs past ``--hang-seconds`` is counted as a
hang (exit 1 too), the child is killed and a fresh one goes on with the next index.

Images are decoded under a pixel limit of ``--max-megapixels`` (default 4): a mutated
header can claim any size under the default limit of 179 MP, and the limit itself is
tested elsewhere; here it only keeps each payload's memory small.

    nice -n 10 python benchmarks/bench_fuzz.py                # 100,000 mutated images
    python benchmarks/bench_fuzz.py --count 2000 --output /tmp/fuzz.json
    python benchmarks/bench_fuzz.py --start 41234 --count 1 --in-process   # one payload
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalyclip.preprocess import ImageLoadError, decoding, load_image
from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.serving.uploads import Upload, UploadError, check_upload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, peak_rss_mb, write_results  # noqa: E402

# (label, Pillow format, image mode, save options): every writer this Pillow may have;
# "EXIF" stands for the block exif_block() makes.
SEED_SPECS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("PNG", "PNG", "RGB", {}),
    ("PNG-16bit", "PNG", "I;16", {}),
    ("PNG-palette", "PNG", "P", {}),
    ("PNG-exif", "PNG", "RGB", {"exif": "EXIF"}),
    ("JPEG-exif", "JPEG", "RGB", {"exif": "EXIF"}),
    ("TIFF-exif", "TIFF", "RGB", {"exif": "EXIF"}),
    ("WEBP-exif", "WEBP", "RGB", {"exif": "EXIF"}),
    ("JPEG", "JPEG", "RGB", {"quality": 90}),
    ("JPEG-progressive", "JPEG", "RGB", {"progressive": True}),
    ("GIF", "GIF", "P", {}),
    ("BMP", "BMP", "RGB", {}),
    ("TIFF", "TIFF", "RGB", {}),
    ("TIFF-lzw", "TIFF", "RGB", {"compression": "tiff_lzw"}),
    ("TIFF-deflate", "TIFF", "RGB", {"compression": "tiff_adobe_deflate"}),
    ("TIFF-packbits", "TIFF", "RGB", {"compression": "packbits"}),
    ("TIFF-jpeg", "TIFF", "RGB", {"compression": "jpeg"}),
    ("TIFF-group4", "TIFF", "1", {"compression": "group4"}),
    ("TIFF-float", "TIFF", "F", {}),
    ("WEBP", "WEBP", "RGB", {"quality": 80}),
    ("WEBP-lossless", "WEBP", "RGBA", {"lossless": True}),
    ("DDS", "DDS", "RGB", {}),
    ("DDS-DXT1", "DDS", "RGBA", {"pixel_format": "DXT1"}),
    ("DDS-DXT5", "DDS", "RGBA", {"pixel_format": "DXT5"}),
    ("DDS-BC3", "DDS", "RGBA", {"pixel_format": "BC3"}),
    ("DDS-BC5", "DDS", "RGB", {"pixel_format": "BC5"}),
    ("ICO", "ICO", "RGBA", {"sizes": [(16, 16)]}),
    ("TGA", "TGA", "RGB", {}),
    ("TGA-rle", "TGA", "RGB", {"compression": "tga_rle"}),
    ("PPM", "PPM", "RGB", {}),
    ("PGM", "PPM", "L", {}),
    ("PCX", "PCX", "RGB", {}),
    ("SGI", "SGI", "RGB", {}),
    ("IM", "IM", "RGB", {}),
    ("QOI", "QOI", "RGB", {}),
    ("JPEG2000", "JPEG2000", "RGB", {}),
    ("JPEG2000-j2k", "JPEG2000", "RGB", {"no_jp2": True}),
    ("AVIF", "AVIF", "RGB", {"quality": 60}),
    ("BLP", "BLP", "P", {}),
    ("MSP", "MSP", "1", {}),
    ("XBM", "XBM", "1", {}),
    ("SPIDER", "SPIDER", "F", {}),
    ("DIB", "DIB", "RGB", {}),
    ("MPO", "MPO", "RGB", {}),
)
HEADER_VALUES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UPLOAD_OUTCOMES = {
    "UploadTooLarge": "413",
    "UnsupportedUpload": "415",
    "InvalidUpload": "422",
}


def seed_files() -> dict[str, bytes]:
    """A small valid file per entry of :data:`SEED_SPECS` that this Pillow can write."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    seeds = {}
    for label, format, mode, options in SEED_SPECS:
        if mode == "I;16":
            image = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype("<u2"))
        elif mode == "P":
            image = rgb.quantize(16)
        else:
            image = rgb.convert(mode)
        if options.get("exif") == "EXIF":
            options = {**options, "exif": exif_block()}
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # IM, to go in Pillow 15
                image.save(buffer, format=format, **options)
        except (KeyError, OSError, ValueError):
            continue  # a writer this Pillow build lacks
        seeds[label] = buffer.getvalue()
    return seeds


def exif_block() -> bytes:
    """EXIF with an orientation (rotated on load) and rational and text fields to parse."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees
    exif[0x011A] = exif[0x011B] = 72.0  # XResolution, YResolution: rationals
    exif[0x010F] = "fuzz"  # Make
    return exif.tobytes()


def mutate(data: bytes, rng: np.random.Generator, donors: list[bytes]) -> bytes:
    """One to eight random edits of ``data``; ``donors`` are spliced from."""
    array = bytearray(data)
    for _ in range(min(8, int(rng.geometric(0.4)))):
        kind = int(rng.integers(0, 8))
        at = int(rng.integers(0, max(1, len(array))))
        if kind == 0 and array:
            array[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and array:
            array[at : at + 4] = bytes(rng.choice([0x00, 0xFF, 0x7F, 0x80], 4).tolist())
        elif kind == 2:
            head = min(len(array), 128)
            at = int(rng.integers(0, max(1, head)))
            width = int(rng.choice([1, 2, 4]))
            value = int(rng.choice(HEADER_VALUES)) % (1 << (8 * width))
            array[at : at + width] = value.to_bytes(
                width, "little" if rng.integers(0, 2) else "big"
            )
        elif kind == 3:
            del array[at:]
        elif kind == 4:
            del array[at : at + int(rng.integers(1, 64))]
        elif kind == 5:
            array[at:at] = array[at : at + int(rng.integers(1, 64))]
        elif kind == 6:
            array[at : at + int(rng.integers(1, 32))] = rng.bytes(int(rng.integers(1, 32)))
        else:
            donor = donors[int(rng.integers(0, len(donors)))]
            start = int(rng.integers(0, len(donor)))
            array[at:at] = donor[start : start + int(rng.integers(1, 256))]
    if array.startswith(PNG_SIGNATURE) and rng.random() < 0.7:
        fix_png_checksums(array)
    return bytes(array)


def fix_png_checksums(array: bytearray) -> None:
    """Recompute every whole chunk's CRC, so that the edits reach the PNG decoder instead
    of failing Pillow's checksum test."""
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(array):
        length = int.from_bytes(array[at : at + 4], "big")
        end = at + 8 + length
        if end + 4 > len(array):
            return
        array[end : end + 4] = zlib.crc32(bytes(array[at + 4 : end])).to_bytes(4, "big")
        at = end + 4


def payload(seeds: dict[str, bytes], seed: int, index: int) -> tuple[str, bytes]:
    """(format label, mutated bytes) of payload ``index``: the same for the same inputs."""
    labels = sorted(seeds)
    label = labels[index % len(labels)]
    rng = np.random.default_rng([seed, index])
    return label, mutate(seeds[label], rng, [seeds[name] for name in labels])


def decode_outcome(data: bytes) -> str:
    """What ``load_image`` made of the bytes; raises anything it does not document."""
    try:
        image = load_image(data)
    except ImageLoadError as error:
        if error.reason.startswith("cannot decode ("):
            return f"refused: caught {error.reason[len('cannot decode (') :].split(':')[0]}"
        return f"refused: {error.kind}"
    if image.mode != "RGB":
        raise AssertionError(f"load_image returned mode {image.mode}")
    return "decoded"


def upload_outcome(data: bytes, settings: ServiceSettings) -> str:
    """What the service's upload check answers; raises anything it does not document."""
    try:
        check_upload(Upload("fuzz.bin", "image/png", data), settings)
    except UploadError as error:
        if "\n" in error.detail:
            raise AssertionError(f"a message of several lines: {error.detail!r}") from None
        return UPLOAD_OUTCOMES.get(type(error).__name__, type(error).__name__)
    return "accepted"


@dataclass
class Tally:
    """Counts per format and outcome, the undocumented exceptions and the slowest cases."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    uploads: Counter[str] = field(default_factory=Counter)
    undocumented: list[dict[str, Any]] = field(default_factory=list)
    slowest: list[tuple[float, int, str]] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    def add(self, other: Tally) -> None:
        self.outcomes.update(other.outcomes)
        self.uploads.update(other.uploads)
        self.undocumented += other.undocumented
        self.slowest = sorted(self.slowest + other.slowest, reverse=True)[:5]
        self.peak_rss_mb = max(self.peak_rss_mb, other.peak_rss_mb)


def run_one(
    seeds: dict[str, bytes], seed: int, index: int, settings: ServiceSettings, tally: Tally
) -> None:
    label, data = payload(seeds, seed, index)
    started = time.perf_counter()
    for where, check in (("load_image", decode_outcome), ("check_upload", None)):
        try:
            if check is not None:
                tally.outcomes[(label, check(data))] += 1
            else:
                tally.uploads[upload_outcome(data, settings)] += 1
        except Exception as error:  # noqa: BLE001 - what the fuzz is looking for
            tally.outcomes[(label, "UNDOCUMENTED")] += where == "load_image"
            message = " ".join(str(error).split())[:200]
            tally.undocumented.append(
                {
                    "index": index,
                    "format": label,
                    "where": where,
                    "error": type(error).__name__,
                    "message": message,
                }
            )
    elapsed = time.perf_counter() - started
    tally.slowest = sorted([*tally.slowest, (elapsed, index, label)], reverse=True)[:5]


def run_range(seed: int, start: int, stop: int, megapixels: float) -> Tally:
    """Payloads ``start`` to ``stop`` in this process."""
    seeds = seed_files()
    settings = ServiceSettings(max_pixels=int(megapixels * 1e6))
    tally = Tally()
    with decoding(max_pixels=settings.max_pixels):
        for index in range(start, stop):
            run_one(seeds, seed, index, settings, tally)
    tally.peak_rss_mb = peak_rss_mb()
    return tally


def _child(
    connection: Connection,
    current: Any,
    seed: int,
    indices: tuple[int, int, frozenset[int]],
    megapixels: float,
) -> None:
    """Work in chunks, announcing each index in ``current`` before it runs; ``indices``:
    start, stop and those to leave out (they stopped an earlier child)."""
    start, stop, skip = indices
    logging.disable(logging.WARNING)
    seeds = seed_files()
    settings = ServiceSettings(max_pixels=int(megapixels * 1e6))
    with decoding(max_pixels=settings.max_pixels):
        for chunk in range(start, stop, 500):
            tally = Tally()
            for index in range(chunk, min(chunk + 500, stop)):
                if index in skip:
                    continue
                current[0], current[1] = index, time.monotonic()
                run_one(seeds, seed, index, settings, tally)
            tally.peak_rss_mb = peak_rss_mb()
            connection.send((min(chunk + 500, stop), tally))


def run_isolated(
    seed: int, start: int, stop: int, megapixels: float, hang_seconds: float
) -> tuple[Tally, list[dict[str, Any]]]:
    """Payloads in child processes; one that runs past ``hang_seconds`` (killed) or kills
    its process is listed, and a fresh child goes on with the next index."""
    context = multiprocessing.get_context("spawn")
    labels = sorted(seed_files())
    total = Tally()
    stopped: list[dict[str, Any]] = []
    skipped: set[int] = set()
    position = start
    while position < stop:
        receiver, sender = context.Pipe(duplex=False)
        # the payload running and since when (0: not started; no lock, so never held by
        # a child that is killed)
        current = context.Array("d", [float(position), 0.0], lock=False)
        process = context.Process(
            target=_child,
            args=(sender, current, seed, (position, stop, frozenset(skipped)), megapixels),
            daemon=True,
        )
        process.start()
        sender.close()
        for done, tally in _receive(receiver, process, current, hang_seconds):
            total.add(tally)
            position = done
        if position < stop:
            what = "hang" if process.is_alive() else f"crash (exit code {process.exitcode})"
            if current[1] == 0.0:
                raise RuntimeError(f"the fuzz child ended before its first payload: {what}")
            stuck = int(current[0])
            process.kill()
            stopped.append({"index": stuck, "format": labels[stuck % len(labels)], "what": what})
            skipped.add(stuck)  # the rest of its chunk runs again in the next child
        process.join()
    return total, stopped


def _receive(
    receiver: Connection, process: Any, current: Any, hang_seconds: float
) -> Iterator[tuple[int, Tally]]:
    """Chunks as the child sends them, until it ends, dies or one payload runs too long."""
    while True:
        if receiver.poll(1.0):
            try:
                yield receiver.recv()
            except EOFError:
                return
            continue
        if not process.is_alive():
            while receiver.poll(0):
                yield receiver.recv()
            return
        if current[1] and time.monotonic() - current[1] > hang_seconds:
            return


def report(tally: Tally, stopped: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    kinds = sorted({outcome for _, outcome in tally.outcomes})
    labels = sorted({label for label, _ in tally.outcomes})
    rows = [[label, *(tally.outcomes[(label, kind)] for kind in kinds)] for label in labels]
    rows.append(
        ["all", *(sum(tally.outcomes[(label, kind)] for label in labels) for kind in kinds)]
    )
    table = markdown_table(["format", *kinds], rows)
    uploads = markdown_table(["upload check", "count"], sorted(tally.uploads.items()))
    per_format = {
        label: {k: tally.outcomes[(label, k)] for k in kinds if tally.outcomes[(label, k)]}
        for label in labels
    }
    return f"{table}\n\n{uploads}", {
        "per_format": per_format,
        "outcomes": {
            kind: sum(tally.outcomes[(label, kind)] for label in labels) for kind in kinds
        },
        "upload_check": dict(tally.uploads),
        "undocumented": tally.undocumented,
        "stopped": stopped,
        "slowest_s": [
            {"seconds": round(s, 4), "index": i, "format": f} for s, i, f in tally.slowest
        ],
    }


def main() -> int:
    logging.disable(logging.WARNING)  # the bit-depth notes of mutated 16-bit files
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--count", type=int, default=100_000, help="mutated images to try")
    parser.add_argument("--start", type=int, default=0, help="index of the first payload")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--max-megapixels", type=float, default=4.0)
    parser.add_argument("--hang-seconds", type=float, default=20.0)
    parser.add_argument("--in-process", action="store_true", help="no child process")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/fuzz.json)")
    args = parser.parse_args()

    started = time.perf_counter()
    stop = args.start + args.count
    stopped: list[dict[str, Any]] = []
    if args.in_process:
        tally = run_range(args.seed, args.start, stop, args.max_megapixels)
    else:
        tally, stopped = run_isolated(
            args.seed, args.start, stop, args.max_megapixels, args.hang_seconds
        )
    seconds = time.perf_counter() - started
    table, details = report(tally, stopped)
    peak = max(tally.peak_rss_mb, peak_rss_mb())
    print(table)
    print(
        f"\n{args.count:,} payloads ({len(seed_files())} seed formats) in {seconds:.1f} s "
        f"({args.count / seconds:,.0f}/s); peak RSS {peak:.0f} MB; "
        f"{len(tally.undocumented)} undocumented exceptions, {len(stopped)} hangs or crashes"
    )
    for failure in tally.undocumented[:20]:
        print(f"UNDOCUMENTED {failure}")
    for hang in stopped:
        print(f"STOPPED {hang}")
    path = write_results(
        "fuzz",
        {
            "count": args.count,
            "start": args.start,
            "seed": args.seed,
            "max_megapixels": args.max_megapixels,
            "seconds": round(seconds, 1),
            "payloads_per_second": round(args.count / seconds, 1),
            "peak_rss_mb": round(peak, 1),
            "seed_formats": {label: len(data) for label, data in sorted(seed_files().items())},
            **details,
            "machine": machine_info("cpu", 1),
        },
        args.output,
    )
    print(f"written to {path}")
    return 1 if tally.undocumented or stopped else 0


if __name__ == "__main__":
    sys.exit(main())

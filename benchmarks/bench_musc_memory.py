"""MuSc's peak memory against the size of the set, with subsets of a fixed size.

MuSc's ``divide_num`` splits a set into subsets scored on their own, so what one subset
needs bounds the features held at once; the whole set keeps only each image's decoded
image, patch scores, map and class token. This scores sets of N random 224 px images
with the small reference CLIP (shared/reference/paper, 24 layers of 128 channels),
``divide_num = N / 16``, through ``Predictor.predict`` on PIL images (what ``predict``
and ``score_set`` call), each N in a fresh process so that its peak resident memory
(VmHWM) is its own. A digest of the scores and maps shows two versions agree bit for bit.

    python benchmarks/bench_musc_memory.py --counts 32 96 192 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, peak_rss_mb, write_results  # noqa: E402

REFERENCE_CLIP = (
    Path(__file__).resolve().parents[1].parent / "shared/reference/paper/clip_openai_layout.pt"
)
IMAGE_SIZE = 224
SUBSET_SIZE = 16


def random_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Noise around one shared pattern, so that patches have near matches in other images."""
    generator = np.random.default_rng(seed)
    common = generator.integers(0, 256, (size, size, 3))
    images = []
    for _ in range(count):
        noise = generator.integers(-40, 41, (size, size, 3))
        images.append(Image.fromarray(np.clip(common + noise, 0, 255).astype(np.uint8)))
    return images


def measure(count: int, clip_path: Path) -> dict[str, Any]:
    """One set of ``count`` images scored in this (fresh) process."""
    from anomalyclip.methods.musc.model import MuSc

    musc = MuSc.from_pretrained(
        clip_path, image_size=IMAGE_SIZE, divide_num=max(1, count // SUBSET_SIZE)
    )
    images = random_images(count, IMAGE_SIZE)
    baseline = peak_rss_mb()
    started = time.perf_counter()
    predictions = musc.predict(images, batch_size=count)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for prediction in predictions:
        digest.update(np.float32(prediction.score).tobytes())  # type: ignore[union-attr]
        digest.update(prediction.anomaly_map.tobytes())  # type: ignore[union-attr]
    return {
        "images": count,
        "divide_num": max(1, count // SUBSET_SIZE),
        "seconds": round(seconds, 1),
        "rss_before_mb": round(baseline, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "digest": digest.hexdigest()[:16],
    }


def in_fresh_process(count: int, clip_path: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", str(count), "--clip", str(clip_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[32, 96, 192])
    parser.add_argument("--clip", type=Path, default=REFERENCE_CLIP)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="JSON path (default benchmarks/results/musc_memory.json)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        sys.stdout.write(json.dumps(measure(args.one, args.clip)) + "\n")
        return 0
    rows = [in_fresh_process(count, args.clip) for count in args.counts]
    table = markdown_table(
        ["images", "divide_num", "seconds", "peak RSS MB", "digest"],
        [[r["images"], r["divide_num"], r["seconds"], r["peak_rss_mb"], r["digest"]] for r in rows],
    )
    sys.stdout.write(table + "\n")
    write_results(
        "musc_memory", {"machine": machine_info("cpu", args.threads), "rows": rows}, args.output
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

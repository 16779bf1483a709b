"""MuSc's mutual scoring (MSM): the blocked matrix products against the official algorithm.

MSM dominates MuSc: every patch of every image against every patch of every other
image, once per feature layer and aggregation degree (4 x 3 = 12 times with the official
settings). This compares, on the same unit vectors in the same run:

* ``blocked``: :func:`anomalyclip.methods.musc.model.mutual_scores` (nearest patch by matrix
  product, its distance computed directly, bounded blocks);
* ``official``: the official ``compute_scores_fast`` re-derived literally: for each image,
  ``torch.cdist`` against all the others' patches at once, the minimum per image, the
  mean of the smallest 30 %;
* ``bfloat16``: ``blocked`` with ``similarity_dtype=torch.bfloat16`` (nearest patches
  from bfloat16 products, distances in float32: on a CPU with AVX-512 BF16 or AMX the
  centred form of ``methods/nearest.py``); its time is the column "bf16 s", its speed-up
  over the official algorithm "bf16 speed-up", its largest deviation from ``blocked``
  "bf16 max dev". Paired, interleaved timings with the load average are in
  ``bench_precision.py``; here each run has a process of its own, for its peak memory.

Shapes: the reference CLIP's (37 x 37 patches of 128 channels at 518 px) for the speed
comparison, and ViT-L/14@336's (1024 channels) for time and peak memory at 16, 32 and 64
images. Each measurement runs in a fresh process, so its peak memory is its own. One
MSM is timed (one layer, one degree); a full MuSc run does 12 of them plus the backbone.

    python benchmarks/bench_musc.py                  # the table of the README
    python benchmarks/bench_musc.py --quick --output /tmp/musc.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cpu_counters,
    machine_info,
    markdown_table,
    others_cpu_share,
    peak_rss_mb,
    write_results,
)

from anomalyclip.methods.musc.model import mutual_scores  # noqa: E402

PATCHES = 37 * 37  # 518 px, patch 14
REFERENCE_CHANNELS = 128  # the reference CLIP of shared/reference/paper
VIT_L_CHANNELS = 1024
# (label, images, channels, with the official algorithm too)
CASES = [
    ("reference CLIP", 32, REFERENCE_CHANNELS, True),
    ("ViT-L/14@336", 16, VIT_L_CHANNELS, True),
    ("ViT-L/14@336", 32, VIT_L_CHANNELS, False),
    ("ViT-L/14@336", 64, VIT_L_CHANNELS, False),
]
QUICK_CASES = [("quick", 6, 16, True)]
QUICK_PATCHES = 7 * 7


def official_mutual_scores(vectors: torch.Tensor, interval: float = 0.3) -> torch.Tensor:
    """The official compute_scores_fast, image by image (re-derived, not copied)."""
    count, patches, channels = vectors.shape
    scores = torch.empty(count, patches, dtype=torch.float64)
    for i in range(count):
        references = torch.cat((vectors[:i], vectors[i + 1 :]), dim=0)
        distances = torch.cdist(vectors[i : i + 1], references.reshape(1, -1, channels))
        nearest = distances.reshape(patches, count - 1, patches).min(dim=-1).values
        keep = int((count - 1) * interval)
        values = torch.topk(nearest.float(), keep, dim=-1, largest=False).values
        scores[i] = values.mean(dim=1).double()
    return scores


def unit_vectors(count: int, patches: int, channels: int, seed: int = 0) -> torch.Tensor:
    """LNAMD-like input: unit vectors with shared structure, so nearest patches are close."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(patches, channels, generator=generator)
    noise = torch.randn(count, patches, channels, generator=generator)
    return F.normalize(common + 0.7 * noise, dim=-1)


def measure(algorithm: str, count: int, patches: int, channels: int) -> dict[str, Any]:
    """One algorithm on one shape, in this (fresh) process."""
    vectors = unit_vectors(count, patches, channels)
    functions = {
        "blocked": mutual_scores,
        "official": official_mutual_scores,
        "bfloat16": lambda v: mutual_scores(v, similarity_dtype=torch.bfloat16),
    }
    before = cpu_counters()
    started = time.perf_counter()
    scores = functions[algorithm](vectors)
    seconds = time.perf_counter() - started
    return {
        "algorithm": algorithm,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "others_cpu_share": others_cpu_share(before, cpu_counters(), seconds),
        "scores": scores.tolist() if count * patches <= 64 * PATCHES else None,
    }


def in_fresh_process(algorithm: str, count: int, patches: int, channels: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", algorithm, str(count), str(patches)]
    command += [str(channels)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="JSON path (default benchmarks/results/musc.json)")
    parser.add_argument(
        "--one", nargs=4, metavar=("ALGORITHM", "N", "L", "C"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        algorithm, count, patches, channels = args.one
        print(json.dumps(measure(algorithm, int(count), int(patches), int(channels))))
        return 0
    patches = QUICK_PATCHES if args.quick else PATCHES
    rows, records = [], []
    for label, count, channels, with_official in QUICK_CASES if args.quick else CASES:
        blocked = in_fresh_process("blocked", count, patches, channels)
        record: dict[str, Any] = {
            "shapes": label,
            "images": count,
            "patches": patches,
            "channels": channels,
            "blocked": {k: v for k, v in blocked.items() if k != "scores"},
        }
        official = None
        if with_official:
            official = in_fresh_process("official", count, patches, channels)
            record["official"] = {k: v for k, v in official.items() if k != "scores"}
            record["speedup"] = official["seconds"] / blocked["seconds"]
            if blocked["scores"] is not None:
                record["max_abs_difference"] = float(
                    (torch.tensor(blocked["scores"]) - torch.tensor(official["scores"])).abs().max()
                )
        low = in_fresh_process("bfloat16", count, patches, channels)
        record["bfloat16"] = {k: v for k, v in low.items() if k != "scores"}
        if blocked["scores"] is not None:
            record["bfloat16_max_deviation"] = float(
                (torch.tensor(low["scores"]) - torch.tensor(blocked["scores"])).abs().max()
            )
        records.append(record)
        rows.append(
            [
                label,
                count,
                channels,
                blocked["seconds"],
                blocked["peak_rss_mb"],
                official["seconds"] if official else None,
                official["peak_rss_mb"] if official else None,
                record.get("speedup"),
                low["seconds"],
                official["seconds"] / low["seconds"] if official else None,
                record.get("max_abs_difference"),
                record.get("bfloat16_max_deviation"),
            ]
        )
    table = markdown_table(
        [
            "shapes",
            "images",
            "C",
            "blocked s",
            "blocked peak MB",
            "official s",
            "official peak MB",
            "speed-up",
            "bf16 s",
            "bf16 speed-up",
            "max abs diff",
            "bf16 max dev",
        ],
        rows,
    )
    print(table)
    path = write_results(
        "musc",
        {"machine": machine_info("cpu", args.threads), "cases": records, "table": table},
        args.output,
    )
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Few-shot AnomalyCLIP: bank build time, per-image scoring time and peak memory.

For 1, 4 and 16 reference images at ViT-L/14@336's shapes (518 px, features 6/12/18/24,
random weights: the arithmetic of the real ones), each count in a fresh process so that
its peak memory is its own:

* building the bank (encoding the references and the leave-one-out scale);
* scoring one image zero-shot, then with the bank;
* the nearest-patch search alone, as done (blocked matrix products on unit vectors) and
  the straightforward way (``torch.cdist`` on the raw vectors, then the minimum), which
  ranks patches the same since for unit vectors the Euclidean distance is a monotone
  function of the cosine.

    python benchmarks/bench_references.py                 # 1, 4, 16 references
    python benchmarks/bench_references.py --quick --counts 1 2 --output /tmp/r.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cpu_counters,
    machine_info,
    markdown_table,
    others_cpu_share,
    peak_rss_mb,
    random_model,
    shapes,
    write_results,
)

from anomalyclip.methods.anomalyclip.few_shot import (  # noqa: E402
    FewShotAnomalyCLIP,
    build_bank,
    nearest_distances,
)


def random_images(count: int, size: int, seed: int) -> list:
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    arrays = torch.randint(0, 256, (count, size, size, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(array.numpy()) for array in arrays]


def timed(function, repeats: int = 1) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def measure(count: int, quick: bool, threads: int) -> dict[str, Any]:
    """One count, in this process: the figures of one row."""
    torch.set_num_threads(threads)
    arch, config = shapes(quick)
    model = random_model(arch, config)
    references = random_images(count, config.image_size, seed=1)
    test = random_images(1, config.image_size, seed=2)
    counters = cpu_counters()
    started = time.perf_counter()
    build_seconds, bank = timed(lambda: build_bank(model, references))
    few_shot = FewShotAnomalyCLIP(model, bank)
    model.predict_images(test)  # warm-up: text features, kernels
    zero_seconds, _ = timed(lambda: model.predict_images(test), repeats=2)
    few_seconds, _ = timed(lambda: few_shot.predict_images(test), repeats=2)
    tokens = model.encode_image(model.preprocess(test)).patch_tokens
    layer = max(tokens)
    query, entries = tokens[layer][:, 1:], bank.patches[layer]
    search_seconds, fast = timed(lambda: nearest_distances(query, entries), repeats=3)
    cdist_seconds, slow = timed(
        lambda: torch.cdist(query[0], entries.float()).amin(dim=1), repeats=3
    )
    # for unit vectors |a - b|^2 = 2 - 2 cos: both searches find the same distances
    deviation = float((fast[0] - slow.pow(2) / 2).abs().max())
    elapsed = time.perf_counter() - started
    return {
        "references": count,
        "bank_build_s": build_seconds,
        "bank_mb": bank.nbytes / 1e6,
        "zero_shot_s_per_image": zero_seconds,
        "few_shot_s_per_image": few_seconds,
        "search_one_layer_s": search_seconds,
        "cdist_one_layer_s": cdist_seconds,
        "search_deviation": deviation,
        "peak_rss_mb": peak_rss_mb(),
        "others_cpu_share": others_cpu_share(counters, cpu_counters(), elapsed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke test")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", help="JSON file (default benchmarks/results/)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child's count
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.quick, args.threads)))
        return 0
    rows = []
    for count in args.counts:
        command = [sys.executable, __file__, "--one", str(count), "--threads", str(args.threads)]
        child = subprocess.run(
            command + (["--quick"] if args.quick else []), capture_output=True, text=True
        )
        if child.returncode != 0:
            sys.stderr.write(child.stderr)
            return child.returncode
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    headers = [
        "references",
        "bank build s",
        "bank MB",
        "zero-shot s/img",
        "few-shot s/img",
        "NN search s",
        "cdist s",
        "peak RSS MB",
    ]
    keys = [
        "references",
        "bank_build_s",
        "bank_mb",
        "zero_shot_s_per_image",
        "few_shot_s_per_image",
        "search_one_layer_s",
        "cdist_one_layer_s",
        "peak_rss_mb",
    ]
    print(markdown_table(headers, [[row[k] for k in keys] for row in rows]))
    target = write_results(
        "references" + ("_quick" if args.quick else ""),
        {
            "shapes": "quick" if args.quick else "ViT-L/14@336, 518 px",
            "machine": machine_info("cpu", args.threads),
            "results": rows,
        },
        args.output,
    )
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

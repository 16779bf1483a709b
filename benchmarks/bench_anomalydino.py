"""AnomalyDINO: the nearest-patch search against the authors' faiss search, and latency.

1. **Search.** A bank of 16 references x 8 rotations x 1024 patches (131,072 patches of
   384 dimensions: ViT-S/14 at 448 px) and one test image's 1024 patches, random unit
   vectors. Searched by :func:`anomalyclip.methods.anomalydino.core.nearest_distances`
   (blocked matrix products with a running top-k, memory bounded) and by the authors'
   code's way (``faiss.IndexFlatL2``, ``normalize_L2``, ``add``, ``search``, distances
   halved), or, where faiss is not installed, a literal numpy re-derivation of that flat
   squared-L2 search. Same inputs: the distances must agree; time, and the peak memory
   the search adds over holding the bank (``/proc/self/clear_refs`` resets the peak).
2. **Latency.** A random DINOv2 of ViT-S/14's shapes (width 384, 12 blocks, 6 heads) in
   the few-shot mode at 448 px with rotation (the authors' "agnostic" preset): the bank
   build and the seconds per test image for 1, 4 and 16 shots.

Each measurement runs in a fresh process, so that its peak memory is its own.

    python benchmarks/bench_anomalydino.py                  # the figures in the README
    python benchmarks/bench_anomalydino.py --quick --output /tmp/dino.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cpu_counters,
    machine_info,
    markdown_table,
    others_cpu_share,
    peak_rss_mb,
    write_results,
)

from anomalyclip.backbone.dinov2 import DINOv2, DINOv2Architecture  # noqa: E402
from anomalyclip.methods.anomalydino import AnomalyDINO, AnomalyDINOConfig  # noqa: E402
from anomalyclip.methods.anomalydino.core import nearest_distances  # noqa: E402

WIDTH = 384
VIT_S_14 = DINOv2Architecture(width=WIDTH, depth=12, heads=6, mlp_width=4 * WIDTH)
QUICK_ARCH = DINOv2Architecture(width=64, depth=2, heads=1, mlp_width=128, grid=4)


def reset_peak() -> None:
    """Make the peak resident memory the current one (Linux 4.0+), so a later peak is
    what the step in between added; a no-op elsewhere."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(function, repeats: int = 1) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def unit_rows(count: int, width: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, width), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def search_inputs(quick: bool) -> tuple[np.ndarray, np.ndarray]:
    bank_rows = 2 * 8 * 64 if quick else 16 * 8 * 1024
    query_rows = 64 if quick else 1024
    return unit_rows(bank_rows, WIDTH, seed=1), unit_rows(query_rows, WIDTH, seed=2)


class AuthorsSearch:
    """The authors' search: the bank normalised and added to a flat L2 index once per set
    of references (:meth:`__init__`), then each test image searched (:meth:`search`),
    squared L2 halved; a literal numpy flat L2 where faiss is not installed."""

    def __init__(self, bank: np.ndarray) -> None:
        try:
            import faiss
        except ImportError:
            self.index, self.bank = None, bank
            self.what = "numpy flat L2 (faiss not installed)"
            return
        reference = bank.copy()
        faiss.normalize_L2(reference)
        self.index = faiss.IndexFlatL2(reference.shape[1])
        self.index.add(reference)
        self.what = f"faiss {faiss.__version__} IndexFlatL2"

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """(queries, k) 1 - cos, as squared L2 of unit vectors / 2."""
        if self.index is None:
            return literal_flat_l2(self.bank, queries, k) / 2
        import faiss

        tested = queries.copy()
        faiss.normalize_L2(tested)
        distances, _ = self.index.search(tested, k)
        return distances / 2


def literal_flat_l2(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """faiss' flat L2 written out: |q|^2 + |b|^2 - 2 q.b over every bank row, the k
    smallest per query (in blocks of queries, as faiss' blocked BLAS path)."""
    found = np.empty((len(queries), k), dtype=np.float32)
    bank_norms = (bank * bank).sum(axis=1)
    for start in range(0, len(queries), 256):
        block = queries[start : start + 256]
        squared = (block * block).sum(axis=1)[:, None] + bank_norms[None] - 2 * block @ bank.T
        nearest = np.partition(squared, k - 1, axis=1)[:, :k]
        found[start : start + 256] = np.sort(nearest, axis=1)
    return found


def measure_search(engine: str, quick: bool, k: int) -> dict[str, Any]:
    bank, queries = search_inputs(quick)
    held_mb = current_rss_mb()
    reset_peak()
    if engine == "ours":  # the bank is held as it is: nothing to build
        tensors = torch.from_numpy(bank), torch.from_numpy(queries)
        build_seconds = 0.0
        seconds, (found, _) = timed(lambda: nearest_distances(tensors[1], tensors[0], k), 3)
        distances, what = found.numpy(), "blocked matmul + running top-k (torch)"
    else:
        build_seconds, index = timed(lambda: AuthorsSearch(bank))
        seconds, per_k = timed(lambda: index.search(queries, k), 3)
        distances, what = per_k.astype(np.float64).mean(axis=1), index.what
    return {
        "engine": engine,
        "what": what,
        "bank_patches": len(bank),
        "query_patches": len(queries),
        "k": k,
        "index_build_s": build_seconds,
        "seconds": seconds,
        "bank_mb": bank.nbytes / 1e6,
        "added_peak_mb": peak_rss_mb() - held_mb,
        "distances": distances.tolist(),
    }


def random_backbone(quick: bool) -> DINOv2:
    torch.manual_seed(0)
    model = DINOv2(QUICK_ARCH if quick else VIT_S_14)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("_token", "pos_embed")):
                parameter.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def random_images(count: int, size: int, seed: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)
    ]


def measure_shots(shots: int, quick: bool) -> dict[str, Any]:
    size = 56 if quick else 448
    backbone = random_backbone(quick)
    config = AnomalyDINOConfig(image_size=size, rotation=True)
    references = random_images(shots, size, seed=shots)
    test = random_images(1, size, seed=100)
    counters = cpu_counters()
    started = time.perf_counter()
    build_seconds, few_shot = timed(lambda: AnomalyDINO.from_images(backbone, references, config))
    few_shot.predict_images(test)  # warm-up
    seconds, _ = timed(lambda: few_shot.predict_images(test), repeats=2 if quick else 3)
    (tensor,) = [few_shot.preprocessor.tensor(image) for image in test]
    encode_seconds, _ = timed(lambda: few_shot.encode([tensor]), repeats=2 if quick else 3)
    elapsed = time.perf_counter() - started
    return {
        "shots": shots,
        "bank_patches": few_shot.bank.size,
        "bank_build_s": build_seconds,
        "s_per_image": seconds,
        "encode_s_per_image": encode_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "others_cpu_share": others_cpu_share(counters, cpu_counters(), elapsed),
    }


def child(arguments: list[str]) -> dict[str, Any]:
    command = [sys.executable, __file__, *arguments]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(done.returncode)
    return json.loads(done.stdout.strip().splitlines()[-1])


def search_table(ours: dict[str, Any], authors: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    difference = np.abs(np.array(ours["distances"]) - np.array(authors["distances"]))
    summary = {
        "max_abs_difference": float(difference.max()),
        "mean_distance": float(np.mean(ours["distances"])),
    }
    rows = [
        [row["what"], row["index_build_s"], row["seconds"], row["bank_mb"], row["added_peak_mb"]]
        for row in (ours, authors)
    ]
    headers = [
        f"search (k={ours['k']})",
        "index build s",
        "search s per test image",
        "bank MB",
        "added peak MB",
    ]
    return markdown_table(headers, rows), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--neighbours", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--output", help="JSON file (default benchmarks/results/)")
    parser.add_argument("--search", choices=("ours", "authors"), help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child's shot count
    args = parser.parse_args(argv)
    quick = ["--quick"] if args.quick else []
    if args.search is not None:
        print(json.dumps(measure_search(args.search, args.quick, args.neighbours)))
        return 0
    if args.one is not None:
        print(json.dumps(measure_shots(args.one, args.quick)))
        return 0
    k = ["--neighbours", str(args.neighbours)]
    ours = child(["--search", "ours", *k, *quick])
    authors = child(["--search", "authors", *k, *quick])
    table, agreement = search_table(ours, authors)
    print(table)
    print(f"largest |difference| of the distances: {agreement['max_abs_difference']:.3g}")
    rows = [child(["--one", str(shots), *quick]) for shots in args.shots]
    keys = ["shots", "bank_patches", "bank_build_s", "s_per_image", "encode_s_per_image"]
    headers = ["shots", "bank patches", "bank build s", "s per image", "of it encoding s"]
    print(
        markdown_table(
            [*headers, "peak RSS MB"], [[r[k] for k in [*keys, "peak_rss_mb"]] for r in rows]
        )
    )
    for row in (ours, authors):
        row.pop("distances")
    target = write_results(
        "anomalydino" + ("_quick" if args.quick else ""),
        {
            "shapes": "quick" if args.quick else "ViT-S/14 (384 wide, 12 blocks), 448 px",
            "machine": machine_info("cpu", torch.get_num_threads()),
            "search": {"ours": ours, "authors": authors, **agreement},
            "latency": rows,
        },
        args.output,
    )
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation time: encoding, scoring and metrics, the feature cache, and torchrun.

The configuration is the paper's (518 px, patch 14, 24 visual layers, features 6/12/18/24,
DPAM on the last 19) on a random CLIP, by default ViT-L/14@336's depth with a narrower
width (256) so that it runs on a small CPU; ``--vit-l`` uses the real widths (for a GPU).
Images are the first of ``shared/datasets/metal_plate`` (half normal, half anomalous with
masks), or synthetic ones where ``shared/`` is absent.

Three measurements, each through ``anomalyclip test`` as a user runs it:

1. a cold run with ``--cache-dir`` (every image encoded), with the time spent in the
   metrics measured inside the same process;
2. the same command again: the embeddings come from the disk cache, as when several
   checkpoints or presets are evaluated on one dataset;
3. ``torchrun --nproc_per_node P`` for each ``--processes`` value, each with
   ``--threads / P`` threads per process and no cache, against the single process;
   the script checks that every launch writes the single process's ``results.json``.

    python benchmarks/bench_evaluation.py                     # CPU, width 256, 16 images
    python benchmarks/bench_evaluation.py --vit-l --device cuda --images 64 --processes 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_training import architecture, random_clip, shared_dataset, synthetic_dataset
from common import PAPER_CONFIG, machine_info, markdown_table, write_results

from anomalyclip.cli import main as cli_main
from anomalyclip.data.core import AnomalyDataset
from anomalyclip.evaluation import evaluate as evaluation

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def timed_metrics(seconds: list[float]):
    """Adds the time of every ``class_metrics`` call of this process to ``seconds``."""
    original = evaluation.class_metrics

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    evaluation.class_metrics = timed
    try:
        yield
    finally:
        evaluation.class_metrics = original


def write_manifest(dataset: AnomalyDataset, path: Path) -> Path:
    lines = ["image,label,mask,category"]
    for sample in dataset:
        lines.append(f"{sample.image},{sample.label},{sample.mask or ''},{dataset.name}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_arguments(manifest: Path, clip_file: Path, output: Path, args) -> list[str]:
    return [
        "test",
        f"csv={manifest}",
        "--allow-outside-paths",  # the manifest lists the dataset's images from scratch_dir
        *("--clip-weights", str(clip_file), "--checkpoint", "none"),
        *("--device", args.device, "--batch-size", str(args.batch_size)),
        *("-o", str(output), "--no-progress"),
    ]


def in_process(arguments: list[str]) -> tuple[float, float]:
    """(wall seconds, seconds in the metrics) of ``anomalyclip ARGUMENTS`` in this process."""
    metric_seconds: list[float] = []
    started = time.perf_counter()
    with (
        open(os.devnull, "w") as sink,
        timed_metrics(metric_seconds),
        contextlib.redirect_stdout(sink),
    ):
        status = cli_main(arguments)
    if status != 0:
        raise RuntimeError(f"anomalyclip {' '.join(arguments)} exited with {status}")
    return time.perf_counter() - started, sum(metric_seconds)


def launched(arguments: list[str], processes: int, threads: int, cwd: Path) -> float:
    """Wall seconds of ``torchrun --nproc_per_node PROCESSES -m anomalyclip ARGUMENTS``,
    start-up of every process included."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(processes), "-m", "anomalyclip", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in LAUNCH_VARIABLES:
        environment.pop(name, None)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return seconds


def results_of(output: Path) -> dict:
    return json.loads((output / "test" / "results.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="visual and text width")
    parser.add_argument("--vit-l", action="store_true", help="ViT-L/14@336's real widths")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    parser.add_argument(
        "--processes",
        type=int,
        nargs="*",
        default=[2],
        help="torchrun process counts to compare with one process (none: skip)",
    )
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arch = architecture(args.width, args.vit_l)

    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        dataset = shared_dataset(args.images)
        if dataset is None:
            images = scratch_dir / "images"
            images.mkdir()
            dataset = synthetic_dataset(args.images, images)
        manifest = write_manifest(dataset, scratch_dir / "test.csv")
        clip_file = scratch_dir / "clip.pt"
        torch.save(random_clip(arch).state_dict(), clip_file)

        def arguments(name: str, cached: bool) -> list[str]:
            extra = ["--cache-dir", str(scratch_dir / "cache")] if cached else []
            return test_arguments(manifest, clip_file, scratch_dir / name, args) + extra

        cold, cold_metrics = in_process(arguments("cold", cached=True))
        warm, warm_metrics = in_process(arguments("warm", cached=True))
        reference = results_of(scratch_dir / "cold")
        same_with_cache = results_of(scratch_dir / "warm") == reference
        print(f"cold {cold:.1f} s, from the cache {warm:.1f} s", file=sys.stderr)

        launches = []
        for processes in [1, *args.processes] if args.processes else []:
            threads = max(1, args.threads // processes)
            name = f"torchrun-{processes}"
            seconds = launched(arguments(name, cached=False), processes, threads, scratch_dir)
            identical = results_of(scratch_dir / name) == reference
            launches.append(
                {
                    "processes": processes,
                    "threads_per_process": threads,
                    "seconds": seconds,
                    "identical_results": identical,
                }
            )
            print(
                f"{processes} process(es): {seconds:.1f} s, identical {identical}", file=sys.stderr
            )

    count = len(dataset)
    title = "ViT-L/14@336" if args.vit_l else f"width-{args.width} ViT-L/14@336-depth"
    print(
        f"\n{title} random CLIP, {count} images ({dataset.name}), batch {args.batch_size}, "
        f"{PAPER_CONFIG.image_size} px, {args.device}, {args.threads} threads\n"
    )
    rows = [
        ("cold, --cache-dir (encode + score + metrics)", cold, cold / count, cold_metrics, True),
        ("again, embeddings from the cache", warm, warm / count, warm_metrics, same_with_cache),
    ]
    rows += [
        (
            f"torchrun, {entry['processes']} x {entry['threads_per_process']} threads, no cache",
            entry["seconds"],
            entry["seconds"] / count,
            None,
            entry["identical_results"],
        )
        for entry in launches
    ]
    headers = ["run", "seconds", "s / image", "of which metrics (s)", "same results.json"]
    print(markdown_table(headers, rows))

    report = {
        "configuration": {
            "architecture": arch.to_dict(),
            "model": PAPER_CONFIG.to_dict(),
            "images": count,
            "data": dataset.name,
            "batch_size": args.batch_size,
        },
        "machine": machine_info(args.device, args.threads),
        "cold_seconds": cold,
        "cold_metric_seconds": cold_metrics,
        "cached_seconds": warm,
        "cached_metric_seconds": warm_metrics,
        "cached_results_identical": same_with_cache,
        "torchrun": launches,
    }
    print(f"written to {write_results('bench_evaluation', report, args.output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

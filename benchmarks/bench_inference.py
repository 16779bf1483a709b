"""Inference speed and memory: seconds per image and images/s by batch size, peak memory,
and every faster path's deviation from float32.

The model has ViT-L/14@336's shapes with random weights (nothing is downloaded) and the
paper's settings: 518 px input, DPAM on 19 layers, features from layers 6/12/18/24. Each
engine runs in its own process, so its peak resident memory (VmHWM) is its own; batch
sizes run in ascending order, so the peak reported for a batch size covers building the
model and scoring up to that batch. Deviations compare the scores and maps of the same
random images with the float32 PyTorch engine on the same device.

    python benchmarks/bench_inference.py                      # CPU: float32, int8, ONNX
    python benchmarks/bench_inference.py --quick --no-write   # smoke test, seconds
    python benchmarks/bench_inference.py --device cuda --dtype float16 --batch-sizes 1 8 32

Engines: torch-fp32, torch-fp16, torch-bf16 (the model in that dtype), torch-autocast-fp16
and torch-autocast-bf16 (float32 weights under autocast), torch-int8 (dynamic int8 linear
layers, CPU), onnx-fp32 and onnx-int8 (ONNX Runtime on the exported image path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    cpu_counters,
    machine_info,
    markdown_table,
    others_cpu_share,
    peak_rss_mb,
    random_model,
    shapes,
    synchronize,
    write_results,
)

ENGINES = (
    "torch-fp32",
    "torch-fp16",
    "torch-bf16",
    "torch-autocast-fp16",
    "torch-autocast-bf16",
    "torch-int8",
    "onnx-fp32",
    "onnx-int8",
)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
REFERENCE = "torch-fp32"
CHECK_IMAGES = 2

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def default_engines(device: str, dtype: str | None) -> list[str]:
    if dtype is not None:
        return [REFERENCE, f"torch-{DTYPE_NAMES[dtype]}"]
    if device.startswith("cuda"):
        return [REFERENCE, "torch-fp16", "torch-autocast-fp16", "torch-bf16"]
    return [REFERENCE, "torch-int8", "onnx-fp32", "onnx-int8"]


def images(count: int, size: int, seed: int) -> np.ndarray:
    """Standard-normal inputs, like normalised images; the same for every engine."""
    generator = np.random.default_rng(seed)
    return generator.standard_normal((count, 3, size, size), dtype=np.float32)


# one engine, in a worker process ------------------------------------------------------


def torch_runner(engine: str, spec: dict[str, Any]) -> Runner:
    from anomalyclip.methods.anomalyclip.quantize import quantize_dynamic

    device = spec["device"]
    kind = engine.removeprefix("torch-")
    autocast_dtype = DTYPES[kind.removeprefix("autocast-")] if "autocast" in kind else None
    weights_dtype = DTYPES.get(kind, torch.float32)
    model = random_model(*shapes(spec["quick"]), seed=spec["seed"], device=device)
    model.text_features()  # cached once, as predict does
    if kind == "int8":
        quantize_dynamic(model)
    elif weights_dtype != torch.float32:
        model.to(dtype=weights_dtype)
    if spec["compile"]:
        visual = model.clip.visual
        visual.forward_features = torch.compile(visual.forward_features)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = torch.from_numpy(batch).to(device)
        autocast = (
            torch.autocast(torch.device(device).type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            output = model(inputs)
        return output.image_scores.float().cpu().numpy(), output.anomaly_maps.float().cpu().numpy()

    return run


def onnx_runner(engine: str, spec: dict[str, Any]) -> Runner:
    from anomalyclip.methods.anomalyclip.onnx import OnnxAnomalyModel

    return OnnxAnomalyModel(spec["onnx_files"][engine], threads=spec["threads"])


def worker(spec_path: str) -> None:
    """Build one engine, save its outputs on the check images, time every batch size."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    engine, device = spec["engine"], spec["device"]
    size = shapes(spec["quick"])[1].image_size
    started = time.perf_counter()
    run = onnx_runner(engine, spec) if engine.startswith("onnx") else torch_runner(engine, spec)
    result: dict[str, Any] = {
        "engine": engine,
        "build_seconds": time.perf_counter() - started,
        "rss_after_build_mb": peak_rss_mb(),
        "load_average_at_start": os.getloadavg()[0],  # other work on the machine skews times
    }
    # The check images, one at a time: the deviation inputs and the first (cold) calls.
    check = images(CHECK_IMAGES, size, seed=1)
    outputs = []
    for index in range(CHECK_IMAGES):
        started = time.perf_counter()
        outputs.append(run(check[index : index + 1]))
        synchronize(device)
        result.setdefault("first_call_seconds", time.perf_counter() - started)
    np.savez(
        spec["outputs"],
        scores=np.concatenate([s for s, _ in outputs]),
        maps=np.concatenate([m for _, m in outputs]),
    )
    result["batches"] = []
    for batch_size in sorted(spec["batch_sizes"]):
        batch = images(batch_size, size, seed=2)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2 if spec["compile"] else 1):  # warm-up (compiled: and recompile)
            run(batch)
        synchronize(device)
        times = []
        counters = cpu_counters()
        for _ in range(spec["repeats"]):
            started = time.perf_counter()
            run(batch)
            synchronize(device)
            times.append(time.perf_counter() - started)
        others = others_cpu_share(counters, cpu_counters(), sum(times))
        seconds = statistics.median(times)
        entry = {
            "batch_size": batch_size,
            "seconds_per_batch": seconds,
            "seconds_per_image": seconds / batch_size,
            "images_per_second": batch_size / seconds,
            "all_seconds": times,
            "peak_rss_mb": peak_rss_mb(),
            "others_cpu_share": others,
        }
        if device.startswith("cuda"):
            entry["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["batches"].append(entry)
    result["load_average_at_end"] = os.getloadavg()[0]
    Path(spec["result"]).write_text(json.dumps(result))


# the parent: export, one worker per engine, deviations, table ----------------------------


def export_onnx_files(
    engines: list[str], args: argparse.Namespace, folder: Path
) -> tuple[dict[str, str], float]:
    """Export the random model once (and quantise it if asked), in this process."""
    from anomalyclip.methods.anomalyclip.onnx import export_onnx, quantize_onnx

    wanted = [e for e in engines if e.startswith("onnx")]
    if not wanted:
        return {}, 0.0
    started = time.perf_counter()
    model = random_model(*shapes(args.quick), seed=args.seed)
    files = {"onnx-fp32": str(export_onnx(model, folder / "model.onnx"))}
    del model
    if "onnx-int8" in wanted:
        files["onnx-int8"] = str(quantize_onnx(files["onnx-fp32"], folder / "model-int8.onnx"))
    return files, time.perf_counter() - started


def run_worker(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    spec_path = folder / f"{spec['engine']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"engine": spec["engine"], "error": completed.stderr.strip().splitlines()[-1:]}
    return json.loads(Path(spec["result"]).read_text())


def deviation(reference: Path, candidate: Path) -> dict[str, float]:
    """How far an engine's outputs are from float32 PyTorch on the same images."""
    from anomalyclip.methods.anomalyclip.onnx import output_deviation

    ref, other = np.load(reference), np.load(candidate)
    return output_deviation((ref["scores"], ref["maps"]), (other["scores"], other["maps"]))


def report(results: list[dict[str, Any]]) -> str:
    reference = next((r for r in results if r["engine"] == REFERENCE and "batches" in r), None)
    baseline = {
        b["batch_size"]: b["seconds_per_image"] for b in (reference or {}).get("batches", [])
    }
    rows = []
    for result in results:
        if "error" in result:
            rows.append([result["engine"], "-", "failed: " + " ".join(result["error"])])
            continue
        dev = result.get("deviation", {})
        for entry in result["batches"]:
            base = baseline.get(entry["batch_size"])
            rows.append(
                [
                    result["engine"],
                    entry["batch_size"],
                    entry["seconds_per_image"],
                    entry["images_per_second"],
                    base / entry["seconds_per_image"] if base else None,
                    entry["peak_rss_mb"],
                    entry.get("peak_gpu_mb"),
                    dev.get("max_abs_score_difference"),
                    dev.get("max_abs_map_difference"),
                    f"{dev['map_correlation']:.6f}" if dev else None,
                    None
                    if entry["others_cpu_share"] is None
                    else f"{entry['others_cpu_share']:.0%}",
                ]
            )
    headers = [
        "engine",
        "batch",
        "s / image",
        "images / s",
        "speed-up",
        "peak RSS MB",
        "peak GPU MB",
        "max |d score|",
        "max |d map|",
        "map corr.",
        "others' CPU",
    ]
    return markdown_table(headers, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke test")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPE_NAMES),
        help="shorthand for --engines torch-fp32 torch-<dtype>",
    )
    parser.add_argument("--engines", nargs="+", choices=ENGINES, help="default: per device")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default: 1 2 4 (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the visual tower")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engines is None:
        args.engines = default_engines(args.device, args.dtype)
    # The float32 engine first: the baseline for speed-ups and deviations.
    args.engines = list(dict.fromkeys([REFERENCE, *args.engines]))
    if args.batch_sizes is None:
        args.batch_sizes = [1, 8, 32] if args.device.startswith("cuda") else [1, 2, 4]
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if any(b < 1 for b in args.batch_sizes) or args.repeats < 1:
        parser.error("batch sizes and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    info = machine_info(args.device, args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as work:
        folder = Path(work)
        onnx_files, export_seconds = export_onnx_files(args.engines, args, folder)
        for engine in args.engines:
            spec = {
                "engine": engine,
                "device": args.device,
                "quick": args.quick,
                "seed": args.seed,
                "threads": args.threads,
                "batch_sizes": args.batch_sizes,
                "repeats": args.repeats,
                "compile": args.compile,
                "onnx_files": onnx_files,
                "outputs": str(folder / f"{engine}.npz"),
                "result": str(folder / f"{engine}.result.json"),
            }
            print(f"running {engine} ...", file=sys.stderr, flush=True)
            results.append(run_worker(spec, folder))
        reference_outputs = folder / f"{REFERENCE}.npz"
        for result in results:
            candidate = folder / f"{result['engine']}.npz"
            if "error" not in result and result["engine"] != REFERENCE:
                result["deviation"] = deviation(reference_outputs, candidate)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    table = report(results)
    arch, config = shapes(args.quick)
    print(table)
    print(f"\n{info['cpu']}, {args.threads} threads, load average {info['load_average_at_start']}")
    if not args.no_write:
        name = f"inference-{'quick-' if args.quick else ''}{args.device.split(':')[0]}"
        data = {
            "benchmark": "inference",
            "machine": info,
            "architecture": arch.to_dict(),
            "config": config.to_dict(),
            "settings": {
                k: getattr(args, k) for k in ("device", "batch_sizes", "repeats", "compile")
            },
            "onnx_export_seconds": export_seconds,
            "results": results,
            "table": table,
        }
        print(f"wrote {write_results(name, data, args.output)}", file=sys.stderr)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Lower precision on the CPU (issue 23): speed and deviation from float32, in one process.

Side by side, same inputs, same run, the CPU's flags recorded:

* MuSc mutual scoring (one MSM: one layer, one degree) on 32 images at the reference
  CLIP's size (37 x 37 patches of 128 channels at 518 px: the real LNAMD vectors of 16
  good + 16 defective metal plates through the random-weight reference CLIP) against the
  official ``compute_scores_fast`` re-derived literally (``bench_musc.py``), float32 and
  bfloat16; then at ViT-L/14@336 shapes (1024 channels, 16 and 32 images of clustered
  random unit vectors; the official algorithm at 16 only).
* The whole of MuSc on those 32 plates, float32 against bfloat16: the largest image-score
  difference, the maps' correlation, image and pixel AUROC.
* AnomalyCLIP s/image at ViT-L/14@336 shapes (random weights), 518 px: float32 (the
  limit), bfloat16 and dynamic int8; and on the 32 plates with the reference weights:
  largest score difference, map correlation, image/pixel AUROC against float32.

    python benchmarks/bench_precision.py                 # the README's figures
    python benchmarks/bench_precision.py --quick --no-write
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import machine_info, markdown_table, random_model, shapes, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_musc import official_mutual_scores, unit_vectors  # noqa: E402

from anomalyclip.evaluation.metrics import image_auroc, pixel_auroc  # noqa: E402
from anomalyclip.methods.musc.model import MuSc, MuScConfig, lnamd, mutual_scores  # noqa: E402
from anomalyclip.utils.precision import (  # noqa: E402
    BFLOAT16_FLAGS,
    INT8_FLAGS,
    PrecisionChoice,
    cpu_flags,
    resolve_precision,
)

logger = logging.getLogger("bench_precision")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" if (ROOT.parent / "shared").is_dir() else Path("/work/shared")
PLATES = SHARED / "datasets" / "metal_plate"
REFERENCE = SHARED / "reference" / "paper"


def timed(function: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best of ``repeats`` wall times (the machine is shared: the minimum is the cost)."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def plates(size: int, per_class: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(images (N, 3, S, S) as MuSc preprocesses them, labels (N,), masks (N, S, S))."""
    from PIL import Image

    from anomalyclip.preprocess import PreProcessor

    good = sorted((PLATES / "test" / "good").iterdir())[:per_class]
    defect = sorted((PLATES / "test" / "defect").iterdir())[:per_class]
    preprocessor = PreProcessor(size, "center-crop")
    images = torch.stack([preprocessor.tensor(Image.open(p).convert("RGB")) for p in good + defect])
    masks = np.zeros((len(images), size, size), dtype=bool)
    for index, path in enumerate(defect, start=len(good)):
        mask = PLATES / "ground_truth" / "defect" / f"{path.stem}_mask.png"
        masks[index] = preprocessor.load_mask(mask if mask.is_file() else None).numpy() > 0
    labels = np.array([0] * len(good) + [1] * len(defect))
    return images, labels, masks


def deviation(
    scores: np.ndarray, maps: np.ndarray, exact: tuple[np.ndarray, np.ndarray], truth: Any
) -> dict[str, float]:
    labels, masks = truth
    return {
        "max_score_difference": float(np.abs(scores - exact[0]).max()),
        "map_correlation": float(np.corrcoef(maps.ravel(), exact[1].ravel())[0, 1]),
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
    }


def interleaved(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Any]:
    """Each function run ``repeats`` times in turn (a, b, c, a, b, c, ...): the machine is
    shared, so paired runs see the same load; the median time of each, its last result,
    and the load average around them."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    results: dict[str, Any] = {}
    before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            results[name] = function()
            times[name].append(time.perf_counter() - started)
    return {
        "median_s": {name: float(np.median(values)) for name, values in times.items()},
        "all_s": times,
        "results": results,
        "load_average": [round(before, 2), round(os.getloadavg()[0], 2)],
    }


def musc_msm(
    images: torch.Tensor, quick: bool, repeats: int, vit_images: tuple[int, ...] = (16, 32, 64)
) -> list[dict[str, Any]]:
    """One MSM at the reference CLIP's size (real vectors) and at ViT-L/14@336 shapes
    (16, 32, 64 images; the official algorithm up to 32), interleaved, median times."""
    from anomalyclip.backbone.loading import load_clip

    clip = load_clip(REFERENCE / "clip_openai_layout.pt")
    musc = MuSc(clip, MuScConfig(backbone="reference", image_size=images.shape[-1]))
    tokens, _ = musc.features(images)
    cases = [("reference CLIP, metal plates", lnamd(tokens[12], 3), True, repeats)]
    patches = 49 if quick else 37 * 37
    for count in (4,) if quick else vit_images:
        vectors = unit_vectors(count, patches, 1024)
        cases.append(("ViT-L/14@336", vectors, count <= 32, 1 if count > 16 else repeats))
    records = []
    for label, vectors, with_official, times in cases:
        functions = {
            "float32": lambda v=vectors: mutual_scores(v),
            "bfloat16": lambda v=vectors: mutual_scores(v, similarity_dtype=torch.bfloat16),
        }
        if with_official:
            functions["official"] = lambda v=vectors: official_mutual_scores(v)
        run = interleaved(functions, times)
        seconds, results = run["median_s"], run["results"]
        exact, low = results["float32"], results["bfloat16"]
        record = {
            "shapes": label,
            "images": len(vectors),
            "channels": vectors.shape[-1],
            "repeats": times,
            "load_average": run["load_average"],
            "all_s": run["all_s"],
            "float32_s": seconds["float32"],
            "bfloat16_s": seconds["bfloat16"],
            "bfloat16_over_float32": seconds["float32"] / seconds["bfloat16"],
            "bfloat16_max_deviation": float((low - exact).abs().max()),
            "bfloat16_min_change": float((low - exact).min()),
        }
        if with_official:
            record.update(
                official_s=seconds["official"],
                official_float32_difference=float((results["official"] - exact).abs().max()),
                float32_speedup=seconds["official"] / seconds["float32"],
                bfloat16_speedup=seconds["official"] / seconds["bfloat16"],
            )
        records.append(record)
        logger.info("msm case: %s", json.dumps(record))  # a long run shows each case
    return records


def musc_whole(images: torch.Tensor, truth: Any) -> dict[str, Any]:
    """All of MuSc (4 layers x 3 degrees, RsCIN) on the plates: float32 against bfloat16."""
    from anomalyclip.backbone.loading import load_clip

    clip = load_clip(REFERENCE / "clip_openai_layout.pt")
    config = MuScConfig(backbone="reference", image_size=images.shape[-1])
    exact_s, exact = timed(lambda: MuSc(clip, config).run(images))
    low_config = MuScConfig(**{**config.to_dict(), "similarity_dtype": "bfloat16"})
    low_s, low = timed(lambda: MuSc(clip, low_config).run(images))
    reference = (exact.image_scores, exact.anomaly_maps)
    return {
        "float32_s": exact_s,
        "bfloat16_s": low_s,
        "float32": deviation(*reference, reference, truth),
        "bfloat16": deviation(low.image_scores, low.anomaly_maps, reference, truth),
    }


def anomalyclip_speed(quick: bool, repeats: int) -> dict[str, Any]:
    """s/image (batch 1) at ViT-L/14@336 shapes, 518 px, one model per precision in turn."""
    from anomalyclip.methods.anomalyclip.quantize import apply_precision

    arch, config = shapes(quick)
    generator = np.random.default_rng(0)
    image = torch.from_numpy(
        generator.standard_normal((1, 3, config.image_size, config.image_size), np.float32)
    )
    auto = resolve_precision("auto", "cpu", ("bfloat16", "int8", "float32")).precision
    seconds: dict[str, float] = {}
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for choice in ("float32", "bfloat16", "int8"):
        model = random_model(arch, config)
        model.text_features()
        apply_precision(model, PrecisionChoice(choice, choice, "benchmark"))
        model.text_features()
        with torch.inference_mode():
            model.score_tensors(image)  # warm-up: oneDNN primitives, caches
            seconds[choice], outputs[choice] = timed(
                lambda m=model: m.score_tensors(image), repeats
            )
        del model
    exact = outputs["float32"]
    return {
        "image_size": config.image_size,
        "seconds_per_image": seconds,
        "auto": auto,
        "ratio_to_float32": {k: v / seconds["float32"] for k, v in seconds.items()},
        "random_image_map_correlation": {
            k: float(np.corrcoef(v[1].ravel(), exact[1].ravel())[0, 1]) for k, v in outputs.items()
        },
    }


def anomalyclip_peak_rss(choice: str, quick: bool, threads: int) -> dict[str, Any]:
    """Peak RSS of one AnomalyCLIP (ViT-L/14@336 shapes, 518 px) built, put in ``choice``
    and run on one image, in a process of its own (a peak is per process)."""
    command = [sys.executable, __file__, "--rss", choice, "--threads", str(threads)]
    done = subprocess.run(
        [*command, *(["--quick"] if quick else [])], capture_output=True, text=True, check=True
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure_peak_rss(choice: str, quick: bool) -> dict[str, Any]:
    """This process's part of :func:`anomalyclip_peak_rss`."""
    from common import peak_rss_mb

    from anomalyclip.methods.anomalyclip.quantize import apply_precision

    arch, config = shapes(quick)
    image = torch.zeros(1, 3, config.image_size, config.image_size)
    model = random_model(arch, config)
    model.text_features()
    apply_precision(model, PrecisionChoice(choice, choice, "benchmark"))
    with torch.inference_mode():
        model.score_tensors(image)
    return {"precision": choice, "peak_rss_mb": peak_rss_mb()}


def anomalyclip_plates(per_class: int) -> dict[str, Any]:
    """The reference AnomalyCLIP (shared/reference/paper) on the plates, each precision."""
    from anomalyclip.backbone.loading import load_clip
    from anomalyclip.methods.anomalyclip.checkpoint import apply_prompt_state, read_checkpoint
    from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
    from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
    from anomalyclip.methods.anomalyclip.quantize import apply_precision

    config = AnomalyCLIPConfig(
        backbone=str(REFERENCE / "clip_openai_layout.pt"),
        image_size=518,
        features=(6, 12, 18, 24),
        dpam_layers=19,
        n_ctx=12,
        prompt_depth=9,
        deep_prompt_length=4,
        sigma=4,
    )
    images, labels, masks = plates(518, per_class)
    truth = (labels, masks)
    results: dict[str, Any] = {}
    reference = None
    for choice in ("float32", "bfloat16", "int8"):
        model = AnomalyCLIP(load_clip(config.backbone), config)
        apply_prompt_state(model, read_checkpoint(REFERENCE / "prompt_learner_checkpoint.pth"))
        apply_precision(model.eval(), PrecisionChoice(choice, choice, "benchmark"))
        with torch.inference_mode():
            parts = [model.score_tensors(images[i : i + 8]) for i in range(0, len(images), 8)]
        scores = np.concatenate([p[0] for p in parts])
        maps = np.concatenate([p[1] for p in parts])
        reference = reference or (scores, maps)
        results[choice] = deviation(scores, maps, reference, truth)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["msm", "musc", "clip", "rss", "plates"]
    )
    parser.add_argument("--output", help="JSON path (default benchmarks/results/precision.json)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--vit-images", type=int, nargs="*", default=[16, 32, 64], help="MSM set sizes"
    )
    parser.add_argument("--rss", help=argparse.SUPPRESS)  # one peak-RSS measurement
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss:
        print(json.dumps(measure_peak_rss(args.rss, args.quick)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    flags = sorted((BFLOAT16_FLAGS | INT8_FLAGS) & cpu_flags())
    record: dict[str, Any] = {"machine": machine_info("cpu", args.threads), "cpu_flags": flags}
    per_class = 2 if args.quick else 16
    images, labels, masks = plates(98 if args.quick else 518, per_class)
    truth = (labels, masks)
    if "msm" not in args.skip:
        record["msm"] = musc_msm(images, args.quick, args.repeats, tuple(args.vit_images))
        logger.info("msm: %s", json.dumps(record["msm"]))
    if "musc" not in args.skip:
        record["musc"] = musc_whole(images, truth)
        logger.info("musc: %s", json.dumps(record["musc"]))
    if "clip" not in args.skip:
        record["anomalyclip_speed"] = anomalyclip_speed(args.quick, args.repeats)
        logger.info("anomalyclip_speed: %s", json.dumps(record["anomalyclip_speed"]))
    if "rss" not in args.skip:
        record["anomalyclip_peak_rss_mb"] = {
            choice: anomalyclip_peak_rss(choice, args.quick, args.threads)["peak_rss_mb"]
            for choice in ("float32", "bfloat16", "int8")
        }
        logger.info("anomalyclip peak RSS: %s", record["anomalyclip_peak_rss_mb"])
    if "plates" not in args.skip:
        record["anomalyclip_plates"] = anomalyclip_plates(per_class)
    record["table"] = table(record)  # each section is also logged as it finishes
    print(f"CPU: {record['machine'].get('cpu')}, flags: {', '.join(flags) or 'none'}")
    print(record["table"])
    if not args.no_write:
        print(f"written: {write_results('precision', record, args.output)}")
    return 0


def table(record: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    for case in record.get("msm", []):
        rows.append(
            [
                f"MSM {case['shapes']}, {case['images']} images, C {case['channels']} "
                f"(load {case['load_average'][0]:.1f}-{case['load_average'][1]:.1f})",
                case.get("official_s"),
                case["float32_s"],
                case["bfloat16_s"],
                case.get("bfloat16_speedup"),
                case["bfloat16_max_deviation"],
                None,
                None,
            ]
        )
    whole = record.get("musc")
    if whole:
        low = whole["bfloat16"]
        rows.append(
            [
                "MuSc whole, 32 plates",
                None,
                whole["float32_s"],
                whole["bfloat16_s"],
                None,
                low["max_score_difference"],
                low["map_correlation"],
                f"{low['image_auroc']:.4f}/{low['pixel_auroc']:.4f} "
                f"(fp32 {whole['float32']['image_auroc']:.4f}/"
                f"{whole['float32']['pixel_auroc']:.4f})",
            ]
        )
    speed = record.get("anomalyclip_speed")
    plates_record = record.get("anomalyclip_plates", {})
    if speed:
        for choice in ("bfloat16", "int8"):
            found = plates_record.get(choice, {})
            base = plates_record.get("float32", {})
            rows.append(
                [
                    f"AnomalyCLIP ViT-L/14@336 {speed['image_size']} px, {choice} "
                    f"(auto = {speed['auto']})",
                    None,
                    speed["seconds_per_image"]["float32"],
                    speed["seconds_per_image"][choice],
                    speed["ratio_to_float32"][choice],
                    found.get("max_score_difference"),
                    found.get("map_correlation"),
                    f"{found.get('image_auroc', float('nan')):.4f}/"
                    f"{found.get('pixel_auroc', float('nan')):.4f} (fp32 "
                    f"{base.get('image_auroc', float('nan')):.4f}/"
                    f"{base.get('pixel_auroc', float('nan')):.4f})",
                ]
            )
    for choice, megabytes in record.get("anomalyclip_peak_rss_mb", {}).items():
        rows.append([f"AnomalyCLIP ViT-L/14@336 518 px, {choice}: peak RSS {megabytes:.0f} MB"])
        rows[-1] += [None] * 7
    headers = [
        "case",
        "official s",
        "float32 s",
        "low s",
        "speed-up (MSM: vs official; CLIP: ratio to fp32)",
        "max |d score|",
        "map corr.",
        "image/pixel AUROC",
    ]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())

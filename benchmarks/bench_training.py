"""Epoch times of prompt training with and without the feature cache.

The configuration is the paper's (518 px, patch 14, 24 visual layers, features from layers
6/12/18/24, DPAM on the last 19, deep prompts to depth 9, batch 8) on a random CLIP:
by default ViT-L/14@336's depth with a narrower width (256) so that it runs on a small
CPU; ``--vit-l`` uses ViT-L/14@336's real shapes (for a GPU). Images are the first of
``shared/datasets/metal_plate`` (half normal, half anomalous with masks), or synthetic
ones where ``shared/`` is absent.

Both runs start from the same prompts; the script checks that their per-epoch losses and
final prompts are identical (bit for bit on CPU), prints a Markdown table and writes JSON.

    python benchmarks/bench_training.py                      # CPU, width 256, 16 images
    python benchmarks/bench_training.py --vit-l --device cuda --images 64
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import VIT_L_14_336, machine_info, markdown_table, write_results
from PIL import Image

from anomalyclip.backbone.clip import CLIP, CLIPArchitecture
from anomalyclip.data.core import AnomalyDataset, Sample
from anomalyclip.data.industrial import read_mvtec
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.embedding_cache import FeatureCache
from anomalyclip.methods.anomalyclip.model import create_model
from anomalyclip.methods.anomalyclip.training import TrainOptions, make_deterministic, train

REPO_ROOT = Path(__file__).resolve().parents[1]


def architecture(width: int, vit_l: bool) -> CLIPArchitecture:
    """ViT-L/14@336, or its depths, patch and grid with every width set to ``width``."""
    if vit_l:
        return VIT_L_14_336
    heads = max(1, width // 64)
    return dataclasses.replace(
        VIT_L_14_336,
        embed_dim=width,
        vision_width=width,
        vision_heads=heads,
        text_width=width,
        text_heads=heads,
    )


def random_clip(arch: CLIPArchitecture) -> CLIP:
    torch.manual_seed(0)
    return CLIP(arch).eval()


def shared_dataset(count: int) -> AnomalyDataset | None:
    shared = Path(os.environ.get("ANOMALYCLIP_SHARED", REPO_ROOT.parent / "shared"))
    root = shared / "datasets" / "metal_plate"
    if not root.is_dir():
        return None
    dataset = read_mvtec(root)
    normal = [s for s in dataset if s.label == 0][: count // 2]
    anomalous = [s for s in dataset if s.label == 1][: count - len(normal)]
    return AnomalyDataset.create("metal_plate", root, "test", normal + anomalous, pixel_level=True)


def synthetic_dataset(count: int, folder: Path) -> AnomalyDataset:
    """Noise images of 512 px with a random rectangle marked in every anomalous one."""
    generator = np.random.default_rng(0)
    samples = []
    for index in range(count):
        image = folder / f"{index:03d}.png"
        pixels = generator.integers(0, 256, (512, 512, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image)
        label = index % 2
        mask = None
        if label:
            mask = folder / f"{index:03d}_mask.png"
            marked = np.zeros((512, 512), dtype=np.uint8)
            top, left = generator.integers(0, 400, 2)
            marked[top : top + 100, left : left + 100] = 255
            Image.fromarray(marked).save(mask)
        samples.append(Sample(image, label, mask, "synthetic", "defect" if label else "good"))
    return AnomalyDataset.create("synthetic", folder, "test", samples, pixel_level=True)


def run(
    clip: CLIP,
    dataset: AnomalyDataset,
    options: TrainOptions,
    cached: bool,
    device: str,
    encode_batch_size: int,
    output: Path,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    model = create_model(clip_weights=clip, config=AnomalyCLIPConfig(), seed=options.seed).to(
        device
    )
    cache = FeatureCache(model, memory=cached)
    result = train(
        model,
        dataset,
        output,
        options,
        cache=cache,
        encode_batch_size=encode_batch_size,
        progress=False,
    )
    state = {k: v.detach().cpu().clone() for k, v in model.prompt_learner.state_dict().items()}
    return [entry.to_dict() for entry in result.history], state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="visual and text width")
    parser.add_argument("--vit-l", action="store_true", help="ViT-L/14@336's real widths")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encode-batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic CUDA kernels (GPU runs)"
    )
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.deterministic:
        make_deterministic()
    arch = architecture(args.width, args.vit_l)
    clip = random_clip(arch).to(args.device)
    options = TrainOptions(epochs=args.epochs, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        dataset = shared_dataset(args.images)
        if dataset is None:
            images = scratch_dir / "images"
            images.mkdir()
            dataset = synthetic_dataset(args.images, images)
        # an untimed run first, so that neither timed run pays for start-up (CUDA, kernels)
        warm_up = AnomalyDataset.create(
            dataset.name,
            dataset.root,
            "test",
            dataset.samples[-1:] + dataset.samples[:1],
            pixel_level=True,
        )
        warm_options = TrainOptions(epochs=1, batch_size=args.batch_size)
        run(clip, warm_up, warm_options, True, args.device, 1, scratch_dir / "warm-up")
        runs = {}
        states = {}
        for cached in (True, False):
            name = "cached" if cached else "uncached"
            started = time.perf_counter()
            runs[name], states[name] = run(
                clip,
                dataset,
                options,
                cached,
                args.device,
                args.encode_batch_size,
                scratch_dir / name,
            )
            print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)

    identical_losses = [
        (a["loss"], a["image_loss"], a["local_loss"])
        == (b["loss"], b["image_loss"], b["local_loss"])
        for a, b in zip(runs["cached"], runs["uncached"], strict=True)
    ]
    identical_prompts = all(
        torch.equal(states["cached"][k], states["uncached"][k]) for k in states["cached"]
    )
    loss_difference = max(
        abs(a["loss"] - b["loss"]) for a, b in zip(runs["cached"], runs["uncached"], strict=True)
    )
    cached_seconds = [e["seconds"] for e in runs["cached"]]
    uncached_seconds = [e["seconds"] for e in runs["uncached"]]
    later = statistics.mean(cached_seconds[1:]) if len(cached_seconds) > 1 else float("nan")
    speedup = cached_seconds[0] / later

    print(
        f"\n{'ViT-L/14@336' if args.vit_l else f'width-{args.width} ViT-L/14@336-depth'} random "
        f"CLIP, {len(dataset)} images ({dataset.name}), batch {args.batch_size}, "
        f"{AnomalyCLIPConfig().image_size} px, {args.device}"
    )
    rows = [
        (a["epoch"], a["seconds"], b["seconds"], f"{a['loss']:.6f}")
        for a, b in zip(runs["cached"], runs["uncached"], strict=True)
    ]
    print()
    print(markdown_table(["epoch", "with cache (s)", "without cache (s)", "loss"], rows))
    print(
        f"\nfirst epoch / mean of later epochs with the cache: {speedup:.1f}x; "
        f"losses identical: {all(identical_losses)} (largest difference {loss_difference:.2g}); "
        f"final prompts identical: {identical_prompts}"
    )

    report = {
        "configuration": {
            "architecture": arch.to_dict(),
            "model": AnomalyCLIPConfig().to_dict(),
            "options": options.to_dict(),
            "images": len(dataset),
            "data": dataset.name,
            "encode_batch_size": args.encode_batch_size,
            "deterministic": args.deterministic,
        },
        "machine": machine_info(args.device, args.threads),
        "epochs": {"cached": runs["cached"], "uncached": runs["uncached"]},
        "speedup_first_over_later": speedup,
        "uncached_mean_epoch_seconds": statistics.mean(uncached_seconds),
        "losses_identical": all(identical_losses),
        "max_loss_difference": loss_difference,
        "prompts_identical": identical_prompts,
    }
    print(f"written to {write_results('bench_training', report, args.output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``anomalyclip predict``: score images and write results."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds a model."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--clip-weights",
        metavar="PATH_OR_NAME",
        help="CLIP weights: a file (OpenAI, open_clip, Hugging Face) or a registered name; "
        "default: the backbone the checkpoint names",
    )
    group.add_argument(
        "--checkpoint",
        default="mvtec",
        metavar="NAME_OR_PATH",
        help="prompt checkpoint: 'mvtec', 'visa', a registered name or a file (default: mvtec)",
    )
    group.add_argument("--image-size", type=int, help="input size in pixels (default 518)")
    group.add_argument(
        "--features", type=int, nargs="+", metavar="L", help="1-based visual layers for the map"
    )
    group.add_argument(
        "--dpam-layers", type=int, help="how many final visual layers use DPAM (paper: 19)"
    )
    group.add_argument("--sigma", type=float, help="Gaussian smoothing of the map (paper: 4)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    group.add_argument(
        "--trust-torchscript",
        action="store_true",
        help="load a TorchScript CLIP archive that is not a registered, checksummed file",
    )


def build_model(args: argparse.Namespace):
    from anomalyclip.model import AnomalyCLIP

    overrides = {
        "image_size": args.image_size,
        "features": tuple(args.features) if args.features else None,
        "dpam_layers": args.dpam_layers,
        "sigma": args.sigma,
    }
    return AnomalyCLIP.from_pretrained(
        checkpoint=args.checkpoint,
        clip_weights=args.clip_weights,
        device=args.device,
        trust_torchscript=args.trust_torchscript,
        **overrides,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="score images and write anomaly maps",
        description="Score images (files, folders, globs) with AnomalyCLIP.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    add_model_arguments(parser)
    parser.add_argument("--output", default="predictions.jsonl", help="JSON Lines results file")
    parser.add_argument("--save-maps", metavar="DIR", help="write <stem>.npy maps (model size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anomalyclip.inference import (
        SkippedImage,
        gather_images,
        predict_files,
        save_map,
        write_jsonl,
    )

    paths = gather_images(args.inputs)
    model = build_model(args)
    predictions, skipped = [], []
    for result in predict_files(model, paths, batch_size=args.batch_size):
        if isinstance(result, SkippedImage):
            skipped.append(result)
            continue
        predictions.append(result)
        if args.save_maps:
            save_map(args.save_maps, result)
    write_jsonl(args.output, predictions)
    logger.info("scored %d images, wrote %s", len(predictions), args.output)
    if skipped:
        logger.warning("skipped %d unreadable files:", len(skipped))
        for item in skipped:
            logger.warning("  %s: %s", item.path, item.reason)
    return 0 if predictions else 1

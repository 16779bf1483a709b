"""``anomalyclip watch``: score a folder's images one at a time as they arrive."""

from __future__ import annotations

import argparse
import logging
import sys

from anomalyclip.cli import options
from anomalyclip.cli.options import (
    add_decoding_arguments,
    add_method_arguments,
    add_model_arguments,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="score a folder's images as they arrive, one at a time, for every method",
        description="Score the images already in DIR, then each new one once it is closed "
        "for writing (its size and time unchanged over two polls), into a run folder as "
        "`predict` writes it. Methods whose images score each other (musc, anomalydino "
        "without references) keep a rolling bank of the last --window images judged "
        "normal: the first --window are scored as one set to seed it, each later image "
        "alone against it; an image at or over the image threshold never enters it.",
    )
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("--output-dir", required=True, metavar="OUT", help="the run folder")
    add_model_arguments(parser)
    add_method_arguments(parser)
    add_decoding_arguments(parser)
    parser.add_argument(
        "--window",
        type=int,
        default=32,
        metavar="N",
        help="images in the rolling bank, and in the cold start's set (default 32)",
    )
    parser.add_argument(
        "--once", action="store_true", help="score what is in DIR, then stop (no waiting)"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between looks at DIR; a file is ready when unchanged over two (1.0)",
    )
    parser.add_argument(
        "--threshold",
        "--image-threshold",
        dest="image_threshold",
        type=float,
        metavar="SCORE",
        help="verdict, and the bank's door: an image scoring this or more never enters it "
        "(default: the calibrated one; without one, the seed's leave-one-out edge)",
    )
    parser.add_argument("--pixel-threshold", type=float, metavar="VALUE", help="defect masks")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a watch that was stopped in the same --output-dir: its results and "
        "bank are kept, the files it did not record are scored",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in --output-dir"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anomalyclip.inspection.watch import WatchOptions, watch
    from anomalyclip.methods.assemble import assemble, build_method

    if args.window < 1:
        raise ValueError(f"--window must be at least 1, got {args.window}")
    if args.poll_interval <= 0:
        raise ValueError(f"--poll-interval must be positive, got {args.poll_interval}")
    spec = options.spec_from_args(args)
    # a calibration file's thresholds (and the bank it was calibrated with) apply; else
    # the method as it is, the rolling bank taking the place of references
    model = build_method(spec) if spec.calibration is None else assemble(spec)
    settings = WatchOptions(
        window=args.window,
        once=args.once,
        poll_interval=args.poll_interval,
        image_threshold=args.image_threshold,
        pixel_threshold=args.pixel_threshold,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    summary = watch(args.folder, model, args.output_dir, settings)
    sys.stdout.write(
        f"{len(summary.results)} images scored, {len(summary.skipped)} skipped; "
        f"results: {summary.files.get('jsonl', args.output_dir)}\n"
    )
    return 0 if summary.results else 1

"""``anomalyclip calibrate``: thresholds from example images, saved into a checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

from anomalyclip.cli import options
from anomalyclip.cli.options import (
    add_decoding_arguments,
    add_model_arguments,
    add_scoring_arguments,
)

if TYPE_CHECKING:
    from anomalyclip.methods.anomalyclip.few_shot import ReferenceBank
    from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
    from anomalyclip.predictor import Predictor

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="set the image and pixel thresholds from example images",
        description="Score known-good images (and, optionally, labelled anomalous ones) and "
        "write a checkpoint whose configuration carries the chosen thresholds; predict and "
        "serve then use them. Good images only: the image threshold is a high quantile of "
        "their scores, the pixel threshold a high quantile of their map values. With "
        "anomalous images: the F1-optimal image threshold, and with masks the F1-optimal "
        "pixel threshold. The model options used here (image size, layers, ...) are saved "
        "too, since the thresholds hold only for them.",
    )
    parser.add_argument(
        "good",
        nargs="*",
        metavar="GOOD_IMAGE_OR_DIR",
        help="known-good images: files, folders, globs or CSV lists",
    )
    examples = parser.add_argument_group("labelled examples")
    examples.add_argument(
        "--labels",
        metavar="CSV",
        help="CSV with columns image, label (good/normal/0 or anomalous/bad/defect/1) and "
        "optionally mask; paths relative to the CSV, inside its folder",
    )
    examples.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="read the files --labels names outside its folder (../, absolute paths, links "
        "out), refused by default: for a labels file of your own",
    )
    examples.add_argument(
        "--anomalous",
        nargs="+",
        default=[],
        metavar="IMAGE_OR_DIR",
        help="known-anomalous images: files, folders, globs or CSV lists",
    )
    examples.add_argument(
        "--masks",
        metavar="DIR",
        help="ground-truth masks of the --anomalous images in the MVTec AD layout "
        "(DIR/<defect>/<stem>_mask.png)",
    )
    add_model_arguments(parser)
    add_scoring_arguments(parser)
    add_decoding_arguments(parser)
    parser.add_argument(
        "--bank-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="storage of the reference bank written beside the checkpoint (float16: half "
        "the size; distances are computed in float32 either way)",
    )
    rules = parser.add_argument_group("rules")
    rules.add_argument(
        "--image-quantile",
        type=float,
        default=0.99,
        help="quantile of good scores used without anomalous examples (default 0.99)",
    )
    rules.add_argument(
        "--pixel-quantile",
        type=float,
        default=0.999,
        help="quantile of good map values used without masks (default 0.999)",
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="FILE.pt",
        help="the calibrated checkpoint to write",
    )
    parser.add_argument(
        "--summary", metavar="FILE.json", help="also write the calibration details as JSON"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _examples(
    args: argparse.Namespace, references: bool = False
) -> tuple[list, list, dict[str, Path]]:
    from anomalyclip.calibration import find_mask, read_labels
    from anomalyclip.inputs import gather_images

    good = gather_images(args.good) if args.good else []
    anomalous = gather_images(args.anomalous) if args.anomalous else []
    masks: dict[str, Path] = {}
    if args.masks:
        root = Path(args.masks)
        if not root.is_dir():
            raise FileNotFoundError(f"mask folder {root} not found")
        for image in anomalous:
            mask = find_mask(image, root)
            if mask is None:
                logger.warning("no mask for %s under %s", image, root)
            else:
                masks[str(image)] = mask
    if args.labels:
        labelled_good, labelled_anomalous, labelled_masks = read_labels(
            args.labels, args.allow_outside_paths
        )
        good += labelled_good
        anomalous += labelled_anomalous
        masks.update(labelled_masks)
    if not good and not references:
        raise ValueError(
            "calibrate needs known-good images (arguments, 'good' rows of --labels, or --reference)"
        )
    return good, anomalous, masks


def _source_extra(checkpoint: str | None) -> dict:
    """The extra data of the checkpoint being calibrated, kept in the calibrated one."""
    if checkpoint is None:
        return {}
    from anomalyclip.hub import resolve_checkpoint
    from anomalyclip.methods.anomalyclip.checkpoint import read_checkpoint

    path, _ = resolve_checkpoint(checkpoint)
    return dict(read_checkpoint(path).extra)


def run(args: argparse.Namespace) -> int:
    from anomalyclip.calibration import calibrate
    from anomalyclip.methods.anomalyclip.checkpoint import save_checkpoint
    from anomalyclip.utils.atomic import atomic_write_json

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    import torch

    from anomalyclip.methods.anomalyclip.few_shot import FewShotAnomalyCLIP
    from anomalyclip.methods.assemble import assemble
    from anomalyclip.methods.references import bank_path_for
    from anomalyclip.methods.tiled import TiledPredictor, Tiling

    spec = options.spec_from_args(args)
    untiled = assemble(dataclasses.replace(spec, tile_size=None))
    # calibrate writes AnomalyCLIP's checkpoint: the model, and the bank of its reference
    # mode when it has one (the few-shot model holds both)
    model = cast("AnomalyCLIP", getattr(untiled, "model", untiled))
    bank: ReferenceBank | None = getattr(untiled, "bank", None)
    good, anomalous, masks = _examples(args, references=bank is not None)
    scorer: Predictor = model
    if bank is not None:
        # without other good images, the references are scored against each other
        scorer = FewShotAnomalyCLIP(model, bank, leave_one_out=not good)
        good = good or list(bank.sources)
    if spec.tile_size:
        scorer = TiledPredictor(scorer, Tiling(spec.tile_size, spec.tile_overlap), spec.batch_size)
    result = calibrate(
        scorer,
        good,
        anomalous,
        masks,
        image_quantile=args.image_quantile,
        pixel_quantile=args.pixel_quantile,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    result.apply(model, reference_bank=None if bank is None else bank.digest)
    details = {**result.to_dict(), "calibrated_from": args.checkpoint}
    extra = {**_source_extra(args.checkpoint), "calibration": details}
    if bank is not None:  # first: a checkpoint never names a bank that is not there
        stored = bank.to(torch.float16) if args.bank_dtype == "float16" else bank
        stored.save(bank_path_for(args.output))
    save_checkpoint(args.output, model, extra=extra)
    if args.summary:
        atomic_write_json(args.summary, details)
    logger.info(
        "wrote %s: image threshold %.6g, pixel threshold %.6g",
        args.output,
        result.image_threshold,
        result.pixel_threshold,
    )
    if result.skipped:
        logger.warning("skipped %d unreadable images:", len(result.skipped))
        for item in result.skipped:
            logger.warning("  %s: %s", item.image, item.reason)
    return 0

"""``anomalyclip calibrate``: thresholds from example images, for every method.

AnomalyCLIP's are saved into its checkpoint; a method without a checkpoint (MuSc,
AnomalyDINO) gets a calibration file (:mod:`anomalyclip.methods.calibrated`). With
references and no other good images, the references are split: some form the bank, the
others are scored against it exactly as new parts will be, so the calibration scores
and the scores the thresholds are applied to come from one distribution (a reference
scored against the others, leave-one-out, meets one bank image fewer than a new part
and scores higher: its thresholds let defects pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from anomalyclip.cli import options
from anomalyclip.cli.options import (
    add_decoding_arguments,
    add_method_arguments,
    add_model_arguments,
    add_scoring_arguments,
)

if TYPE_CHECKING:
    from anomalyclip.calibration import Calibration
    from anomalyclip.methods.anomalyclip.few_shot import ReferenceBank
    from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
    from anomalyclip.methods.assemble import PredictorSpec
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
    add_method_arguments(parser)
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
        "--false-alarm-rate",
        type=float,
        metavar="A",
        help="set both thresholds from the good images alone so that a new good part is "
        "flagged (image) or shows a defect pixel (pixel) with probability at most A "
        "(split conformal: needs at least 1/A - 1 good images); reported with a 95%% upper "
        "bound on the rate achieved. Takes precedence over the rules below",
    )
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
        metavar="FILE",
        help="the calibrated checkpoint to write (AnomalyCLIP), or the calibration file "
        "(other methods: JSON, e.g. line3.json; predict --calibration FILE reads it)",
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
    from anomalyclip.calibration import read_labels
    from anomalyclip.inputs import gather_images

    good = gather_images(args.good) if args.good else []
    anomalous = gather_images(args.anomalous) if args.anomalous else []
    masks: dict[str, Path] = {}
    if args.masks:
        masks = _masks(anomalous, Path(args.masks))
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


def _masks(anomalous: list[Path], root: Path) -> dict[str, Path]:
    """The masks of the anomalous images under ``root``; the path expected for those
    without one is said once, and none found at all is an error (masks were asked for)."""
    from anomalyclip.calibration import find_mask

    if not root.is_dir():
        raise FileNotFoundError(f"mask folder {root} not found")
    if not anomalous:
        raise ValueError(f"--masks {root} given without --anomalous images to match them to")
    masks: dict[str, Path] = {}
    missing: list[Path] = []
    for image in anomalous:
        mask = find_mask(image, root)
        if mask is None:
            missing.append(image)
        else:
            masks[str(image)] = mask
    if missing:
        first = missing[0]
        expected = root / first.parent.name / f"{first.stem}_mask.png"
        said = (
            f"no mask found for {len(missing)} of {len(anomalous)} anomalous images under "
            f"{root}: for {first} the mask is expected at {expected} (or "
            f"{root / (first.stem + '_mask.png')})"
        )
        if not masks:
            raise FileNotFoundError(said + "; --masks was given, so none found is an error")
        logger.warning("%s; those images give image scores only", said)
    return masks


def _split_references(spec: PredictorSpec) -> tuple[PredictorSpec, list[Path]]:
    """Without other good images: a seeded half of the references (at least one) stays
    the bank, the rest are the good images scored against it (see module notes)."""
    import random

    from anomalyclip.inputs import gather_images

    references = list(spec.references)
    if len(references) == 1 and Path(references[0]).suffix == ".pt":
        raise ValueError(
            "a saved bank holds no images to calibrate with: give held-out good images too"
        )
    images = gather_images(references)
    if len(images) < 2:
        raise ValueError(
            "calibrating from references alone needs at least 2 (one for the bank, one "
            "scored against it); give held-out good images too"
        )
    order = list(images)
    random.Random(spec.seed).shuffle(order)
    kept = (len(order) + 1) // 2
    bank, held_out = sorted(order[:kept]), sorted(order[kept:])
    logger.info(
        "no good images besides the %d references: %d of them form the bank and %d are "
        "scored against it, as new parts will be (give held-out good images to keep all "
        "references in the bank)",
        len(images),
        len(bank),
        len(held_out),
    )
    return dataclasses.replace(spec, references=tuple(str(p) for p in bank)), held_out


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
    from anomalyclip.methods import method_named
    from anomalyclip.methods.assemble import assemble

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    spec = options.spec_from_args(args)
    method = method_named(spec.method)
    good, anomalous, masks = _examples(args, references=bool(spec.references))
    if spec.references and not good:
        spec, good = _split_references(spec)
    if args.false_alarm_rate is not None:  # too few good images: said before weights load
        import numpy as np

        from anomalyclip.calibration import conformal_threshold

        conformal_threshold(np.zeros(len(good)), args.false_alarm_rate)
    scorer = assemble(spec)
    result = calibrate(
        scorer,
        good,
        anomalous,
        masks,
        image_quantile=args.image_quantile,
        pixel_quantile=args.pixel_quantile,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        false_alarm_rate=args.false_alarm_rate,
    )
    details = {**result.to_dict(), "calibrated_from": args.checkpoint}
    if method.has_checkpoint:
        _write_checkpoint(args, scorer, result, details)
    else:
        _write_calibration_file(args, spec, scorer, result, details)
    if args.summary:
        from anomalyclip.utils.atomic import atomic_write_json

        atomic_write_json(args.summary, details)
    _report(args.output, result)
    return 0


def _write_checkpoint(
    args: argparse.Namespace, scorer: Predictor, result: Calibration, details: dict
) -> None:
    """AnomalyCLIP's checkpoint with the thresholds, and its bank beside it."""
    import torch

    from anomalyclip.methods import method_named
    from anomalyclip.methods.anomalyclip.checkpoint import save_checkpoint
    from anomalyclip.methods.references import bank_path_for

    method = method_named(scorer.method)
    assert method.checkpoint_parts is not None  # a method with a checkpoint names its parts
    parts = method.checkpoint_parts(scorer.layers()[0])
    model: AnomalyCLIP = parts[0]
    bank: ReferenceBank | None = parts[1]
    # the bank as it will be stored (float16 is other content, hence another digest)
    stored = None
    if bank is not None:
        stored = bank.to(torch.float16) if args.bank_dtype == "float16" else bank
    result.apply(model, reference_bank=None if stored is None else stored.digest)
    extra = {**_source_extra(args.checkpoint), "calibration": details}
    if stored is not None:  # first: a checkpoint never names a bank that is not there
        stored.save(bank_path_for(args.output))
    save_checkpoint(args.output, model, extra=extra)


def _write_calibration_file(
    args: argparse.Namespace,
    spec: PredictorSpec,
    scorer: Predictor,
    result: Calibration,
    details: dict,
) -> None:
    """The calibration file of a method without a checkpoint, its bank beside it."""
    from anomalyclip.methods import method_named
    from anomalyclip.methods.calibrated import CalibrationFile, recorded_backbone
    from anomalyclip.methods.references import bank_path_for
    from anomalyclip.utils.hashing import file_digest

    method = method_named(spec.method)
    bank_name = bank_sha256 = None
    if spec.references:
        assert method.save_bank is not None  # a method with references saves its bank
        bank_path = bank_path_for(args.output)
        method.save_bank(scorer.layers()[0], bank_path, args.bank_dtype)
        bank_name, bank_sha256 = bank_path.name, file_digest(bank_path)
    CalibrationFile(
        method=spec.method,
        image_threshold=result.image_threshold,
        pixel_threshold=result.pixel_threshold,
        overrides={k: v for k, v in spec.overrides.items() if v is not None},
        weights=None if spec.weights is None else str(spec.weights),
        backbone_sha256=recorded_backbone(scorer.settings()),
        tile_size=spec.tile_size,
        tile_overlap=spec.tile_overlap,
        bank=bank_name,
        bank_sha256=bank_sha256,
        false_alarm=result.false_alarm,
        details=details,
    ).save(args.output)


def _report(output: str, result: Calibration) -> None:
    from anomalyclip.postprocess import describe_false_alarm

    logger.info(
        "wrote %s: image threshold %.6g, pixel threshold %.6g",
        output,
        result.image_threshold,
        result.pixel_threshold,
    )
    if result.false_alarm is not None:
        logger.info("%s", describe_false_alarm(result.false_alarm))
    if result.skipped:
        logger.warning("skipped %d unreadable images:", len(result.skipped))
        for item in result.skipped:
            logger.warning("  %s: %s", item.image, item.reason)

"""``anomalyclip predict``: score images and write results."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from anomalyclip.cli import options
from anomalyclip.cli.options import (
    add_calibration_argument,
    add_decoding_arguments,
    add_method_arguments,
    add_model_arguments,
    add_scoring_arguments,
)
from anomalyclip.colormaps import COLORMAPS
from anomalyclip.inspection.run_folder import DEFAULT_OVERLAY_SIDE, OVERLAY_FORMATS
from anomalyclip.methods.references import BANK_DTYPES
from anomalyclip.utils.atomic import WriteFailedError
from anomalyclip.utils.hashing import file_digest

if TYPE_CHECKING:
    from anomalyclip.inputs import GatheredInputs
    from anomalyclip.inspection.records import InspectionSummary
    from anomalyclip.methods.assemble import PredictorSpec
    from anomalyclip.predictor import Predictor

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="score images: verdicts, heatmaps, masks and a report",
        description="Score images with AnomalyCLIP. Inputs are image files, folders "
        "(searched recursively), glob patterns or CSV files with a column 'image' (paths "
        "relative to the CSV). Unreadable files are skipped and listed at the end. With "
        "--method musc all the inputs are scored as one set, against each other.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument(
        "--include-annotations",
        action="store_true",
        help="also score images inside annotation folders (ground_truth/, masks/, gt/), "
        "which are skipped by default",
    )
    add_model_arguments(parser)
    add_method_arguments(parser)
    add_scoring_arguments(parser)
    add_calibration_argument(parser)
    add_decoding_arguments(parser)
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write predictions.jsonl, predictions.csv, summary.json, overlays/, masks/, "
        "thumbnails/ and report.html here",
    )
    outputs.add_argument(
        "--output",
        metavar="FILE.jsonl",
        help="JSON Lines results (default: DIR/predictions.jsonl with --output-dir, "
        "else predictions.jsonl)",
    )
    outputs.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse an --output-dir that holds an earlier run's results, removing that "
        "run's files (and only them)",
    )
    outputs.add_argument(
        "--resume",
        action="store_true",
        help="continue a run that was stopped (killed, full disk) in the same --output-dir "
        "or --output: images it scored are not scored again; refused when the model, method "
        "or thresholds differ. MuSc scores a set as a whole: an unfinished set is scored again",
    )
    outputs.add_argument(
        "--save-maps", metavar="DIR", help="write <name>.npy float32 maps at model resolution"
    )
    _add_bank_arguments(outputs)
    outputs.add_argument(
        "--overlay-format",
        choices=OVERLAY_FORMATS,
        default="auto",
        help="overlays as PNG (exact) or JPEG (about ten times smaller on photographs); "
        "auto (default): JPEG for originals over 4 megapixels, else PNG",
    )
    outputs.add_argument(
        "--overlay-max-side",
        type=int,
        metavar="PIXELS",
        default=DEFAULT_OVERLAY_SIDE,
        help=f"scale overlays down to at most this side (default {DEFAULT_OVERLAY_SIDE}; 0: "
        "full size; masks stay at full resolution)",
    )
    thresholds = parser.add_argument_group("thresholds")
    thresholds.add_argument(
        "--threshold",
        "--image-threshold",
        dest="image_threshold",
        type=float,
        metavar="SCORE",
        help="verdict: anomalous when score >= this (default: the checkpoint's calibrated "
        "threshold; without one, no verdicts)",
    )
    thresholds.add_argument(
        "--pixel-threshold",
        type=float,
        metavar="VALUE",
        help="defect mask: map >= this (default: the calibrated one; without either no masks "
        "are written)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="score with a model from `anomalyclip export` in ONNX Runtime "
        "(the model options above are then ignored)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap weight in overlays")
    parser.add_argument("--colormap", default="jet", choices=COLORMAPS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _add_bank_arguments(outputs: argparse._ArgumentGroup) -> None:
    outputs.add_argument(
        "--save-bank",
        metavar="FILE.pt",
        help="write the reference bank this run scores with (needs --reference images), "
        "to pass as --reference FILE.pt later instead of encoding the images again",
    )
    outputs.add_argument(
        "--bank-dtype",
        choices=BANK_DTYPES,
        default="float32",
        help="storage of --save-bank (float16: half the size; distances are computed in "
        "float32 either way)",
    )


def run(args: argparse.Namespace) -> int:
    from anomalyclip.inputs import gather_inputs

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    from anomalyclip.methods.assemble import assemble

    spec = options.spec_from_args(args)  # options checked before any file is read
    # the run's own folders are never its input (a resumed run inside its input folder)
    own = [args.output_dir, args.save_maps]
    inputs = gather_inputs(args.inputs, args.include_annotations, exclude=own)
    _check_before_loading(args, spec, inputs.images)
    model = assemble(spec)
    if args.save_bank:
        from anomalyclip.methods import save_bank

        save_bank(model, Path(args.save_bank), args.bank_dtype)
    output = args.output
    if output is None and args.output_dir is None:
        output = "predictions.jsonl"
    try:
        summary = _inspect(args, inputs, model, output)
    except WriteFailedError as error:
        remedy = "make room and run" if error.disk_full else "run"
        raise WriteFailedError(
            error.filename,
            f"{error.reason}; the images finished so far are kept: {remedy} again with --resume",
            error.errno,
        ) from None
    sys.stdout.write(summary_text(summary) + "\n")
    return 0 if summary.results else 1


def _check_before_loading(args: argparse.Namespace, spec: PredictorSpec, paths: list[Path]) -> None:
    """Refusals known from the arguments alone, before minutes of loading weights: a set
    method given one image, an output folder holding another run."""
    from anomalyclip.inspection.run_folder import check_output_dir
    from anomalyclip.methods import method_named

    if method_named(spec.method).scores_sets and not spec.references and len(paths) < 2:
        raise ValueError(
            f"--method {spec.method} scores the images given against each other; "
            f"{len(paths)} image has nothing to be compared with: give at least 2, or "
            "--reference with known-good images"
        )
    if args.output_dir is not None:
        check_output_dir(Path(args.output_dir), args.overwrite, args.resume)


def _inspect(
    args: argparse.Namespace, inputs: GatheredInputs, model: Predictor, output: str | None
) -> InspectionSummary:
    from anomalyclip.inspection.run import inspect

    return inspect(
        inputs.images,
        model,
        args.output_dir,
        image_threshold=args.image_threshold,
        pixel_threshold=args.pixel_threshold,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        jsonl_path=output,
        maps_dir=args.save_maps,
        keep_maps=False,
        alpha=args.alpha,
        colormap=args.colormap,
        overwrite=args.overwrite,
        overlay_format=args.overlay_format,
        overlay_max_side=args.overlay_max_side or None,
        columns=inputs.columns,
        resume=args.resume,
        identity=model_identity(args),
    )


def model_identity(args: argparse.Namespace) -> dict[str, str]:
    """The model files' checksums (a registered name stands for itself): a checkpoint
    trained again keeps its settings, and must not be taken for the one a run was made with."""
    files = {"checkpoint": getattr(args, "checkpoint", None), "onnx": getattr(args, "onnx", None)}
    return {
        kind: file_digest(value)[:16] if Path(value).is_file() else str(value)
        for kind, value in files.items()
        if value
    }


TOP_SHOWN = 5


def summary_text(summary: InspectionSummary) -> str:
    """What a person reads first: counts, what was flagged, the highest scores, the report."""
    lines = [f"{len(summary.results)} images scored, {len(summary.skipped)} skipped"]
    if summary.image_threshold is not None:
        lines[0] += (
            f", {len(summary.anomalous)} anomalous at threshold {summary.image_threshold:.4g} "
            f"({summary.image_threshold_source})"
        )
    else:
        lines[0] += " (no image threshold: scores only; calibrate or pass --threshold)"
    if summary.resumed:
        lines.append(f"{summary.resumed} of them scored by the run this one resumed")
    ranked = sorted(summary.results, key=lambda r: r.score, reverse=True)[:TOP_SHOWN]
    if ranked:
        lines.append("highest scores:")
        lines += [
            f"  {r.score:.4f}{'  anomalous' if r.anomalous else ''}  {r.image}" for r in ranked
        ]
    if "report" in summary.files:
        lines.append(f"report: {summary.files['report']}")
    elif "jsonl" in summary.files:
        lines.append(f"results: {summary.files['jsonl']}")
    return "\n".join(lines)

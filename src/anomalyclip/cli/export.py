"""``anomalyclip export``: the image path as an ONNX model for ONNX Runtime."""

from __future__ import annotations

import argparse
import logging

from anomalyclip.cli.options import add_model_arguments, build_model

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write the model as ONNX (images -> scores and maps)",
        description="Export the image path (preprocessed images -> image scores and "
        "smoothed anomaly maps at model resolution) as ONNX, the text features baked in. "
        "The file carries the configuration; score with `anomalyclip predict --onnx FILE` "
        "or anomalyclip.methods.anomalyclip.onnx.OnnxAnomalyModel. The batch size stays free, the "
        "image size "
        "is fixed at export.",
    )
    add_model_arguments(parser)
    parser.add_argument("--output", "-o", required=True, metavar="FILE.onnx")
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: ONNX Runtime dynamic quantisation of the linear layers (faster on "
        "CPUs, about 4x smaller; small deviation, see benchmarks/)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip scoring one random input with both PyTorch and ONNX Runtime",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anomalyclip.methods.anomalyclip.onnx import (
        OnnxAnomalyModel,
        compare_with_torch,
        export_onnx,
    )

    model = build_model(args)
    path = export_onnx(model, args.output, quantize=args.quantize, opset=args.opset)
    if not args.no_check:
        deviation = compare_with_torch(model, OnnxAnomalyModel(path))
        logger.info(
            "ONNX Runtime vs PyTorch on a random input: max |score difference| %.2g, "
            "max |map difference| %.2g, map correlation %.6f",
            deviation["max_abs_score_difference"],
            deviation["max_abs_map_difference"],
            deviation["map_correlation"],
        )
    return 0

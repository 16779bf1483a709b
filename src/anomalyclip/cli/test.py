"""``anomalyclip test``: zero-shot evaluation on benchmark datasets, the paper's tables."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from anomalyclip.cli.options import (
    DatasetSpec,
    add_cache_argument,
    add_data_arguments,
    add_decoding_arguments,
    add_method_arguments,
    add_model_arguments,
    add_progress_argument,
    add_scoring_arguments,
    build_predictor,
    open_spec,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "test",
        help="evaluate on benchmark datasets: per-class metrics tables",
        description="Evaluate zero-shot on one or more datasets. For each, a per-class "
        "table with its mean (image AUROC, AP, F1-max; pixel AUROC, AUPRO, AP, F1-max "
        "where masks exist) is printed as Markdown and written to "
        "OUTPUT_DIR/<dataset>/results.{md,csv,json}; OUTPUT_DIR/summary.{md,csv,json} "
        "holds one row per dataset. Beside it: scores.csv (every image's score and map "
        "maximum), breakdown.{md,csv} (a row per defect type and one pooled over classes) "
        "and, when the model has an image threshold, threshold.{md,csv} (false alarms and "
        "escapes). Unreadable images or masks are skipped with a warning and listed in "
        "results.md/json; the metrics are those of the rest. Under torchrun (torchrun "
        "--nproc_per_node N -m anomalyclip test ...) the processes share the images; "
        "rank 0 writes the identical tables. With --method musc each class is scored as "
        "one set (its images score each other), as the MuSc paper evaluates.",
    )
    add_data_arguments(parser, many=True)
    parser.add_argument("--output-dir", "-o", default="results", metavar="DIR")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--save-maps",
        action="store_true",
        help="also write every map (maps/<class>/<defect>/<stem>.npy, model resolution) "
        "and an overlay on the image (overlays/...png) under OUTPUT_DIR/<dataset>/",
    )
    parser.add_argument(
        "--aupro",
        choices=("original", "exact"),
        default="original",
        help="AUPRO as the original evaluation computes it (200 thresholds; default, "
        "comparable with the paper) or threshold-free",
    )
    add_model_arguments(parser, checkpoint=None, ablations=True)
    add_method_arguments(parser)
    add_scoring_arguments(parser)
    add_decoding_arguments(parser)
    add_cache_argument(parser)
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anomalyclip import distributed

    with distributed.process_group(args.device) as device:
        distributed.configure_logging()
        return evaluate_on(argparse.Namespace(**{**vars(args), "device": str(device)}))


def evaluate_on(args: argparse.Namespace) -> int:
    """The evaluation of one process (of several under torchrun); rank 0 writes."""
    from anomalyclip import distributed
    from anomalyclip.evaluation.evaluate import evaluate, summary_table, write_summary
    from anomalyclip.methods import path_scorer

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    specs = [DatasetSpec.parse(text) for text in args.data]
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"several datasets would be written to the same folder ({', '.join(duplicates)}); "
            "evaluate them in separate runs with different --output-dir"
        )
    datasets = [open_spec(spec, args) for spec in specs]
    with distributed.main_process_first():  # one download of registered weights
        model = build_predictor(args)
    # the method's own engine for files (AnomalyCLIP: its embedding cache), if it has one
    limit = getattr(args, "cache_memory_gb", None)
    scorer = path_scorer(
        model,
        Path(args.cache_dir) if getattr(args, "cache_dir", None) else None,
        None if limit is None else int(limit * 2**30),
    )
    output_dir = Path(args.output_dir)
    results = []
    for spec, dataset in zip(specs, datasets, strict=True):
        directory = output_dir / spec.name
        result = evaluate(
            model,
            dataset,
            batch_size=args.batch_size,
            scorer=scorer,
            aupro_method=args.aupro,
            maps_dir=directory if args.save_maps else None,
            name=spec.name,
            progress=not args.no_progress,
        )
        results.append(result)
        if distributed.is_main_process():
            paths = result.write(directory)
            sys.stdout.write(result.to_markdown() + "\n\n")
            logger.info(
                "%s: tables in %s (scores.csv, breakdown.md%s)",
                spec.name,
                paths["markdown"].parent,
                ", threshold.md" if "threshold_markdown" in paths else "",
            )
    if distributed.is_main_process():
        write_summary(results, output_dir)
        if len(results) > 1:
            sys.stdout.write(summary_table(results) + "\n")
    return 0

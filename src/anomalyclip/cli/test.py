"""``anomalyclip test``: zero-shot evaluation on benchmark datasets, the paper's tables."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalyclip.cli.train import (
    MODEL_OPTIONS,
    DatasetSpec,
    add_ablation_arguments,
    add_data_arguments,
    add_runtime_arguments,
    backbone_identity,
    config_overrides,
    make_cache,
    open_spec,
    resolve_features,
)

if TYPE_CHECKING:
    from anomalyclip.checkpoint import PromptCheckpoint
    from anomalyclip.model import AnomalyCLIP

logger = logging.getLogger(__name__)

NO_CHECKPOINT = "none"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "test",
        help="evaluate on benchmark datasets: per-class metrics tables",
        description="Evaluate zero-shot on one or more datasets. For each, a per-class "
        "table with its mean (image AUROC, AP, F1-max; pixel AUROC, AUPRO, AP, F1-max "
        "where masks exist) is printed as Markdown and written to "
        "OUTPUT_DIR/<dataset>/results.{md,csv,json}; OUTPUT_DIR/summary.{md,csv,json} "
        "holds one row per dataset. Under torchrun (torchrun --nproc_per_node N -m "
        "anomalyclip test ...) the processes share the images; rank 0 writes the "
        "identical tables.",
    )
    add_data_arguments(parser, many=True)
    parser.add_argument(
        "--checkpoint",
        default=None,
        metavar="NAME_OR_PATH",
        help="prompt checkpoint: 'mvtec', 'visa', a file, or 'none' (hand-written "
        "baselines, untrained prompts); default: mvtec, or none with a baseline preset",
    )
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
    add_ablation_arguments(parser, training=False)
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def build_model(args: argparse.Namespace) -> AnomalyCLIP:
    """The model a test run evaluates: checkpoint, then preset, then explicit options."""
    from anomalyclip.baselines import LAST_LAYER, get_preset
    from anomalyclip.checkpoint import load_model, read_checkpoint

    preset = get_preset(args.preset) if args.preset else None
    overrides = dict(preset.config) if preset else {}
    overrides.update(config_overrides(args, (*MODEL_OPTIONS, "text_prompts")))
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = NO_CHECKPOINT if preset is not None and not preset.trained else "mvtec"
    if checkpoint.lower() == NO_CHECKPOINT:
        return build_on_backbone(None, args, overrides)
    if Path(checkpoint).expanduser().is_file():
        return build_on_backbone(read_checkpoint(Path(checkpoint).expanduser()), args, overrides)
    last_layer_only = overrides.get("features") == LAST_LAYER
    if last_layer_only:
        del overrides["features"]
    model = load_model(
        checkpoint,
        clip_weights=args.clip_weights,
        device=args.device,
        trust_torchscript=args.trust_torchscript,
        **overrides,
    )
    if last_layer_only:
        model.config = model.config.replace(features=(model.clip.visual.num_layers,))
    return model.eval()


def build_on_backbone(
    checkpoint: PromptCheckpoint | None, args: argparse.Namespace, overrides: dict[str, Any]
) -> AnomalyCLIP:
    """The prompts of a checkpoint file (its configuration, or the paper's for the
    authors' layout), or untrained/hand-written ones, on the backbone the configuration
    names or ``--clip-weights``."""
    import torch

    from anomalyclip.backbone.loading import load_clip
    from anomalyclip.checkpoint import apply_prompt_state, config_for
    from anomalyclip.config import AnomalyCLIPConfig
    from anomalyclip.model import AnomalyCLIP

    config = AnomalyCLIPConfig()
    if checkpoint is not None:
        config = config_for(checkpoint, config)
    if args.clip_weights:
        config = config.replace(backbone=str(args.clip_weights))
    clip = load_clip(config.backbone, trust_torchscript=args.trust_torchscript)
    config = config.replace(**resolve_features(overrides, clip.visual.num_layers))
    torch.manual_seed(0)  # untrained prompts are the same in every run
    model = AnomalyCLIP(clip, config)
    if checkpoint is not None:
        apply_prompt_state(model, checkpoint)
    elif config.text_prompts == "learned":
        logger.warning("no prompt checkpoint: evaluating untrained prompts")
    return model.to(torch.device(args.device)).eval()


def run(args: argparse.Namespace) -> int:
    from anomalyclip import distributed

    with distributed.process_group(args.device) as device:
        distributed.configure_logging()
        return evaluate_on(argparse.Namespace(**{**vars(args), "device": str(device)}))


def evaluate_on(args: argparse.Namespace) -> int:
    """The evaluation of one process (of several under torchrun); rank 0 writes."""
    from anomalyclip import distributed
    from anomalyclip.evaluation import evaluate, summary_table, write_summary

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
        model = build_model(args)
    weights = backbone_identity(args.clip_weights) if args.clip_weights and args.cache_dir else None
    cache = make_cache(model, args, memory=False, weights=weights)
    output_dir = Path(args.output_dir)
    results = []
    for spec, dataset in zip(specs, datasets, strict=True):
        directory = output_dir / spec.name
        result = evaluate(
            model,
            dataset,
            batch_size=args.batch_size,
            cache=cache,
            aupro_method=args.aupro,
            maps_dir=directory if args.save_maps else None,
            name=spec.name,
            progress=not args.no_progress,
        )
        results.append(result)
        if distributed.is_main_process():
            paths = result.write(directory)
            sys.stdout.write(result.to_markdown() + "\n\n")
            logger.info("%s: tables in %s", spec.name, paths["markdown"].parent)
    if distributed.is_main_process():
        write_summary(results, output_dir)
        if len(results) > 1:
            sys.stdout.write(summary_table(results) + "\n")
    return 0

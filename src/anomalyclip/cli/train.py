"""``anomalyclip train``: learn the prompts on an auxiliary dataset (the paper's step one)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from anomalyclip.cli.options import (
    DatasetSpec,
    add_cache_argument,
    add_data_arguments,
    add_model_arguments,
    add_progress_argument,
    build_model,
    make_cache,
    open_spec,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="learn AnomalyCLIP's prompts on an auxiliary dataset",
        description="Train the object-agnostic prompts on a dataset with the paper's "
        "settings (Adam lr 1e-3, betas 0.5/0.999, batch 8, 15 epochs, 518 px, seed 111, "
        "lambda 4). Writes epoch_<n>.pt checkpoints, train_log.csv and train_log.json to "
        "the output folder. Images without masks are trained with the global loss only. "
        "Under torchrun (torchrun --nproc_per_node N -m anomalyclip train ...) the "
        "processes share the work and give the single-process result.",
    )
    add_data_arguments(parser, many=False)
    parser.add_argument("--output-dir", "-o", required=True, metavar="DIR")
    parser.add_argument("--resume", action="store_true", help="continue from the last epoch")
    optimisation = parser.add_argument_group("optimisation (defaults: the paper's)")
    optimisation.add_argument("--epochs", type=int, default=15)
    optimisation.add_argument("--batch-size", type=int, default=8)
    optimisation.add_argument("--lr", type=float, default=1e-3)
    optimisation.add_argument(
        "--betas", type=float, nargs=2, default=(0.5, 0.999), metavar=("B1", "B2")
    )
    optimisation.add_argument("--lam", type=float, default=4.0, help="weight of the local loss")
    optimisation.add_argument("--seed", type=int, default=111)
    optimisation.add_argument(
        "--loss",
        choices=("glocal", "global", "local"),
        help="glocal (paper), global (image) only or local (pixel) only",
    )
    add_model_arguments(parser, with_checkpoint=False, ablations=True, training=True)
    add_cache_argument(parser)
    add_progress_argument(parser)
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic CUDA kernels, so GPU runs (and resumes) repeat bit for bit; "
        "CPU runs always do",
    )
    caching = parser.add_argument_group("feature cache")
    caching.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the image embeddings every epoch instead of keeping them in memory",
    )
    caching.add_argument(
        "--cache-memory-gb",
        type=float,
        default=4.0,
        help="in-memory embedding cache limit (default 4; ViT-L at 518 px needs ~17 MB "
        "per image: use --cache-dir for large datasets)",
    )
    caching.add_argument(
        "--encode-batch-size",
        type=int,
        default=1,
        help="images encoded together; 1 (default) keeps runs bit-identical whatever the "
        "caching, more is faster on a GPU",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anomalyclip import distributed

    if args.deterministic:
        from anomalyclip.methods.anomalyclip.training import make_deterministic

        make_deterministic()
    with distributed.process_group(args.device) as device:
        distributed.configure_logging()
        return train_on(args, device)


def train_on(args: argparse.Namespace, device: torch.device) -> int:
    """The training run of one process (of several under torchrun) on ``device``."""
    from anomalyclip import distributed
    from anomalyclip.methods.anomalyclip.presets import get_preset
    from anomalyclip.methods.anomalyclip.training import TrainOptions, train

    preset = get_preset(args.preset) if args.preset else None
    if preset is not None and not preset.trained:
        raise ValueError(
            f"preset {preset.name!r} is a hand-written baseline with nothing to train; "
            f"evaluate it with: anomalyclip test --preset {preset.name} ..."
        )
    options = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        betas=tuple(args.betas),
        lam=args.lam,
        seed=args.seed,
        loss=args.loss or (preset.loss if preset else "glocal"),
    )
    dataset = open_spec(DatasetSpec.parse(args.data), args)
    with distributed.main_process_first():  # one download of registered weights
        model = build_model(args, seed=options.seed).to(device)
    result = train(
        model,
        dataset,
        args.output_dir,
        options,
        resume=args.resume,
        cache=make_cache(model, args, memory=not args.no_cache),
        encode_batch_size=args.encode_batch_size,
        progress=not args.no_progress,
    )
    if result.checkpoint is not None:
        logger.info("prompts: %s", result.checkpoint)
    return 0

"""``anomalyclip train``: learn the prompts on an auxiliary dataset (the paper's step one).

Also holds what ``anomalyclip test`` shares with it: dataset arguments (``[KIND=]PATH``)
and the model options behind the paper's ablations.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from anomalyclip.data.core import AnomalyDataset
    from anomalyclip.feature_cache import FeatureCache
    from anomalyclip.model import AnomalyCLIP

logger = logging.getLogger(__name__)

# AnomalyCLIPConfig fields both commands set from options of the same name.
MODEL_OPTIONS = (
    "image_size",
    "features",
    "dpam_layers",
    "dpam_mode",
    "global_head",
    "prompt_mode",
    "sigma",
    "n_ctx",
    "prompt_depth",
    "deep_prompt_length",
)


@dataclass(frozen=True)
class DatasetSpec:
    """``[KIND=]PATH`` from the command line; the kind is recognised when not given."""

    path: Path
    kind: str | None

    @property
    def name(self) -> str:
        """What results are filed under: the folder's name (a file's stem)."""
        resolved = self.path.resolve()
        return resolved.stem if resolved.is_file() else resolved.name

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        kind, separator, path = text.partition("=")
        if separator and kind and "/" not in kind and "\\" not in kind:
            return cls(Path(path), kind)
        return cls(Path(text), None)


def open_spec(spec: DatasetSpec, args: argparse.Namespace) -> AnomalyDataset:
    from anomalyclip.data import open_dataset

    options: dict[str, Any] = {}
    if args.categories:
        options["categories"] = args.categories
    if args.allow_missing_masks:
        options["allow_missing_masks"] = True
    dataset = open_dataset(spec.path, spec.kind, split=args.split, **options)
    logger.info("%s: %s", spec.path, dataset.summary())
    return dataset


def add_data_arguments(parser: argparse.ArgumentParser, many: bool) -> None:
    from anomalyclip.data import READERS

    parser.add_argument(
        "data",
        nargs="+" if many else None,
        metavar="[KIND=]PATH",
        help=f"dataset folder or file, optionally with its kind ({', '.join(READERS)}); "
        "the layout is recognised when no kind is given",
    )
    group = parser.add_argument_group("data")
    group.add_argument("--split", default="test", help="split to use (default: test, as the paper)")
    group.add_argument("--categories", nargs="+", metavar="NAME", help="only these classes")
    group.add_argument(
        "--allow-missing-masks",
        action="store_true",
        help="keep anomalous images without a mask (image-level only)",
    )


def add_ablation_arguments(parser: argparse.ArgumentParser, training: bool) -> None:
    """The configuration knobs of the paper's ablations (defaults: the paper's)."""
    from anomalyclip.baselines import PRESETS

    group = parser.add_argument_group("method and ablations (defaults: the paper's)")
    group.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a row of the paper's comparison/ablation tables: "
        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
    )
    group.add_argument("--image-size", type=int, help="input size in pixels (paper: 518)")
    group.add_argument(
        "--features", type=int, nargs="+", metavar="L", help="1-based layers (paper: 6 12 18 24)"
    )
    group.add_argument(
        "--dpam-layers", type=int, help="final layers with DPAM; 0 disables it (paper: 19)"
    )
    group.add_argument("--dpam-mode", choices=("vv", "qq", "kk"), help="DPAM attention (vv)")
    group.add_argument(
        "--global-head",
        choices=("original", "clip"),
        help="image embedding: the original's class token without ln_post, or CLIP's head",
    )
    group.add_argument(
        "--prompt-mode",
        choices=("agnostic", "aware"),
        help="object-agnostic prompts ('object') or object-aware (the class name)",
    )
    group.add_argument("--sigma", type=float, help="Gaussian smoothing of the map (paper: 4)")
    group.add_argument("--n-ctx", type=int, help="learnable context tokens (paper: 12)")
    group.add_argument(
        "--prompt-depth",
        type=int,
        help="text layers reached by prompts; 1 = no deep prompts (paper: 9)",
    )
    group.add_argument("--deep-prompt-length", type=int, help="tokens per deep prompt (paper: 4)")
    if not training:
        group.add_argument(
            "--text-prompts",
            choices=("learned", "plain", "winclip"),
            help="learned prompts or a hand-written baseline",
        )


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--clip-weights",
        metavar="PATH_OR_NAME",
        help="CLIP weights: a file or folder (OpenAI, open_clip, Hugging Face) or a "
        "registered name",
    )
    group.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu or cuda; under torchrun, cuda means each process's "
        "GPU (its LOCAL_RANK)",
    )
    group.add_argument(
        "--trust-torchscript",
        action="store_true",
        help="load a TorchScript CLIP archive that is not a registered, checksummed file",
    )
    group.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep image embeddings on disk here, reused by later runs with the same "
        "backbone, size, layers and images",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_overrides(args: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    """The configuration fields given on the command line (options named as the fields)."""
    values = {}
    for name in fields:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    return values


def resolve_features(overrides: dict[str, Any], visual_layers: int) -> dict[str, Any]:
    from anomalyclip.baselines import LAST_LAYER

    if overrides.get("features") == LAST_LAYER:
        return {**overrides, "features": (visual_layers,)}
    return overrides


def backbone_identity(clip_weights: str) -> str | None:
    """SHA-256 of the weights file, recorded in checkpoints and keying the feature cache."""
    from anomalyclip.backbone.loading import file_sha256

    path = Path(clip_weights).expanduser()
    return file_sha256(path) if path.is_file() else None


def make_cache(
    model: AnomalyCLIP, args: argparse.Namespace, memory: bool, weights: str | None
) -> FeatureCache:
    from anomalyclip.feature_cache import DEFAULT_MEMORY_LIMIT, FeatureCache

    limit = getattr(args, "cache_memory_gb", None)
    return FeatureCache(
        model,
        args.cache_dir,
        memory=memory,
        memory_limit=int(limit * 2**30) if limit is not None else DEFAULT_MEMORY_LIMIT,
        weights=weights,
    )


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
    add_ablation_arguments(parser, training=True)
    add_runtime_arguments(parser)
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
        from anomalyclip.training import make_deterministic

        make_deterministic()
    with distributed.process_group(args.device) as device:
        distributed.configure_logging()
        return train_on(args, device)


def train_on(args: argparse.Namespace, device: torch.device) -> int:
    """The training run of one process (of several under torchrun) on ``device``."""
    from anomalyclip import distributed
    from anomalyclip.backbone.loading import load_clip
    from anomalyclip.baselines import get_preset
    from anomalyclip.config import AnomalyCLIPConfig
    from anomalyclip.training import TrainOptions, new_model, train

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
    base = AnomalyCLIPConfig()
    clip_weights = args.clip_weights or base.backbone
    with distributed.main_process_first():  # one download of registered weights
        clip = load_clip(clip_weights, trust_torchscript=args.trust_torchscript)
    overrides = dict(preset.config) if preset else {}
    overrides.update(config_overrides(args, MODEL_OPTIONS))
    overrides = resolve_features(overrides, clip.visual.num_layers)
    config = base.replace(backbone=str(clip_weights), **overrides)
    model = new_model(clip, config, options.seed).to(device)
    sha256 = backbone_identity(clip_weights)
    result = train(
        model,
        dataset,
        args.output_dir,
        options,
        resume=args.resume,
        cache=make_cache(model, args, memory=not args.no_cache, weights=sha256),
        encode_batch_size=args.encode_batch_size,
        backbone_sha256=sha256,
        progress=not args.no_progress,
    )
    if result.checkpoint is not None:
        logger.info("prompts: %s", result.checkpoint)
    return 0

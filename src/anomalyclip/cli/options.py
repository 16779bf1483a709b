"""Options every command shares, and the one place they become a model.

``predict``, ``calibrate``, ``export``, ``serve``, ``test`` and ``train`` all take the
same model options (weights, checkpoint, configuration overrides, device); ``test`` and
``train`` add the ablation knobs and the dataset arguments. :func:`build_model` hands
them to :func:`anomalyclip.methods.anomalyclip.model.create_model`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalyclip.methods.anomalyclip.config import (
    DPAM_MODES,
    GLOBAL_HEADS,
    PROMPT_MODES,
    TEXT_PROMPTS,
)

if TYPE_CHECKING:
    from anomalyclip.data.core import AnomalyDataset
    from anomalyclip.methods.anomalyclip.embedding_cache import FeatureCache
    from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
    from anomalyclip.methods.assemble import PredictorSpec
    from anomalyclip.predictor import Predictor

logger = logging.getLogger(__name__)

# Configuration fields set from options of the same name.
BASIC_OPTIONS = ("image_size", "features", "dpam_layers", "sigma")
ABLATION_OPTIONS = (
    "dpam_mode",
    "global_head",
    "prompt_mode",
    "n_ctx",
    "prompt_depth",
    "deep_prompt_length",
    "text_prompts",
)


# What --checkpoint says when not given, for the commands that score with a checkpoint.
CHECKPOINT_DEFAULT = "mvtec"


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    checkpoint: str | None = CHECKPOINT_DEFAULT,
    with_checkpoint: bool = True,
    ablations: bool = False,
    training: bool = False,
) -> None:
    """The model options; ``ablations`` adds the knobs of the paper's tables."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--clip-weights",
        "--backbone",
        dest="clip_weights",
        metavar="PATH_OR_NAME",
        help="the backbone: CLIP weights (OpenAI, open_clip, Hugging Face) or, for musc "
        "and anomalydino, DINOv2 weights (official, timm, Hugging Face), as a file, a "
        "folder or a registered name; default: the backbone the checkpoint records, or "
        "the method's own",
    )
    if with_checkpoint:
        default = (
            f"default: {checkpoint}"
            if checkpoint
            else "default: mvtec, or none with a baseline preset"
        )
        group.add_argument(
            "--checkpoint",
            default=checkpoint,
            metavar="NAME_OR_PATH",
            help=f"prompt checkpoint: 'mvtec', 'visa', a registered name, a file, or 'none' "
            f"(untrained or hand-written prompts); {default}",
        )
    group.add_argument("--image-size", type=int, help="input size in pixels (paper: 518)")
    group.add_argument(
        "--features", type=int, nargs="+", metavar="L", help="1-based visual layers for the map"
    )
    group.add_argument(
        "--dpam-layers", type=int, help="final visual layers with DPAM; 0 disables it (paper: 19)"
    )
    group.add_argument("--sigma", type=float, help="Gaussian smoothing of the map (paper: 4)")
    group.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu or cuda; under torchrun, cuda means each process's "
        "GPU (its LOCAL_RANK)",
    )
    group.add_argument(
        "--trust-torchscript",
        action="store_true",
        help="deprecated, no effect: TorchScript archives are read as data (their tensors, "
        "never their code), so none needs trusting",
    )
    if training:
        group.add_argument(
            "--init",
            metavar="NAME_OR_PATH",
            help="start from these prompts ('mvtec', 'visa', a registered name or a "
            "checkpoint file) instead of fresh ones: fine-tuning on your own images",
        )
    if ablations:
        _add_ablation_arguments(parser, training)


def _add_ablation_arguments(parser: argparse.ArgumentParser, training: bool) -> None:
    from anomalyclip.methods.anomalyclip.presets import PRESETS

    group = parser.add_argument_group("method and ablations (defaults: the paper's)")
    group.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a row of the paper's comparison/ablation tables: "
        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
    )
    group.add_argument("--dpam-mode", choices=DPAM_MODES, help="DPAM attention (vv)")
    group.add_argument(
        "--global-head",
        choices=GLOBAL_HEADS,
        help="image embedding: the original's class token without ln_post, or CLIP's head",
    )
    group.add_argument(
        "--prompt-mode",
        choices=PROMPT_MODES,
        help="object-agnostic prompts ('object') or object-aware (the class name)",
    )
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
            choices=TEXT_PROMPTS,
            help="learned prompts or a hand-written baseline",
        )


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration fields given on the command line."""
    values = {}
    for name in (*BASIC_OPTIONS, *ABLATION_OPTIONS):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    return values


def build_model(args: argparse.Namespace, seed: int = 0) -> AnomalyCLIP:
    """AnomalyCLIP itself, for the commands that need the model rather than a scorer:
    ``train`` (fresh prompts unless ``--init`` names some) and ``export`` (which refuses
    a checkpoint calibrated with references: ONNX has no reference mode)."""
    from anomalyclip.methods.anomalyclip.factory import NO_CHECKPOINT
    from anomalyclip.methods.anomalyclip.model import create_model
    from anomalyclip.methods.anomalyclip.presets import get_preset

    preset = get_preset(args.preset) if getattr(args, "preset", None) else None
    training = hasattr(args, "init")
    return create_model(
        (args.init or NO_CHECKPOINT) if training else _checkpoint(args),
        clip_weights=args.clip_weights,
        preset=preset,
        overrides=model_overrides(args),
        device=args.device,
        seed=seed,
    )


DEFAULT_METHOD = "anomalyclip"
# Options that only AnomalyCLIP reads: given with another method, they are refused, not
# silently ignored.
ANOMALYCLIP_ONLY = ("dpam_layers", "sigma", "preset", *ABLATION_OPTIONS)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """``--method`` and the settings of the methods registered beside AnomalyCLIP."""
    from anomalyclip.methods import METHODS

    parser.add_argument(
        "--method",
        choices=list(METHODS),
        default=DEFAULT_METHOD,
        help="scoring method: anomalyclip (learned prompts, image by image), musc (no "
        "prompts, no training: the images given score each other, as one set; default "
        "backbone ViT-L/14@336px at 518 px, layers 6 12 18 24; a DINOv2 file as --backbone "
        "gives MuSc on DINOv2) or anomalydino (nearest DINOv2 patches of the --reference "
        "images, 448 px; without references the images score each other, 672 px); "
        "default: anomalyclip",
    )
    group = parser.add_argument_group(
        "MuSc (--method musc; defaults: the official configs/musc.yaml; --image-size, "
        "--features and --clip-weights above apply too)"
    )
    group.add_argument(
        "--musc-degrees", type=int, nargs="+", metavar="R", help="LNAMD degrees (1 3 5)"
    )
    group.add_argument(
        "--rscin-k",
        type=int,
        nargs="+",
        metavar="K",
        help="RsCIN neighbour counts (1 2 3; the authors use 1 8 9 on VisA); 0 disables RsCIN",
    )
    group.add_argument(
        "--musc-divide-num",
        type=int,
        metavar="N",
        help="score N random disjoint subsets separately (seeded; bounds the work of very "
        "large sets); default 1",
    )
    group.add_argument(
        "--musc-coverage",
        choices=("auto", "center-crop", "whole"),
        help="what of each image is scored: the paper's centre square (center-crop), the "
        "whole image resized (whole), or auto (default): the crop where it loses nothing, "
        "else the whole image",
    )
    dino = parser.add_argument_group(
        "AnomalyDINO (--method anomalydino; defaults: the authors' 'agnostic' preset; "
        "--backbone, --image-size and --reference apply too)"
    )
    dino.add_argument(
        "--rotation",
        action=argparse.BooleanOptionalAction,
        help="references rotated to 8 angles (default: on)",
    )
    dino.add_argument(
        "--masking",
        action=argparse.BooleanOptionalAction,
        help="leave out the background (first principal component) of the test images "
        "(default: off; the authors turn it on for some objects)",
    )
    dino.add_argument(
        "--neighbours", type=int, metavar="K", help="mean of the K nearest distances (1)"
    )


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """How image files are read: the bit depth of 16-bit data and the size limits."""
    group = parser.add_argument_group("reading images")
    group.add_argument(
        "--bit-depth",
        type=int,
        choices=range(8, 17),
        metavar="BITS",
        help="bit depth of the data in 16-bit files (a 12-bit camera: 12); default: "
        "detected per image from its largest value, with a warning when not 16",
    )
    group.add_argument(
        "--max-megapixels",
        type=float,
        metavar="MP",
        help="refuse (skip) images larger than this (default 179: a decompression bomb)",
    )
    group.add_argument(
        "--max-side",
        type=int,
        metavar="PIXELS",
        help="refuse (skip) images with a longer side, from the header (default 65535)",
    )
    group.add_argument(
        "--max-aspect",
        type=float,
        metavar="RATIO",
        help="refuse (skip) images more elongated than RATIO:1, from the header (default 100)",
    )


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that wrap whichever method is chosen: references and tiling."""
    group = parser.add_argument_group("references and tiling (any per-image method)")
    group.add_argument(
        "--reference",
        nargs="+",
        metavar="DIR_OR_GLOB",
        help="known-good images (typically 1 to 16; folders, globs, CSV lists) or a saved "
        "bank (the FILE.bank.pt `anomalyclip calibrate --reference ... -o FILE.pt` writes; "
        "for MuSc, a bank saved from Python): each image is also compared with their "
        "patches (few-shot)",
    )
    group.add_argument(
        "--tile-size",
        type=int,
        metavar="PIXELS",
        help="score big or elongated images in square tiles of this many original pixels "
        "(maps stitched, image score the tiles' maximum); default: the whole image",
    )
    group.add_argument(
        "--tile-overlap",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="share of a tile its neighbours overlap (default 0.25)",
    )
    add_precision_argument(parser)


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision``: the arithmetic the method scores in (recorded with each result)."""
    from anomalyclip.utils.precision import PRECISIONS

    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="float32 (default: the reference numbers), bfloat16 (AnomalyCLIP's model, "
        "MuSc's similarity products; fast on CPUs with AVX-512 BF16 or AMX and on GPUs), "
        "int8 (AnomalyCLIP's visual linear layers, CPU) or auto (the fastest this "
        "hardware runs natively, float32 where none helps; logged and recorded)",
    )


def add_calibration_argument(parser: argparse.ArgumentParser) -> None:
    """``--calibration``: the thresholds of a method without a checkpoint."""
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="the calibration file `anomalyclip calibrate --method musc|anomalydino` wrote: "
        "its method, settings, tiles, reference bank and thresholds (--checkpoint FILE "
        "takes it too)",
    )


def _calibration_file(args: argparse.Namespace) -> tuple[argparse.Namespace, str | None]:
    """The options with a calibration file's method, and the file; ``--checkpoint`` naming
    one counts. An explicit other ``--method`` is refused, not silently replaced."""
    from anomalyclip.methods.calibrated import CalibrationFile, is_calibration_file

    calibration = getattr(args, "calibration", None)
    checkpoint = getattr(args, "checkpoint", None)
    if calibration is None and is_calibration_file(checkpoint):
        calibration = checkpoint
    if calibration is None:
        return args, None
    record = CalibrationFile.load(calibration)
    method = getattr(args, "method", DEFAULT_METHOD)
    if method not in (DEFAULT_METHOD, record.method):
        raise ValueError(f"{calibration} calibrates --method {record.method}, not {method}")
    return argparse.Namespace(**{**vars(args), "method": record.method, "checkpoint": None}), str(
        calibration
    )


def spec_from_args(args: argparse.Namespace, seed: int = 0) -> PredictorSpec:
    """What the options describe, for :func:`anomalyclip.methods.assemble.assemble`."""
    from anomalyclip.methods import method_named
    from anomalyclip.methods.assemble import PredictorSpec

    args, calibration = _calibration_file(args)
    name = getattr(args, "method", DEFAULT_METHOD)
    method = method_named(name)
    return PredictorSpec(
        method=name,
        checkpoint=_checkpoint(args) if method.has_checkpoint else _stray_checkpoint(args),
        weights=args.clip_weights,
        overrides=_anomalyclip_overrides(args) if method.has_checkpoint else _set_overrides(args),
        references=tuple(getattr(args, "reference", None) or ()),
        tile_size=getattr(args, "tile_size", None),
        tile_overlap=getattr(args, "tile_overlap", 0.25),
        batch_size=getattr(args, "batch_size", 8),
        onnx=getattr(args, "onnx", None),
        device=args.device,
        seed=seed,
        progress=not getattr(args, "no_progress", True),
        calibration=calibration,
        precision=getattr(args, "precision", "float32"),
    )


def build_predictor(args: argparse.Namespace, seed: int = 0) -> Predictor:
    """The scoring method the options name, with references and tiles where the command
    offers them: the one way every command builds what it scores with."""
    from anomalyclip.methods.assemble import assemble

    return assemble(spec_from_args(args, seed))


def build_method(args: argparse.Namespace, seed: int = 0) -> Predictor:
    """The scoring method ``--method`` names, as it is (no references, no tiles)."""
    from anomalyclip.methods.assemble import build_method as build

    return build(spec_from_args(args, seed))


def _checkpoint(args: argparse.Namespace) -> str:
    """``--checkpoint``; without one, ``mvtec``, or none for an untrained baseline preset."""
    from anomalyclip.methods.anomalyclip.factory import NO_CHECKPOINT
    from anomalyclip.methods.anomalyclip.presets import get_preset

    checkpoint = getattr(args, "checkpoint", NO_CHECKPOINT)
    if checkpoint is None:
        preset = get_preset(args.preset) if getattr(args, "preset", None) else None
        checkpoint = NO_CHECKPOINT if preset is not None and not preset.trained else "mvtec"
    return str(checkpoint)


def _stray_checkpoint(args: argparse.Namespace) -> str | None:
    """A ``--checkpoint`` given to a method that has none (the method refuses it); the
    option's own default is not one."""
    checkpoint = getattr(args, "checkpoint", None)
    return None if checkpoint in (None, CHECKPOINT_DEFAULT) else str(checkpoint)


def _anomalyclip_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {**model_overrides(args), "preset": getattr(args, "preset", None)}


# Options that belong to one method beside AnomalyCLIP: given with another, refused.
METHOD_OPTIONS = {
    "musc": ("musc_degrees", "rscin_k", "musc_divide_num", "musc_coverage"),
    "anomalydino": ("rotation", "masking", "neighbours"),
}


def _set_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of a method other than AnomalyCLIP; AnomalyCLIP's own options, and
    other methods', are refused with it, not silently ignored."""
    method = getattr(args, "method", DEFAULT_METHOD)
    foreign = [*ANOMALYCLIP_ONLY]
    foreign += [o for name, own in METHOD_OPTIONS.items() if name != method for o in own]
    if method == "anomalydino":  # its features are the last block's, as the authors'
        foreign.append("features")
    given = [f"--{n.replace('_', '-')}" for n in foreign if getattr(args, n, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} do not apply to --method {method}")
    features = getattr(args, "features", None)
    common = {
        "image_size": getattr(args, "image_size", None),
        "batch_size": getattr(args, "batch_size", None),
    }
    if method == "anomalydino":
        return {
            **common,
            "rotation": getattr(args, "rotation", None),
            "masking": getattr(args, "masking", None),
            "neighbours": getattr(args, "neighbours", None),
        }
    rscin_k = getattr(args, "rscin_k", None)
    degrees = getattr(args, "musc_degrees", None)
    return {
        **common,
        "features": tuple(features) if features else None,
        "degrees": tuple(degrees) if degrees else None,
        # the official code's 0 in the list switches RsCIN off
        "rscin_k": None if rscin_k is None else tuple(k for k in rscin_k if k != 0),
        "divide_num": getattr(args, "musc_divide_num", None),
        "coverage": getattr(args, "musc_coverage", None),
    }


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep image embeddings on disk here, reused by later runs with the same "
        "backbone, size, layers and images",
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
    if getattr(args, "allow_outside_paths", False):
        options["allow_outside_paths"] = True
    if getattr(args, "mask_mismatch", "error") != "error":
        options["mask_mismatch"] = args.mask_mismatch
    if getattr(args, "normal_folder", None):
        options["normal"] = args.normal_folder
    dataset = open_dataset(spec.path, spec.kind, split=args.split, **options)
    logger.info("%s: %s", spec.path, dataset.summary())
    return dataset


def add_data_arguments(parser: argparse.ArgumentParser, many: bool) -> None:
    from anomalyclip.data import READERS
    from anomalyclip.data.core import MASK_MISMATCH_MODES

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
    group.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="read the files a manifest, VisA split file or meta.json names outside the "
        "dataset's folder (../ or absolute paths), refused by default: for an index of your "
        "own, not one that came with downloaded data",
    )
    group.add_argument(
        "--mask-mismatch",
        choices=MASK_MISMATCH_MODES,
        default="error",
        help="masks that do not fit their images (another size, given for a normal image, "
        "or with no image): error lists them (default); resize stretches masks of another "
        "size over their images and leaves the other misfits out; ignore leaves every "
        "misfit out (such anomalous images count for image-level metrics only)",
    )
    group.add_argument(
        "--normal-folder",
        metavar="NAME",
        help="the normal images' folder of a folder dataset (default: the first of good/, "
        "normal/, ok/)",
    )


def make_cache(model: AnomalyCLIP, args: argparse.Namespace, memory: bool) -> FeatureCache:
    """The embedding cache, keyed by the backbone's checksum when it has one."""
    from anomalyclip.methods.anomalyclip.embedding_cache import DEFAULT_MEMORY_LIMIT, FeatureCache

    limit = getattr(args, "cache_memory_gb", None)
    return FeatureCache(
        model,
        getattr(args, "cache_dir", None),
        memory=memory,
        memory_limit=int(limit * 2**30) if limit is not None else DEFAULT_MEMORY_LIMIT,
        weights=model.backbone.sha256,
    )

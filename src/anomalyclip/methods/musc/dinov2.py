"""MuSc on a DINOv2 backbone: the features and preprocessing of the official DINOv2 branch.

MuSc's official code (github.com/xrli-U/MuSc, ``models/musc.py``) also runs on DINOv2
(``--backbone_name dinov2_vitb14`` and the like). Only the front end differs from the CLIP
path; LNAMD, MSM, the maps and RsCIN are :mod:`anomalyclip.methods.musc`'s, unchanged:

1. **Preprocessing**: the dataset's own transform, ``Resize((S, S))``, which squashes the
   whole image (PIL bilinear, antialiased), then ImageNet mean and std
   (:class:`SquashPreProcessor`). No aspect-preserving resize and no crop.
2. **Features**: ``get_intermediate_layers(x, n=layers)`` with its default ``norm=True``:
   every chosen block's output goes through the final LayerNorm, class and register
   tokens dropped, and a zero vector is put in front as a fake class token (LNAMD drops
   it again) (:func:`dinov2_tokens`).
3. **RsCIN's image embedding**: ``model(x)``, the final-norm class token, raw (the CLIP
   path L2-normalises it).

:class:`MuScDINOv2` is :class:`~anomalyclip.methods.musc.MuSc` with this front end: it
overrides the backbone-facing members (``features``, ``preprocessor``, ``grid``,
``device``) and inherits the scoring.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from anomalyclip.backbone.dinov2 import DINOv2
from anomalyclip.backbone.identity import BackboneIdentity
from anomalyclip.methods.musc.model import MuSc, MuScConfig, PreprocessedSet
from anomalyclip.preprocess import PreProcessor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MuScDINOv2", "SquashPreProcessor", "dinov2_tokens"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official DINOv2 branch's layers for a 12-block model (its config's 0-based 2 5 8 11).
DEFAULT_LAYERS = (3, 6, 9, 12)


@dataclass(frozen=True)
class SquashPreProcessor(PreProcessor):
    """Whole image to S x S with PIL's bilinear filter (torchvision's ``Resize((S, S))``
    on a PIL image), ImageNet normalisation; maps go back by the base class's squash rule."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def tensor(self, image: Image.Image) -> Tensor:
        resized = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (array - mean) / std


def dinov2_tokens(
    backbone: DINOv2, images: Tensor, layers: Sequence[int]
) -> tuple[dict[int, Tensor], Tensor]:
    """MuSc's DINOv2 features of a batch: 1-based layer -> (B, 1 + L, D) final-norm patch
    tokens behind a zero fake class token, and the (B, D) raw final-norm class tokens."""
    needed = sorted(set(layers) | {backbone.arch.depth})  # the class token needs them all
    output = backbone.forward_intermediates(images, needed)
    tokens = {}
    for layer in layers:
        patches = output.patch_tokens[layer]
        zero = torch.zeros(len(patches), 1, patches.shape[-1], dtype=patches.dtype)
        tokens[layer] = torch.cat((zero.to(patches.device), patches), dim=1)
    assert output.class_token is not None  # the last block was asked for
    return tokens, output.class_token


class MuScDINOv2(MuSc):
    """MuSc scoring on DINOv2 features (see the module's docstring).

    The whole set's features are computed in this process: ``shard`` under ``torchrun``
    still shares the mutual scoring, which is where the time goes. Subsets are scored
    one at a time from spilled features, as :meth:`MuSc.run` does.
    """

    def __init__(
        self,
        dinov2: DINOv2,
        config: MuScConfig | None = None,
        backbone: BackboneIdentity | None = None,
    ) -> None:
        self.config = config or MuScConfig(backbone="dinov2", features=DEFAULT_LAYERS)
        self.dinov2 = dinov2.requires_grad_(False).eval()
        self.backbone = backbone or BackboneIdentity(
            self.config.backbone, None, dinov2.arch.to_dict()
        )
        depth, patch = dinov2.arch.depth, dinov2.arch.patch
        if max(self.config.features) > depth:
            raise ValueError(
                f"feature layers {list(self.config.features)} exceed the backbone's {depth} "
                f"blocks (a 12-block model takes e.g. {list(DEFAULT_LAYERS)})"
            )
        if self.config.image_size % patch:
            raise ValueError(
                f"image_size {self.config.image_size} is not a multiple of the patch size {patch}"
            )

    @property
    def device(self) -> torch.device:
        return self.dinov2.cls_token.device

    @property
    def grid(self) -> int:
        return self.config.image_size // self.dinov2.arch.patch

    @property
    def preprocessor(self) -> PreProcessor:
        return SquashPreProcessor(self.config.image_size)

    def feature_shape(self) -> tuple[int, int, int]:
        """Tokens per image (the fake class token included), channels, embedding size."""
        return self.grid**2 + 1, self.dinov2.arch.width, self.dinov2.arch.width

    def feature_batches(
        self, images: Tensor | PreprocessedSet, shard: bool = False
    ) -> Iterator[tuple[int, dict[int, Tensor], Tensor]]:
        """(first row, tokens layer -> (B, 1 + L, D) with a zero fake class token, raw
        class tokens (B, D)), float32, per batch of ``config.batch_size``. Every batch is
        computed here: ``shard`` does not share the features (see the class)."""
        with torch.no_grad():
            for start in range(0, len(images), self.config.batch_size):
                stop = min(start + self.config.batch_size, len(images))
                batch = self.batch_of(images, start, stop).to(self.device)
                tokens, class_token = dinov2_tokens(self.dinov2, batch, self.config.features)
                yield start, {k: v.float() for k, v in tokens.items()}, class_token.float()

    def features(
        self, images: Tensor | PreprocessedSet, shard: bool = False
    ) -> tuple[dict[int, Tensor], Tensor]:
        """Tokens (layer -> (N, 1 + L, D), zero fake class token) and raw class tokens
        (N, D), float32, in batches of ``config.batch_size``."""
        if isinstance(images, Tensor):
            self.batch_of(images, 0, 0)  # the shape checked even for an empty set
        parts: dict[int, list[Tensor]] = {layer: [] for layer in self.config.features}
        classes: list[Tensor] = []
        for _, tokens, class_token in self.feature_batches(images):
            for layer, values in tokens.items():
                parts[layer].append(values)
            classes.append(class_token)
        return {layer: torch.cat(values) for layer, values in parts.items()}, torch.cat(classes)


def create_musc_dinov2(
    weights: str | os.PathLike[str],
    config: MuScConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> MuScDINOv2:
    """MuSc on a registered DINOv2 ("dinov2_vitl14", fetched into the verified cache) or
    a weights file or folder, recorded by name and SHA-256."""
    from anomalyclip.backbone.dinov2_layouts import load_dinov2, resolve_dinov2

    path, name, sha256 = resolve_dinov2(weights)
    dinov2 = load_dinov2(path)
    identity = BackboneIdentity(name, sha256, dinov2.arch.to_dict())
    dinov2 = dinov2.to(device=device, dtype=dtype) if dtype is not None else dinov2.to(device)
    return MuScDINOv2(dinov2, dataclasses.replace(config, backbone=name), identity)

"""DINOv2's vision transformer (Oquab et al., 2023; facebookresearch/dinov2), for patch features.

AnomalyDINO and MuSc-on-DINOv2 read DINOv2's patch tokens, and their published numbers
depend on details the official ``DinoVisionTransformer`` fixes: the 14 x 14 patch
convolution, the class token (and, for the ``_reg`` models, four register tokens placed
after it, with no positional embedding), pre-norm blocks with LayerScale, qkv with bias,
exact GELU (ViT-g/14: a SwiGLU feed-forward, :class:`_SwiGLU`), LayerNorm eps 1e-6, and
the final LayerNorm that ``get_intermediate_layers``
applies to every block it returns. Its parameters carry the official names, so an official
``.pth`` loads as is; other layouts are converted in
:mod:`anomalyclip.backbone.dinov2_layouts`.

The positional table is trained on a 37 x 37 grid (518 px) and resized for any other grid
exactly as the official code resizes it (:func:`interpolate_positions`): two rules exist,
and they give different features.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOv2", "DINOv2Architecture", "DINOv2Output", "interpolate_positions"]

LAYER_NORM_EPS = 1e-6
HEAD_WIDTH = 64  # every published DINOv2 (S, B, L, g) has 64-wide heads
FEED_FORWARDS = ("gelu", "swiglu")


@dataclass(frozen=True)
class DINOv2Architecture:
    """What a DINOv2 is built from; all of it but the heads and the interpolation rule can
    be read off a state dict's shapes (:meth:`from_state_dict`).

    ``grid``: the trained positional grid (37 for 518 px). ``interpolate_offset`` and
    ``interpolate_antialias``: the hub's settings, (0.1, False) for the models without
    registers and (0.0, True) for the ``_reg`` models; :func:`interpolate_positions`
    explains what they change. ``feed_forward``: "gelu" (S, B, L) or "swiglu" (g, whose
    ``mlp_width`` is the SwiGLU hidden width, 4096 for g/14).
    """

    width: int
    depth: int
    heads: int
    mlp_width: int
    registers: int = 0
    patch: int = 14
    grid: int = 37
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    feed_forward: str = "gelu"

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("width", "depth", "heads", "mlp_width", "patch", "grid")
            if getattr(self, name) < 1
        ]
        if self.registers < 0:
            problems.append(f"registers must be >= 0, got {self.registers}")
        if self.feed_forward not in FEED_FORWARDS:
            problems.append(
                f"feed_forward must be one of {FEED_FORWARDS}, got {self.feed_forward!r}"
            )
        if self.heads >= 1 and self.width % self.heads:
            problems.append(f"width {self.width} cannot be split into {self.heads} heads")
        if problems:
            raise ValueError("invalid DINOv2 architecture: " + "; ".join(problems))

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Tensor], heads: int | None = None
    ) -> DINOv2Architecture:
        """The architecture of an official-layout state dict; ``heads`` defaults to
        width // 64 (true of every published model), and the interpolation rule follows
        the hub's: registers mean (offset 0, antialias), none (offset 0.1, no antialias)."""
        try:
            width = int(state_dict["cls_token"].shape[-1])
            positions = int(state_dict["pos_embed"].shape[1]) - 1
            patch = int(state_dict["patch_embed.proj.weight"].shape[-1])
            swiglu = "blocks.0.mlp.w12.weight" in state_dict
            if swiglu:  # w12 packs the gate and the value halves
                mlp_width = int(state_dict["blocks.0.mlp.w12.weight"].shape[0]) // 2
            else:
                mlp_width = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
        except KeyError as error:
            raise ValueError(f"not a DINOv2 state dict: no {error.args[0]}") from None
        grid = math.isqrt(max(positions, 0))
        if grid * grid != positions:
            raise ValueError(f"pos_embed has {positions} patch positions, not a square grid")
        depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
        registers = (
            int(state_dict["register_tokens"].shape[1]) if "register_tokens" in state_dict else 0
        )
        return cls(
            width=width,
            depth=depth,
            heads=heads or max(1, width // HEAD_WIDTH),
            mlp_width=mlp_width,
            registers=registers,
            patch=patch,
            grid=grid,
            interpolate_offset=0.0 if registers else 0.1,
            interpolate_antialias=bool(registers),
            feed_forward="swiglu" if swiglu else "gelu",
        )

    def to_dict(self) -> dict[str, Any]:
        """As a dict; the GELU feed-forward is left out, so identities recorded before
        SwiGLU existed (banks, results) still compare equal."""
        data = dataclasses.asdict(self)
        if data["feed_forward"] == "gelu":
            del data["feed_forward"]
        return data


@dataclass
class DINOv2Output:
    """Tokens of the chosen blocks. ``patch_tokens``: 1-based block -> (B, gh * gw, D),
    row-major, class and register tokens dropped. ``class_token``: (B, D) of the last
    block after the final norm (what ``model(x)`` returns), when the last block ran."""

    patch_tokens: dict[int, Tensor]
    class_token: Tensor | None
    grid: tuple[int, int]


def interpolate_positions(table: Tensor, grid: tuple[int, int], arch: DINOv2Architecture) -> Tensor:
    """The (1, 1 + gh * gw, D) positional table for a (gh, gw) grid, as DINOv2 makes it.

    Unchanged when the grid is the trained square one. Otherwise the patch part is
    resized bicubically (align_corners False). With ``interpolate_offset`` (the models
    without registers) by ``scale_factor=((gh + offset) / M, (gw + offset) / M)``: the
    output size is floor(M * scale) = g, but PyTorch maps the coordinates with the given
    scale, not g / M, so a plain resize to (gh, gw) differs (by up to 0.4 here). Without
    an offset (the register models) by ``size=(gh, gw)``. ``interpolate_antialias``
    applies to both, and matters only when shrinking.
    """
    rows, columns = grid
    trained = arch.grid
    if rows * columns == trained * trained and rows == columns:
        return table
    dtype = table.dtype
    table = table.float()
    patch_part = table[:, 1:].reshape(1, trained, trained, -1).permute(0, 3, 1, 2)
    if arch.interpolate_offset:
        scale = (
            (rows + arch.interpolate_offset) / trained,
            (columns + arch.interpolate_offset) / trained,
        )
        resized = F.interpolate(
            patch_part,
            scale_factor=scale,
            mode="bicubic",
            align_corners=False,
            antialias=arch.interpolate_antialias,
        )
    else:
        resized = F.interpolate(
            patch_part,
            size=(rows, columns),
            mode="bicubic",
            align_corners=False,
            antialias=arch.interpolate_antialias,
        )
    if tuple(resized.shape[-2:]) != (rows, columns):
        raise ValueError(f"the positional table resized to {tuple(resized.shape[-2:])}, not {grid}")
    patch_part = resized.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)
    return torch.cat((table[:, :1], patch_part), dim=1).to(dtype)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # the official Attention's arithmetic: scale q first, softmax over explicit products
        attention = (q * (width // self.heads) ** -0.5) @ k.transpose(-2, -1)
        out = attention.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class _LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    """ViT-g/14's feed-forward (the official ``SwiGLUFFNFused``): ``w12`` holds the gate
    and value projections packed, in that order; SiLU(gate) * value, then ``w3``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class _Block(nn.Module):
    def __init__(self, arch: DINOv2Architecture) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(arch.width, eps=LAYER_NORM_EPS)
        self.attn = _Attention(arch.width, arch.heads)
        self.ls1 = _LayerScale(arch.width)
        self.norm2 = nn.LayerNorm(arch.width, eps=LAYER_NORM_EPS)
        self.mlp: nn.Module = (
            _SwiGLU(arch.width, arch.mlp_width)
            if arch.feed_forward == "swiglu"
            else _Mlp(arch.width, arch.mlp_width)
        )
        self.ls2 = _LayerScale(arch.width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, arch: DINOv2Architecture) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, arch.width, arch.patch, arch.patch)


class DINOv2(nn.Module):
    """DINOv2 ViT with the official parameter names; inference only (no masking, no heads).

    ``mask_token`` is kept (unused at inference) so that an official state dict loads
    strictly, every key accounted for.
    """

    def __init__(self, arch: DINOv2Architecture) -> None:
        super().__init__()
        self.arch = arch
        width = arch.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + arch.grid * arch.grid, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width))
        if arch.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, arch.registers, width))
        self.patch_embed = _PatchEmbed(arch)
        self.blocks = nn.ModuleList(_Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Tensor], arch: DINOv2Architecture | None = None
    ) -> DINOv2:
        """A model in eval mode, frozen, holding an official-layout state dict (strict)."""
        arch = arch or DINOv2Architecture.from_state_dict(state_dict)
        with torch.device("meta"):
            model = cls(arch)
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
        return model.float().eval().requires_grad_(False)

    def grid_of(self, images: Tensor) -> tuple[int, int]:
        """(gh, gw) for a (B, 3, H, W) batch: H and W must be multiples of the patch."""
        height, width = images.shape[-2:]
        patch = self.arch.patch
        if images.dim() != 4 or images.shape[1] != 3 or height % patch or width % patch:
            raise ValueError(
                f"DINOv2 takes (B, 3, H, W) with H and W multiples of {patch}, "
                f"got {tuple(images.shape)}"
            )
        return height // patch, width // patch

    def tokens(self, images: Tensor) -> Tensor:
        """(B, 1 + registers + gh * gw, D): the input of the first block."""
        grid = self.grid_of(images)
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1)
        x = x + interpolate_positions(self.pos_embed, grid, self.arch)
        if self.arch.registers:
            registers = self.register_tokens.expand(len(x), -1, -1)
            x = torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)
        return x

    def forward_intermediates(
        self, images: Tensor, blocks: Sequence[int] | None = None, norm: bool = True
    ) -> DINOv2Output:
        """Patch tokens after each chosen 1-based block (default: the last), through the
        final norm unless ``norm`` is False (``get_intermediate_layers``' ``norm``); the
        class token after the final norm when the last block runs (for RsCIN)."""
        chosen = sorted(set(blocks or [self.arch.depth]))
        if not chosen or chosen[0] < 1 or chosen[-1] > self.arch.depth:
            raise ValueError(f"blocks must lie in 1..{self.arch.depth}, got {list(blocks or [])}")
        grid = self.grid_of(images)
        prefix = 1 + self.arch.registers
        x = self.tokens(images)
        patch_tokens: dict[int, Tensor] = {}
        for number, block in enumerate(self.blocks[: chosen[-1]], start=1):
            x = block(x)
            if number in chosen:
                patch_tokens[number] = (self.norm(x) if norm else x)[:, prefix:]
        class_token = self.norm(x[:, :1])[:, 0] if chosen[-1] == self.arch.depth else None
        return DINOv2Output(patch_tokens, class_token, grid)

    def patch_features(self, images: Tensor) -> Tensor:
        """(B, gh * gw, D) final-norm patch tokens of the last block:
        ``get_intermediate_layers(x)[0]``, what AnomalyDINO uses."""
        return self.forward_intermediates(images).patch_tokens[self.arch.depth]

    def forward(self, images: Tensor) -> Tensor:
        """(B, D) final-norm class token, as the hub model's ``model(x)`` returns it."""
        output = self.forward_intermediates(images)
        assert output.class_token is not None  # the last block always runs here
        return output.class_token

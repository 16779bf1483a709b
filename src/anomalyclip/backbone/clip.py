"""CLIP ViT in OpenAI's parameter layout, with AnomalyCLIP's DPAM and deep text prompts.

Module and parameter names follow OpenAI's ``model.py`` so that an OpenAI state dict
loads with ``load_state_dict(strict=True)``; every other layout is converted to this one
(see :mod:`anomalyclip.backbone.layouts`). Tensors are batch-first throughout and all
attention goes through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DPAMMode = Literal["vv", "qq", "kk"]
GlobalHead = Literal["original", "clip"]
Activation = Literal["quick_gelu", "gelu"]
OriginalStream = Literal["all", "class", "none"]
# How the positional embedding's patch part is resized to a new grid: AnomalyCLIP's
# bilinear, or open_clip's ``resize_pos_embed`` (bicubic), which MuSc's numbers rely on.
PositionInterpolation = Literal["bilinear", "bicubic"]


@dataclass(frozen=True)
class CLIPArchitecture:
    """Every shape of a CLIP ViT; inferred from a state dict, stored in our checkpoints."""

    embed_dim: int
    vision_width: int
    vision_layers: int
    vision_patch_size: int
    vision_grid: int
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    activation: Activation = "quick_gelu"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CLIPArchitecture:
        return cls(**data)

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, Tensor], activation: Activation = "quick_gelu"
    ) -> CLIPArchitecture:
        """Shapes as OpenAI's ``build_model`` infers them: heads = width // 64."""
        if "visual.conv1.weight" not in state_dict:
            if "visual.layer1.0.conv1.weight" in state_dict:
                raise ValueError("ResNet CLIP models are not supported; use a ViT CLIP")
            raise ValueError("not a CLIP state dict in OpenAI's layout (no visual.conv1.weight)")

        def count_layers(prefix: str) -> int:
            pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
            found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
            return max(found) + 1 if found else 0

        vision_width = state_dict["visual.conv1.weight"].shape[0]
        text_width = state_dict["ln_final.weight"].shape[0]
        grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
        return cls(
            embed_dim=state_dict["text_projection"].shape[1],
            vision_width=vision_width,
            vision_layers=count_layers("visual.transformer.resblocks"),
            vision_patch_size=state_dict["visual.conv1.weight"].shape[-1],
            vision_grid=grid,
            vision_heads=max(1, vision_width // 64),
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            text_width=text_width,
            text_layers=count_layers("transformer.resblocks"),
            text_heads=max(1, text_width // 64),
            activation=activation,
        )


class LayerNorm(nn.LayerNorm):
    """Computes in float32 whatever the input dtype, as OpenAI's CLIP does for fp16.

    The parameters are promoted too: a model moved wholesale to fp16/bf16 (``.to(dtype)``)
    holds them in half precision, and layer_norm refuses mixed dtypes.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        normalized = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return normalized.to(x.dtype)


def _needs_graph(x: Tensor) -> bool:
    """Whether autograd records ``x``'s operations (in-place shortcuts must not be used)."""
    return torch.is_grad_enabled() and x.requires_grad


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``; without autograd, one temporary instead of three.

    The MLP's hidden activations are the largest tensors of the tower (4 x width per
    token); allocating and faulting in fewer of them is measurably faster on CPU.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _needs_graph(x):
            return x * torch.sigmoid(1.702 * x)
        return torch.mul(x, 1.702).sigmoid_().mul_(x)


class MLP(nn.Module):
    def __init__(self, width: int, activation: Activation) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, width * 4)
        self.gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(width * 4, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters, split into q/k/v and merge steps for DPAM."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        # A module standing in for in_proj_weight/bias (see
        # anomalyclip.methods.anomalyclip.quantize).
        self.in_proj: nn.Module | None = None

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, tokens, width = x.shape
        if self.in_proj is not None:
            qkv = self.in_proj(x)
        else:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge(self, heads_out: Tensor) -> Tensor:
        batch, heads, tokens, head_dim = heads_out.shape
        return self.out_proj(heads_out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        q, k, v = self.qkv(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=causal))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, activation: Activation) -> None:
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width, activation)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: Tensor, causal: bool = False, class_only: bool = False) -> Tensor:
        """The block's output; ``class_only`` returns just the class token's, (B, 1, W).

        Every token still serves as key and value; only the class token is queried and
        sent through the MLP, which is all a final layer feeding the global head needs.
        """
        if not class_only:
            x = x + self.attn(self.ln_1(x), causal=causal)
            return x + self.mlp(self.ln_2(x))
        q, k, v = self.attn.qkv(self.ln_1(x))
        return self._finish(x[:, :1], F.scaled_dot_product_attention(q[:, :, :1], k, v))

    def forward_dpam(
        self, x: Tensor, mode: DPAMMode, original: OriginalStream = "all"
    ) -> tuple[Tensor | None, Tensor]:
        """One DPAM layer: the block's usual output and the surrogate-attention residual.

        Both attentions share the block's projections; the surrogate one replaces the
        query-key similarity by value-value (or query-query, key-key) similarity.
        ``original`` says how much of the block's usual output is wanted: "all" tokens,
        the "class" token only (B, 1, W), or "none" (returned as None), so a final layer
        does no attention or MLP work whose result nobody reads.
        """
        q, k, v = self.attn.qkv(self.ln_1(x))
        similarity = {"vv": v, "qq": q, "kk": k}[mode]
        surrogate = F.scaled_dot_product_attention(similarity, similarity, v)
        if original == "none":
            return None, self.attn.merge(surrogate)
        if original == "class":
            attended = F.scaled_dot_product_attention(q[:, :, :1], k, v)
            return self._finish(x[:, :1], attended), self.attn.merge(surrogate)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self._finish(x, attended), self.attn.merge(surrogate)

    def _finish(self, x: Tensor, heads_out: Tensor) -> Tensor:
        """Residual attention output, then the residual MLP."""
        x = x + self.attn.merge(heads_out)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: Activation) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, activation) for _ in range(layers)
        )

    def blocks(self, stop: int | None = None) -> list[ResidualAttentionBlock]:
        """The first ``stop`` blocks (all by default), typed: a ModuleList hands out Modules."""
        return [
            block for block in self.resblocks[:stop] if isinstance(block, ResidualAttentionBlock)
        ]


@dataclass
class VisualFeatures:
    """Output of the visual tower.

    ``global_embedding``: (B, E), not normalised. ``patch_tokens``: 1-based layer ->
    (B, 1 + grid_h * grid_w, E) after ln_post and proj, class token first.
    """

    global_embedding: Tensor | None
    patch_tokens: dict[int, Tensor]
    grid: tuple[int, int]


class VisionTransformer(nn.Module):
    def __init__(self, arch: CLIPArchitecture) -> None:
        super().__init__()
        width = arch.vision_width
        self.patch_size = arch.vision_patch_size
        self.trained_grid = arch.vision_grid
        self.conv1 = nn.Conv2d(3, width, self.patch_size, self.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn(arch.vision_grid**2 + 1, width)
        )
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(
            width, arch.vision_layers, arch.vision_heads, arch.activation
        )
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, arch.embed_dim))
        self._resized_positions: dict[tuple, Tensor] = {}

    @property
    def num_layers(self) -> int:
        return len(self.transformer.resblocks)

    def positional_embedding_for(
        self, grid_h: int, grid_w: int, interpolation: PositionInterpolation = "bilinear"
    ) -> Tensor:
        """Positional embedding for a grid, the patch part resized (align_corners False).

        ``interpolation``: "bilinear" (AnomalyCLIP's) or "bicubic" (open_clip's
        ``resize_pos_embed``, without antialiasing); the class position is kept as is.
        The loaded parameter is never modified; the resized copy is cached per grid and
        mode (keyed by the parameter's version, so reloading weights invalidates it).
        """
        weights = self.positional_embedding
        if (grid_h, grid_w) == (self.trained_grid, self.trained_grid):
            return weights
        key = (
            grid_h,
            grid_w,
            interpolation,
            weights._version,
            weights.data_ptr(),
            weights.dtype,
            weights.device,
        )
        cached = self._resized_positions.get(key)
        if cached is not None and not (torch.is_grad_enabled() and weights.requires_grad):
            return cached
        side = self.trained_grid
        patch_part = weights[1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_part = F.interpolate(
            patch_part, (grid_h, grid_w), mode=interpolation, align_corners=False
        )
        patch_part = patch_part.reshape(weights.shape[1], grid_h * grid_w).T.to(weights.dtype)
        resized = torch.cat([weights[:1], patch_part])
        if not weights.requires_grad:
            resized = resized.detach()
            self._resized_positions = {key: resized}
        return resized

    def embed(
        self, images: Tensor, interpolation: PositionInterpolation = "bilinear"
    ) -> tuple[Tensor, tuple[int, int]]:
        x = self.conv1(images.to(self.conv1.weight.dtype))
        batch, width, grid_h, grid_w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(batch, 1, width)
        positions = self.positional_embedding_for(grid_h, grid_w, interpolation)
        x = torch.cat([cls, x], dim=1) + positions.to(x.dtype)
        return self.ln_pre(x), (grid_h, grid_w)

    def residual_stream(
        self,
        images: Tensor,
        layers: Sequence[int],
        interpolation: PositionInterpolation = "bicubic",
        image_embedding: bool = True,
    ) -> tuple[dict[int, Tensor], Tensor | None]:
        """The plain tower's raw hidden states, for methods that read the tower as it is.

        Returns 1-based layer -> (B, 1 + grid_h * grid_w, W): the residual stream after
        that block, all tokens, with no ln_post and no projection (standard Q-K attention,
        no DPAM); and, with ``image_embedding``, the standard CLIP image embedding
        (ln_post of the final class token, times proj; not normalised), else None.
        The default "bicubic" resize of the positions is open_clip's, as MuSc uses it.
        """
        requested = sorted(set(layers))
        total = self.num_layers
        if not requested or not 1 <= requested[0] <= requested[-1] <= total:
            raise ValueError(f"feature layers {list(layers)} outside 1..{total}")
        last = total if image_embedding else requested[-1]
        x, _ = self.embed(images, interpolation)
        collected: dict[int, Tensor] = {}
        for index, block in enumerate(self.transformer.blocks(last)):
            x = block(x, class_only=index + 1 == last and last not in requested)
            if index + 1 in requested:
                collected[index + 1] = x
        embedding = self.ln_post(x[:, 0]) @ self.proj if image_embedding else None
        return collected, embedding

    def forward_features(
        self,
        images: Tensor,
        layers: Sequence[int] = (),
        dpam_layers: int = 0,
        dpam_mode: DPAMMode = "vv",
        global_head: GlobalHead | None = "original",
    ) -> VisualFeatures:
        """Run the tower, stopping after the last layer anything needs.

        In that last layer the original stream is computed only as far as it is read:
        for its class token when it feeds the global head alone, not at all when nothing
        reads it (the DPAM stream and requested patch tokens are always complete).

        layers: 1-based layers whose patch tokens to return. dpam_layers: how many final
        layers carry the DPAM stream (AnomalyCLIP's ``DPAM_layer - 1``; 0 disables it).
        global_head: "original" = class token of the original stream times proj without
        ln_post (what AnomalyCLIP and its published checkpoints use); "clip" = the
        standard CLIP head (ln_post, then proj); None = no global embedding.
        """
        total = self.num_layers
        requested = sorted(set(layers))
        if requested and not 1 <= requested[0] <= requested[-1] <= total:
            raise ValueError(f"feature layers {requested} outside 1..{total}")
        if not 0 <= dpam_layers <= total:
            raise ValueError(f"dpam_layers={dpam_layers} outside 0..{total}")
        first_dpam = total - dpam_layers
        last = total if global_head is not None else (requested[-1] if requested else 0)

        x, grid = self.embed(images)
        dpam_stream: Tensor | None = None
        collected: dict[int, Tensor] = {}
        for index, block in enumerate(self.transformer.blocks(last)):
            final = index + 1 == last
            if index >= first_dpam:
                if dpam_stream is None:
                    dpam_stream = x
                wanted: OriginalStream = "all"
                if final:
                    wanted = "none" if global_head is None else "class"
                output, residual = block.forward_dpam(x, dpam_mode, wanted)
                dpam_stream = dpam_stream + residual
                if output is not None:  # None only in a final layer whose stream nobody reads
                    x = output
            else:
                x = block(x, class_only=final and index + 1 not in requested)
            if index + 1 in requested:
                collected[index + 1] = x if dpam_stream is None else dpam_stream

        patch_tokens = {layer: self.ln_post(t) @ self.proj for layer, t in collected.items()}
        global_embedding = None
        if global_head == "original":
            global_embedding = x[:, 0] @ self.proj
        elif global_head == "clip":
            global_embedding = self.ln_post(x[:, 0]) @ self.proj
        return VisualFeatures(global_embedding, patch_tokens, grid)


class CLIP(nn.Module):
    """Both towers of a CLIP ViT, parameters named as in OpenAI's release."""

    def __init__(self, arch: CLIPArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.visual = VisionTransformer(arch)
        self.token_embedding = nn.Embedding(arch.vocab_size, arch.text_width)
        self.positional_embedding = nn.Parameter(
            0.01 * torch.randn(arch.context_length, arch.text_width)
        )
        self.transformer = Transformer(
            arch.text_width, arch.text_layers, arch.text_heads, arch.activation
        )
        self.ln_final = LayerNorm(arch.text_width)
        self.text_projection = nn.Parameter(
            arch.text_width**-0.5 * torch.randn(arch.text_width, arch.embed_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, Tensor],
        arch: CLIPArchitecture | None = None,
        dtype: torch.dtype = torch.float32,
        consume: bool = False,
    ) -> CLIP:
        """Build and load in ``dtype``; OpenAI's bookkeeping entries are ignored.

        The module is built on the meta device and adopts converted copies of the tensors,
        so the weights exist twice at most (the caller's and the model's) instead of three
        times. ``consume=True`` goes further for a caller that holds no other reference to
        the tensors: entries are popped from ``state_dict`` as they are converted, so each
        source tensor is freed at once (tensors already in ``dtype`` are adopted, not
        copied). Loading OpenAI's fp16 ViT-L/14 that way peaks near the float32 model's
        1.7 GB instead of 2.6 GB.
        """
        bookkeeping = ("input_resolution", "context_length", "vocab_size")
        keys = [k for k in state_dict if k not in bookkeeping]
        arch = arch or CLIPArchitecture.from_state_dict({k: state_dict[k] for k in keys})
        with torch.device("meta"):
            model = cls(arch)
        converted = {}
        for key in keys:
            source = state_dict.pop(key) if consume else state_dict[key]
            converted[key] = source.to(dtype, copy=not consume)
            del source
        model.load_state_dict(converted, strict=True, assign=True)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: Tensor) -> Tensor:
        """Standard CLIP image embedding (ln_post on the class token, then proj)."""
        embedding = self.visual.forward_features(images, global_head="clip").global_embedding
        assert embedding is not None  # a global head was asked for
        return embedding

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Standard CLIP text embedding, not normalised."""
        embeddings = self.token_embedding(tokens).to(self.dtype)
        return self.encode_token_embeddings(embeddings, tokens.argmax(dim=-1))

    def encode_token_embeddings(
        self,
        embeddings: Tensor,
        eot_positions: Tensor,
        deep_prompts: Sequence[Tensor] = (),
    ) -> Tensor:
        """Text tower from token embeddings, with optional deep prompts.

        Before text layer i (1 <= i <= len(deep_prompts)), token positions
        1..len(deep_prompts[i-1]) are overwritten by that prompt, for every sequence.
        """
        if len(deep_prompts) >= len(self.transformer.resblocks):
            raise ValueError(
                f"{len(deep_prompts)} deep prompts need more than the "
                f"{len(self.transformer.resblocks)} text layers"
            )
        x = embeddings + self.positional_embedding.to(embeddings.dtype)
        batch = x.shape[0]
        for index, block in enumerate(self.transformer.resblocks):
            if 1 <= index <= len(deep_prompts):
                prompt = deep_prompts[index - 1].to(x.dtype)
                length = prompt.shape[0]
                x = torch.cat([x[:, :1], prompt.expand(batch, -1, -1), x[:, 1 + length :]], dim=1)
            x = block(x, causal=True)
        x = self.ln_final(x)
        return x[torch.arange(batch, device=x.device), eot_positions] @ self.text_projection

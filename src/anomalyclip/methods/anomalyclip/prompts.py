"""AnomalyCLIP's learnable text prompts: object-agnostic (or object-aware) with deep prompts.

Two sentences, ``X X ... X object.`` and ``X X ... X damaged object.``; the n_ctx
placeholders are replaced by learnable context vectors (``ctx_pos`` for normal, ``ctx_neg``
for abnormal), and learnable tokens overwrite positions 1..t of the hidden state before
text layers 1..depth-1. Parameter and buffer names match the authors' checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from anomalyclip.backbone.clip import CLIP
from anomalyclip.backbone.tokenizer import tokenize

AUTHORS_PROJECTION_WIDTH = 896  # the authors' unused compound_prompt_projections output size


@dataclass(frozen=True)
class PromptShape:
    """What a prompt state dict's tensors say about its configuration."""

    n_ctx: int
    prompt_depth: int
    deep_prompt_length: int
    text_width: int

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> PromptShape:
        if "ctx_pos" not in state or "ctx_neg" not in state:
            raise ValueError("not an AnomalyCLIP prompt state: ctx_pos/ctx_neg missing")
        deep = sorted(int(k.split(".")[1]) for k in state if k.startswith("compound_prompts_text."))
        if deep != list(range(len(deep))):
            raise ValueError(f"compound_prompts_text entries are not contiguous: {deep}")
        ctx = state["ctx_pos"]
        if ctx.dim() != 4 or ctx.shape != state["ctx_neg"].shape:
            raise ValueError(
                f"ctx_pos {tuple(ctx.shape)} and ctx_neg {tuple(state['ctx_neg'].shape)} "
                "must both be (1, 1, n_ctx, width)"
            )
        length = state["compound_prompts_text.0"].shape[0] if deep else 0
        return cls(
            n_ctx=ctx.shape[2],
            prompt_depth=len(deep) + 1,
            deep_prompt_length=length,
            text_width=ctx.shape[3],
        )


def prompt_sentences(
    n_ctx: int, object_name: str, normal_template: str, abnormal_template: str
) -> tuple[str, str]:
    placeholder = " ".join(["X"] * n_ctx)
    return (
        f"{placeholder} {normal_template.format(object_name)}.",
        f"{placeholder} {abnormal_template.format(object_name)}.",
    )


class PromptLearner(nn.Module):
    """The only trainable part of AnomalyCLIP."""

    # buffers registered by name in __init__ (register_buffer leaves them untyped)
    token_prefix_pos: Tensor
    token_prefix_neg: Tensor
    token_suffix_pos: Tensor
    token_suffix_neg: Tensor
    tokenized_prompts_pos: Tensor
    tokenized_prompts_neg: Tensor

    def __init__(
        self,
        clip: CLIP,
        n_ctx: int = 12,
        prompt_depth: int = 9,
        deep_prompt_length: int = 4,
        object_name: str = "object",
        normal_template: str = "{}",
        abnormal_template: str = "damaged {}",
    ) -> None:
        super().__init__()
        width = clip.arch.text_width
        if prompt_depth - 1 >= clip.arch.text_layers:
            raise ValueError(
                f"prompt_depth {prompt_depth} needs more than the {clip.arch.text_layers} "
                "text layers of this backbone"
            )
        self.n_ctx = n_ctx
        self.normal_template = normal_template
        self.abnormal_template = abnormal_template
        self.object_name = object_name
        self.ctx_pos = nn.Parameter(torch.empty(1, 1, n_ctx, width).normal_(std=0.02))
        self.ctx_neg = nn.Parameter(torch.empty(1, 1, n_ctx, width).normal_(std=0.02))
        self.compound_prompts_text = nn.ParameterList(
            nn.Parameter(torch.empty(deep_prompt_length, width).normal_(std=0.02))
            for _ in range(prompt_depth - 1)
        )
        prefix, suffix, tokens = self.static_parts(clip, object_name)
        for index, name in enumerate(("pos", "neg")):
            self.register_buffer(f"token_prefix_{name}", prefix[index].view(1, 1, 1, -1))
            self.register_buffer(f"token_suffix_{name}", suffix[index].view(1, 1, -1, width))
            self.register_buffer(f"tokenized_prompts_{name}", tokens[index].view(1, 1, -1).int())

    def static_parts(self, clip: CLIP, object_name: str) -> tuple[Tensor, Tensor, Tensor]:
        """Token embeddings around the placeholders, for the normal and abnormal sentence."""
        sentences = prompt_sentences(
            self.n_ctx, object_name, self.normal_template, self.abnormal_template
        )
        tokens = tokenize(list(sentences), clip.arch.context_length)
        if (tokens.argmax(dim=-1) <= self.n_ctx).any():
            raise ValueError("prompt sentences are too long for the context length")
        with torch.no_grad():
            embeddings = clip.token_embedding(tokens.to(clip.token_embedding.weight.device))
        embeddings = embeddings.float().cpu()
        return embeddings[:, :1], embeddings[:, 1 + self.n_ctx :], tokens

    @property
    def deep_prompts(self) -> list[Tensor]:
        return list(self.compound_prompts_text)

    def forward(
        self, static: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Prompt embeddings (2, L, W) [normal, abnormal], end-of-text positions, deep prompts.

        ``static`` replaces the stored prefix/suffix/tokens (object-aware prompts for
        another class name).
        """
        if static is None:
            prefix = torch.stack([self.token_prefix_pos[0, 0], self.token_prefix_neg[0, 0]])
            suffix = torch.stack([self.token_suffix_pos[0, 0], self.token_suffix_neg[0, 0]])
            tokens = torch.stack(
                [self.tokenized_prompts_pos[0, 0], self.tokenized_prompts_neg[0, 0]]
            )
        else:
            prefix, suffix, tokens = (t.to(self.ctx_pos.device) for t in static)
        ctx = torch.cat([self.ctx_pos[0], self.ctx_neg[0]]).to(prefix.dtype)
        embeddings = torch.cat([prefix, ctx, suffix], dim=1)
        return embeddings, tokens.long().argmax(dim=-1), self.deep_prompts

    def authors_state_dict(self) -> dict[str, Tensor]:
        """The state in the authors' ``epoch_15.pth`` layout, loadable by their code.

        Their unused ``compound_prompt_projections`` are written as zeros of their shape.
        """
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        width = self.ctx_pos.shape[-1]
        for index in range(len(self.compound_prompts_text)):
            state[f"compound_prompt_projections.{index}.weight"] = torch.zeros(
                AUTHORS_PROJECTION_WIDTH, width
            )
            state[f"compound_prompt_projections.{index}.bias"] = torch.zeros(
                AUTHORS_PROJECTION_WIDTH
            )
        return state

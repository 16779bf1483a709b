"""Dynamic int8 quantisation of the visual tower: the faster CPU path.

The tower's linear layers (attention in/out projections and the MLPs) carry about three
quarters of its arithmetic. With int8 weights, and activations quantised on the fly per
batch, they run about three times faster on x86 CPUs with VNNI; attention itself stays in
float32. The text tower is left alone: its features are computed once and cached, so
quantising it would only add error. See ``benchmarks/bench_inference.py`` for the speed
and the deviation from float32 (score differences, map correlation).
"""

from __future__ import annotations

import logging
import warnings
from typing import cast

import torch
from torch import nn

from anomalyclip.backbone.clip import ResidualAttentionBlock
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.predictor import Predictor
from anomalyclip.utils.precision import PrecisionChoice

logger = logging.getLogger(__name__)


def _quantization_api():
    """torch.ao.quantization, imported without its deprecation notice (it still works).

    Kept rather than its successor ``torchao``: measured in one process on the project's
    CPU (Intel Xeon, AVX-512 BF16/VNNI/AMX, 2 threads, torch 2.13, torchao 0.18.0), a
    ViT-L MLP (1370 x 1024 -> 4096 -> 1024) ran 2.54x faster than float32 with this
    dynamic int8, 0.87x (slower than float32) with torchao's
    ``Int8DynamicActivationInt8WeightConfig`` in eager mode; bfloat16 ran 3.53x.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao import quantization

    return quantization


def is_quantized(model: AnomalyCLIP) -> bool:
    return any(
        cast(ResidualAttentionBlock, block).attn.in_proj is not None
        for block in model.clip.visual.transformer.resblocks
    )


def _in_proj_as_linear(block: ResidualAttentionBlock) -> nn.Linear:
    """An nn.Linear adopting the block's packed q/k/v projection (no copy)."""
    attention = block.attn
    out_features, in_features = attention.in_proj_weight.shape
    with torch.device("meta"):
        linear = nn.Linear(in_features, out_features)
    linear.weight = attention.in_proj_weight
    linear.bias = attention.in_proj_bias
    return linear


def quantize_dynamic(model: AnomalyCLIP, per_channel: bool = True) -> AnomalyCLIP:
    """Quantise the visual tower's linear layers to int8, in place; returns ``model``.

    For CPU inference only (float32 model on the CPU). ``per_channel`` scales each output
    channel of a weight separately: same speed, smaller error than one scale per matrix.
    The float32 in-projection parameters are dropped to save memory, so the quantised
    model's state dict differs from CLIP's; keep a float32 model for training and saving.
    """
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(
            "dynamic int8 quantisation needs a float32 model on the CPU, got "
            f"{model.dtype} on {model.device}"
        )
    if is_quantized(model):
        raise ValueError("the model is already quantised")
    quantization = _quantization_api()
    qconfig = (
        quantization.per_channel_dynamic_qconfig
        if per_channel
        else quantization.default_dynamic_qconfig
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for module in model.clip.visual.transformer.resblocks:
            block = cast(ResidualAttentionBlock, module)  # nn.ModuleList yields plain Modules
            attention = block.attn
            attention.in_proj = _in_proj_as_linear(block)
            del attention.in_proj_weight, attention.in_proj_bias
            # Block by block, so at most one block's float32 weights are duplicated.
            quantization.quantize_dynamic(
                block, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True
            )
    logger.info(
        "visual tower quantised to dynamic int8 (%s scales)",
        "per-channel" if per_channel else "per-tensor",
    )
    return model


def apply_precision(predictor: Predictor, choice: PrecisionChoice) -> Predictor:
    """AnomalyCLIP in ``choice``'s precision, in place: bfloat16 converts the whole model
    (weights and activations: the linear layers and ``scaled_dot_product_attention`` run
    in bfloat16, oneDNN/AMX where the CPU has it; half the weights' memory), int8
    quantises the visual tower's linear layers (:func:`quantize_dynamic`), float32 leaves
    it as built. Recorded with every result (``settings()["precision"]``)."""
    if not isinstance(predictor, AnomalyCLIP):
        raise ValueError(f"precision {choice.precision} needs the torch AnomalyCLIP model")
    if choice.precision == "bfloat16":
        predictor.to(dtype=torch.bfloat16)
    elif choice.precision == "int8":
        quantize_dynamic(predictor)
    elif choice.precision != "float32":
        raise ValueError(f"AnomalyCLIP has no {choice.precision} path")
    predictor.precision = choice
    logger.info("AnomalyCLIP in %s (%s)", choice.precision, choice.reason)
    return predictor

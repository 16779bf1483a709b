"""ONNX export of the image path, and an ONNX Runtime model with AnomalyCLIP's ``predict``.

The exported graph takes preprocessed images (B, 3, S, S) to image scores (B,) and
smoothed anomaly maps (B, S, S) at model resolution. The text features are constants in
it, so a deployment needs neither the text tower nor the tokenizer, and the graph holds
only the visual tower's weights. The configuration travels in the model's metadata;
:class:`OnnxAnomalyModel` reads it back, so an exported file is all ``predict`` needs::

    export_onnx(AnomalyCLIP.from_pretrained("mvtec"), "anomalyclip.onnx")
    OnnxAnomalyModel("anomalyclip.onnx").predict(["part.png"])
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import PreProcessor
from anomalyclip.utils.atomic import atomic_open

logger = logging.getLogger(__name__)

FORMAT = "anomalyclip-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "maps")
DEFAULT_OPSET = 17

Quantization = Literal["none", "int8"]


class ImagePath(nn.Module):
    """AnomalyCLIP's image path with the text features frozen in: what is exported.

    It computes what :meth:`AnomalyCLIP.forward` does, except that the Gaussian smoothing
    runs in float32 (ONNX Runtime's CPU MatMul has no float64), within 1e-6 of it.
    """

    text_features: Tensor  # a buffer, registered in __init__

    def __init__(self, model: AnomalyCLIP, object_name: str | None = None) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            text = model.text_features(object_name).detach().float().clone()
        self.register_buffer("text_features", text)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        embeddings = self.model.encode_image(images)
        output = self.model.score(embeddings, self.text_features, smoothing_dtype=torch.float32)
        return output.image_scores, output.anomaly_maps


def _metadata_suffix(model: AnomalyCLIP, object_name: str | None) -> bytes:
    """A serialised ModelProto holding only our metadata: configuration, backbone
    identity and post-processing (map range, calibrated thresholds).

    Protocol buffers merge concatenated messages (repeated fields append), so writing
    this after the exported graph adds the metadata without loading and re-serialising
    a gigabyte of weights.
    """
    import onnx

    entries = {
        "anomalyclip_format": FORMAT,
        "anomalyclip_format_version": str(FORMAT_VERSION),
        "anomalyclip_config": json.dumps(model.config.to_dict(), default=str, allow_nan=False),
        "anomalyclip_backbone": json.dumps(model.backbone.to_dict(), default=str, allow_nan=False),
        "anomalyclip_postprocessor": json.dumps(model.postprocessor.to_dict(), allow_nan=False),
        "anomalyclip_object_name": object_name or model.config.object_name,
    }
    proto = onnx.ModelProto()
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def quantize_onnx(source: str | Path, target: str | Path) -> Path:
    """ONNX Runtime's dynamic int8 quantisation of an exported model's weight MatMuls.

    Weights per output channel, activations per tensor at run time, as the torch path
    (:mod:`anomalyclip.methods.anomalyclip.quantize`); the metadata is kept. Weights use 7 bits of
    range, as
    torch's fbgemm does: on CPUs without VNNI (AVX2 only) ONNX Runtime's u8 x s8 products
    saturate in 16 bits with 8-bit weights, which made scores differ by 0.03 instead of
    0.006 on the test model.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # ORT's generic advice on every call; the weight MatMuls are quantised without it.
    advice = _DropMessage("run pre-processing before quantization")
    logging.getLogger().addFilter(advice)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as folder:
            quantized = Path(folder) / "quantized.onnx"
            quantize_dynamic(
                source,
                quantized,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,
            )
            os.replace(quantized, target)  # same folder: complete or absent
    finally:
        logging.getLogger().removeFilter(advice)
    return target


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def export_onnx(
    model: AnomalyCLIP,
    path: str | Path,
    *,
    object_name: str | None = None,
    quantize: Quantization = "none",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write ``model``'s image path as ONNX (batch size free, image size fixed).

    ``quantize="int8"`` additionally runs ONNX Runtime's dynamic int8 quantisation of the
    linear layers (about 4x smaller; see ``benchmarks/`` for speed and deviation). The
    model must be in float32: export before
    :func:`anomalyclip.methods.anomalyclip.quantize.quantize_dynamic`.
    """
    from anomalyclip.methods.anomalyclip.quantize import is_quantized

    if quantize not in ("none", "int8"):
        raise ValueError(f"quantize must be 'none' or 'int8', got {quantize!r}")
    if is_quantized(model) or model.dtype != torch.float32:
        raise ValueError(
            "export needs the float32 model (ask for int8 with quantize='int8'), got "
            + ("a torch-quantised model" if is_quantized(model) else str(model.dtype))
        )
    path = Path(path)
    wrapper = ImagePath(model.eval(), object_name).eval()
    size = model.config.image_size
    example = torch.zeros(1, 3, size, size, device=model.device)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    float_path = path if quantize == "none" else path.with_name(f".{path.name}.float32.tmp")
    with warnings.catch_warnings():
        # Sizes become constants of the graph (the image size is fixed by design), and
        # the TorchScript exporter is still the one that needs no extra packages.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad(), atomic_open(float_path, "wb") as handle:
            torch.onnx.export(
                wrapper,
                (example,),
                # torch types f as a path only, but the TorchScript exporter (dynamo=False)
                # writes to file objects too
                handle,  # type: ignore[arg-type]
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
            )
            handle.write(_metadata_suffix(model, object_name))
    if quantize == "int8":
        try:
            quantize_onnx(float_path, path)
        finally:
            float_path.unlink(missing_ok=True)
    logger.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def output_deviation(
    reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray]
) -> dict[str, float]:
    """How far (scores, maps) of a faster engine are from the float32 reference's."""
    ref_scores, ref_maps = (np.asarray(a, dtype=np.float64) for a in reference)
    scores, maps = (np.asarray(a, dtype=np.float64) for a in candidate)
    return {
        "max_abs_score_difference": float(np.abs(ref_scores - scores).max()),
        "max_abs_map_difference": float(np.abs(ref_maps - maps).max()),
        "map_correlation": float(np.corrcoef(ref_maps.ravel(), maps.ravel())[0, 1]),
    }


def compare_with_torch(
    model: AnomalyCLIP,
    onnx_model: OnnxAnomalyModel,
    images: Tensor | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`output_deviation` of an exported model from ``model`` (one random image
    unless ``images`` are given)."""
    if images is None:
        size = model.config.image_size
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(1, 3, size, size, generator=generator)
    with torch.no_grad():
        expected = model(images.to(model.device))
    reference = (expected.image_scores.cpu().numpy(), expected.anomaly_maps.cpu().numpy())
    return output_deviation(reference, onnx_model(images))


def default_providers() -> list[str]:
    """CUDA where this ONNX Runtime build has it, then the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxAnomalyModel(Predictor):
    """An exported model run by ONNX Runtime: the same :class:`Predictor` as the torch model.

    ``providers`` defaults to :func:`default_providers`;
    ``threads`` caps intra-op threads (default: ONNX Runtime's choice, all cores).

    Memory: with glibc, freed activation buffers of this graph are mostly not reused, so
    the peak grows with the number of layers; ``MALLOC_MMAP_THRESHOLD_=131072`` in the
    environment brings ViT-L at 518 px in float32 from 2.7 to 1.9 GB. The int8 graph
    needs more still (peak 4.5 GB at batch 1, 7.8 GB at batch 2); prefer
    :mod:`anomalyclip.methods.anomalyclip.quantize` where memory is tight.
    """

    method = "anomalyclip"

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} not found")
        options = onnxruntime.SessionOptions()
        # ONNX Runtime's arena kept growing from run to run (3.8, then 6.7 GB for ViT-L in
        # int8 at 518 px); without it the peak stays where the first run put it.
        options.enable_cpu_mem_arena = False
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path),
                options,
                providers=list(providers or default_providers()),
            )
        except Exception as error:  # noqa: BLE001 - ORT raises its own untyped errors
            raise ValueError(f"{self.path} is not a loadable ONNX model: {error}") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if metadata.get("anomalyclip_format") != FORMAT:
            raise ValueError(
                f"{self.path} was not exported by anomalyclip (no '{FORMAT}' metadata); "
                "export with `anomalyclip export`"
            )
        if int(metadata.get("anomalyclip_format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{self.path} was written by a newer anomalyclip; upgrade it")
        self.config = AnomalyCLIPConfig.from_dict(json.loads(metadata["anomalyclip_config"]))
        self.backbone = json.loads(metadata.get("anomalyclip_backbone", "{}"))
        self.object_name = metadata.get("anomalyclip_object_name", self.config.object_name)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def preprocessor(self) -> PreProcessor:
        return self.config.preprocessor()

    @property
    def postprocessor(self) -> PostProcessor:
        """Map range and calibrated thresholds, from the configuration exported with it."""
        return self.config.postprocessor()

    def settings(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "backbone_identity": self.backbone, "engine": "onnx"}

    def __call__(self, images: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B,) and smoothed maps (B, S, S) for preprocessed images (B, 3, S, S)."""
        if isinstance(images, Tensor):
            images = images.detach().cpu().numpy()
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(
                f"{self.path} takes images of shape (B, 3, {size}, {size}), got {images.shape}"
            )
        scores, maps = self.session.run(
            list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)}
        )
        return scores, maps

    def score_tensors(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self(images)

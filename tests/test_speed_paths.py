"""The fast paths compute what the plain ones do: last-layer shortcut, in-place activation,
cached positional embeddings, single-copy loading, half precision and dynamic int8."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from anomalyclip.backbone.clip import CLIP, QuickGELU
from anomalyclip.maps import gaussian_smooth, smoothing_matrix
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.methods.anomalyclip.quantize import is_quantized, quantize_dynamic
from tests.conftest import REPO_ROOT
from tests.factories import tiny_clip

SETTINGS = dict(
    image_size=48, features=(2, 4), dpam_layers=3, n_ctx=4, prompt_depth=2, deep_prompt_length=2
)


def tiny_model(**overrides) -> AnomalyCLIP:
    return AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**{**SETTINGS, **overrides}))


def images(count: int = 2, size: int = 48) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(3))


def every_token_features(visual, x, layers, dpam_layers, global_head):
    """The tower with the original stream computed for every token in every layer."""
    blocks = visual.transformer.resblocks
    h, _ = visual.embed(x)
    dpam = None
    collected = {}
    for index, block in enumerate(blocks):
        if index >= len(blocks) - dpam_layers:
            dpam = h if dpam is None else dpam
            h, residual = block.forward_dpam(h, "vv", "all")
            dpam = dpam + residual
        else:
            h = block(h)
        if index + 1 in layers:
            collected[index + 1] = visual.ln_post(h if dpam is None else dpam) @ visual.proj
    head = h[:, 0] if global_head == "original" else visual.ln_post(h[:, 0])
    return head @ visual.proj, collected


@pytest.mark.parametrize(
    ("layers", "dpam_layers", "global_head"),
    [((2, 4), 3, "original"), ((2,), 0, "clip"), ((1, 3), 2, "original"), ((4,), 0, "original")],
)
def test_last_layer_shortcut_gives_the_same_features(layers, dpam_layers, global_head):
    visual = tiny_clip().visual
    x = images()
    last_mlp_inputs = []
    visual.transformer.resblocks[-1].mlp.register_forward_hook(
        lambda module, inputs, output: last_mlp_inputs.append(inputs[0].shape[1])
    )
    with torch.no_grad():
        fast = visual.forward_features(x, layers, dpam_layers, "vv", global_head)
        expected_head, expected_tokens = every_token_features(
            visual, x, layers, dpam_layers, global_head
        )
    torch.testing.assert_close(fast.global_embedding, expected_head, atol=1e-6, rtol=1e-5)
    assert sorted(fast.patch_tokens) == sorted(layers)
    for layer in layers:
        torch.testing.assert_close(
            fast.patch_tokens[layer], expected_tokens[layer], atol=1e-6, rtol=1e-5
        )
    # The shortcut ran: the last MLP saw the class token alone, unless the last layer's
    # tokens are themselves requested (without DPAM they come from the original stream).
    full_last_layer = dpam_layers == 0 and 4 in layers
    assert last_mlp_inputs[0] == (1 + 6 * 6 if full_last_layer else 1)


def test_no_original_stream_when_nothing_reads_it():
    visual = tiny_clip().visual
    calls = []
    visual.transformer.resblocks[-1].mlp.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        fast = visual.forward_features(images(), (2, 4), 3, "vv", global_head=None)
        with_head = visual.forward_features(images(), (2, 4), 3, "vv", global_head="original")
    assert fast.global_embedding is None
    assert len(calls) == 1  # only the call with a global head ran the last MLP
    torch.testing.assert_close(fast.patch_tokens[4], with_head.patch_tokens[4])


def test_quick_gelu_without_autograd_is_exact_and_leaves_its_input():
    x = torch.randn(3, 5, 16)
    original = x.clone()
    expected = x * torch.sigmoid(1.702 * x)
    with torch.no_grad():
        fast = QuickGELU()(x)
    assert torch.equal(fast, expected)
    assert torch.equal(x, original)
    x.requires_grad_(True)
    QuickGELU()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_resized_positional_embedding_is_cached_and_weights_untouched():
    model = tiny_model(image_size=56)  # 7 x 7 patches, trained grid 4 x 4
    visual = model.clip.visual
    weights = visual.positional_embedding.detach().clone()
    with torch.no_grad():
        first = model(images(1, 56)).anomaly_maps
        cached = visual.positional_embedding_for(7, 7)
        second = model(images(1, 56)).anomaly_maps
    assert torch.equal(visual.positional_embedding, weights)
    assert cached.shape == (1 + 49, visual.positional_embedding.shape[1])
    assert visual.positional_embedding_for(7, 7) is cached
    assert len(visual._resized_positions) == 1
    assert torch.equal(first, second)


def test_from_state_dict_copies_once_into_the_requested_dtype():
    source = tiny_clip()
    state = {k: v.half() for k, v in source.state_dict().items()}
    model = CLIP.from_state_dict(state)
    parameters = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in parameters.values())
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    torch.testing.assert_close(parameters[key], state[key].float())
    state[key].zero_()  # the model owns its weights
    assert parameters[key].abs().sum() > 0
    bf16 = CLIP.from_state_dict(state, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_from_state_dict_can_consume_its_input():
    state = {k: v.half() for k, v in tiny_clip().state_dict().items()}
    state["input_resolution"] = torch.tensor(32)  # OpenAI's bookkeeping stays behind
    expected = state["visual.proj"].float()
    model = CLIP.from_state_dict(state, consume=True)
    assert list(state) == ["input_resolution"]
    torch.testing.assert_close(model.visual.proj, expected)
    same_dtype = dict(tiny_clip().state_dict())
    pointer = same_dtype["visual.proj"].data_ptr()
    adopted = CLIP.from_state_dict(same_dtype, consume=True)
    assert adopted.visual.proj.data_ptr() == pointer  # adopted, not copied


def test_smoothing_matrix_is_scipys_filter():
    matrix = smoothing_matrix(23, 2.0)
    np.testing.assert_allclose(matrix.sum(dim=1).numpy(), 1.0, atol=1e-12)
    impulse = np.zeros(23)
    impulse[0] = 1.0
    column = gaussian_filter(impulse, 2.0)  # response to position 0 = column 0 of the matrix
    np.testing.assert_allclose(matrix[:, 0].numpy(), column, atol=1e-15)
    maps = torch.rand(2, 23, 31)
    expected = np.stack([gaussian_filter(m, sigma=2.0) for m in maps.double().numpy()])
    single = gaussian_smooth(maps, 2.0, compute_dtype=torch.float32)
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), expected, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = gaussian_smooth(maps, 2.0)
    np.testing.assert_allclose(under_autocast.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_stays_close_to_float32(dtype):
    model = tiny_model()
    x = images()
    with torch.no_grad():
        reference = model(x)
        try:
            half = model.to(dtype=dtype)(x)
        except RuntimeError as error:  # an old CPU build without half kernels
            pytest.skip(f"{dtype} not supported on this CPU: {error}")
    assert half.image_scores.dtype == torch.float32
    assert half.anomaly_maps.dtype == torch.float32
    tolerance = 0.02 if dtype == torch.float16 else 0.08
    assert (half.image_scores - reference.image_scores).abs().max() < tolerance
    assert (half.anomaly_maps - reference.anomaly_maps).abs().max() < tolerance
    assert (half.anomaly_maps - reference.anomaly_maps).abs().max() > 0


def test_autocast_keeps_scores_and_maps_in_float32():
    model = tiny_model()
    x = images()
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert mixed.anomaly_maps.dtype == torch.float32
    assert (mixed.anomaly_maps - reference.anomaly_maps).abs().max() < 0.05
    assert (mixed.image_scores - reference.image_scores).abs().max() < 0.02


def test_dynamic_int8_deviation_is_small():
    model = tiny_model()
    x = images(3)
    with torch.no_grad():
        reference = model(x)
        text = model.text_features().clone()
    assert quantize_dynamic(model) is model and is_quantized(model)
    block = model.clip.visual.transformer.resblocks[0]
    assert "in_proj_weight" not in dict(block.attn.named_parameters())
    assert type(block.mlp.c_fc).__module__.startswith("torch.ao.nn.quantized.dynamic")
    with torch.no_grad():
        quantized = model(x)
    torch.testing.assert_close(model.text_features(), text)  # the text tower is untouched
    score_difference = (quantized.image_scores - reference.image_scores).abs().max().item()
    map_difference = (quantized.anomaly_maps - reference.anomaly_maps).abs().max().item()
    correlation = np.corrcoef(
        quantized.anomaly_maps.flatten().numpy(), reference.anomaly_maps.flatten().numpy()
    )[0, 1]
    assert 0 < score_difference < 0.01
    assert 0 < map_difference < 0.02
    assert correlation > 0.999
    with pytest.raises(ValueError, match="already quantised"):
        quantize_dynamic(model)


def test_dynamic_int8_needs_a_float32_cpu_model():
    model = tiny_model().to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 model on the CPU.*bfloat16"):
        quantize_dynamic(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_matches_cpu_float32(dtype):
    model = tiny_model()
    x = images()
    with torch.no_grad():
        reference = model(x)
        gpu = model.to(device="cuda", dtype=dtype)(x.cuda())
    assert gpu.anomaly_maps.device.type == "cuda"
    assert gpu.anomaly_maps.dtype == torch.float32
    assert (gpu.image_scores.cpu() - reference.image_scores).abs().max() < 0.08
    assert (gpu.anomaly_maps.cpu() - reference.anomaly_maps).abs().max() < 0.08


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    output = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "bench_inference.py"),
        "--quick",
        "--engines",
        "torch-fp32",
        "onnx-fp32",
        "--batch-sizes",
        "1",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--output",
        str(output),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "| engine | batch | s / image |" in completed.stdout
    data = json.loads(output.read_text())
    results = {r["engine"]: r for r in data["results"]}
    assert sorted(results) == ["onnx-fp32", "torch-fp32"]
    assert [b["batch_size"] for b in results["torch-fp32"]["batches"]] == [1, 2]
    assert all(b["seconds_per_image"] > 0 for b in results["onnx-fp32"]["batches"])
    assert results["torch-fp32"]["batches"][0]["peak_rss_mb"] > 50
    assert results["onnx-fp32"]["deviation"]["max_abs_score_difference"] < 1e-4
    assert results["onnx-fp32"]["deviation"]["map_correlation"] > 0.9999

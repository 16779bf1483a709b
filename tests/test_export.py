"""ONNX export: ONNX Runtime gives PyTorch's scores and maps, from the API and the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from anomalyclip.methods.anomalyclip.checkpoint import save_checkpoint
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.methods.anomalyclip.onnx import OnnxAnomalyModel, export_onnx, output_deviation
from anomalyclip.methods.anomalyclip.quantize import quantize_dynamic
from anomalyclip.preprocess import ImageLoadError
from tests.factories import tiny_clip

ATOL = 1e-4
SETTINGS = dict(
    image_size=48,
    features=(1, 2, 4),
    dpam_layers=3,
    n_ctx=4,
    prompt_depth=3,
    deep_prompt_length=2,
    image_threshold=0.45,
)


def tiny_model(clip=None) -> AnomalyCLIP:
    return AnomalyCLIP(clip or tiny_clip(), AnomalyCLIPConfig(**SETTINGS)).eval()


def random_images(count: int, size: int = 48) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[AnomalyCLIP, Path]:
    model = tiny_model()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, path


def test_onnx_runtime_matches_pytorch_for_any_batch_size(exported):
    model, path = exported
    onnx_model = OnnxAnomalyModel(path)
    for batch in (1, 3):  # exported with batch 1: the batch axis is free
        images = random_images(batch)
        with torch.no_grad():
            expected = model(images)
        scores, maps = onnx_model(images)
        assert scores.shape == (batch,) and maps.shape == (batch, 48, 48)
        np.testing.assert_allclose(scores, expected.image_scores.numpy(), atol=ATOL)
        np.testing.assert_allclose(maps, expected.anomaly_maps.numpy(), atol=ATOL)


def test_graph_holds_the_text_features_and_not_the_text_tower(exported):
    model, path = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["scores", "maps"]
    with torch.no_grad():
        text = model.text_features().numpy()
    constants = [onnx.numpy_helper.to_array(t) for t in graph.initializer]
    constants += [
        onnx.numpy_helper.to_array(a.t)
        for node in graph.node
        if node.op_type == "Constant"
        for a in node.attribute
        if a.name == "value"
    ]
    folded = [c.T if c.shape == text.T.shape else c for c in constants]  # may be transposed
    assert any(c.shape == text.shape and np.allclose(c, text) for c in folded)
    token_embedding = model.clip.token_embedding.weight.shape
    assert not any(c.shape == token_embedding for c in constants)


def test_configuration_travels_in_the_metadata(exported):
    model, path = exported
    onnx_model = OnnxAnomalyModel(path)
    assert onnx_model.config == model.config
    assert onnx_model.object_name == "object"
    assert onnx_model.providers[-1] == "CPUExecutionProvider"
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["anomalyclip_config"])["image_threshold"] == 0.45


def test_predict_gives_the_torch_models_predictions(exported, tmp_path):
    model, path = exported
    generator = np.random.default_rng(0)
    pictures = [
        Image.fromarray(generator.integers(0, 255, (30, 40, 3), dtype=np.uint8)),
        Image.fromarray(generator.integers(0, 255, (64, 50), dtype=np.uint8)),  # grayscale
    ]
    file = tmp_path / "part.png"
    pictures[0].save(file)
    sources = [*pictures, file]
    expected = model.predict(sources, batch_size=2)
    predictions = OnnxAnomalyModel(path).predict(sources, batch_size=2)
    assert [p.source for p in predictions] == [p.source for p in expected]
    assert predictions[2].source == str(file)
    for got, want in zip(predictions, expected, strict=True):
        assert got.score == pytest.approx(want.score, abs=ATOL)
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=ATOL)
        assert got.anomaly_map.dtype == np.float32
        assert got.original_size == want.original_size
        assert got.threshold == 0.45 and got.is_anomalous == (got.score >= 0.45)
    assert predictions[1].original_size == (50, 64)  # width, height
    assert predictions[1].map_at_original_size().shape == (64, 50)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="broken.png"):
        OnnxAnomalyModel(path).predict([file, broken])


def test_int8_export_is_smaller_and_close(exported, tmp_path):
    model, path = exported
    quantized_path = export_onnx(model, tmp_path / "int8.onnx", quantize="int8")
    quantized = OnnxAnomalyModel(quantized_path)
    assert quantized.config == model.config
    assert quantized_path.stat().st_size < 0.6 * path.stat().st_size
    images = random_images(2)
    deviation = output_deviation(OnnxAnomalyModel(path)(images), quantized(images))
    assert 0 < deviation["max_abs_score_difference"] < 0.02
    assert deviation["map_correlation"] > 0.99
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_export_refuses_what_it_cannot_export(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="quantize must be"):
        export_onnx(model, tmp_path / "a.onnx", quantize="int4")
    quantize_dynamic(model)
    with pytest.raises(ValueError, match="torch-quantised"):
        export_onnx(model, tmp_path / "b.onnx")
    with pytest.raises(ValueError, match="bfloat16"):
        export_onnx(tiny_model().to(dtype=torch.bfloat16), tmp_path / "c.onnx")
    assert not list(tmp_path.iterdir())


def test_loading_reports_bad_files(exported, tmp_path):
    _, path = exported
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxAnomalyModel(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00 certainly not a protobuf")
    with pytest.raises(ValueError, match="garbage.onnx is not a loadable ONNX model"):
        OnnxAnomalyModel(garbage)
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    with pytest.raises(ValueError, match="foreign.onnx was not exported by anomalyclip"):
        OnnxAnomalyModel(foreign)
    with pytest.raises(ValueError, match=r"shape \(B, 3, 48, 48\), got \(1, 3, 32, 32\)"):
        OnnxAnomalyModel(path)(np.zeros((1, 3, 32, 32), dtype=np.float32))


def test_cli_export_writes_a_model_that_predict_can_use(tmp_path, caplog):
    from anomalyclip.cli import main

    # One head per 64 channels, as a loader infers from the tensors of a state dict.
    clip = tiny_clip(vision_heads=1, text_heads=1)
    clip_path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), clip_path)
    model = tiny_model(clip)
    with torch.no_grad():
        model.prompt_learner.ctx_pos.add_(0.5)  # trained-looking prompts, not the init
    checkpoint = save_checkpoint(tmp_path / "prompts.pt", model)
    output = tmp_path / "exported" / "model.onnx"
    arguments = ["--checkpoint", checkpoint, "--clip-weights", clip_path, "--output", output]
    with caplog.at_level(logging.INFO):
        code = main(["export", *map(str, arguments)])
    assert code == 0
    assert "ONNX Runtime vs PyTorch on a random input: max |score difference|" in caplog.text
    onnx_model = OnnxAnomalyModel(output)
    assert onnx_model.config.image_size == 48 and onnx_model.config.features == (1, 2, 4)
    images = random_images(2)
    with torch.no_grad():
        expected = model(images)
    scores, maps = onnx_model(images)
    np.testing.assert_allclose(scores, expected.image_scores.numpy(), atol=ATOL)
    np.testing.assert_allclose(maps, expected.anomaly_maps.numpy(), atol=ATOL)
    assert (
        main(
            [
                "export",
                *map(str, arguments[:4]),
                "--output",
                str(tmp_path / "x.onnx"),
                "--quantize",
                "int8",
                "--no-check",
            ]
        )
        == 0
    )
    assert OnnxAnomalyModel(tmp_path / "x.onnx").config == onnx_model.config

    image = tmp_path / "part.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 50, 3), np.uint8)).save(image)
    results = tmp_path / "onnx.jsonl"
    assert main(["predict", str(image), "--onnx", str(output), "--output", str(results)]) == 0
    record = json.loads(results.read_text())
    expected_score = model.predict([image])[0].score
    assert record["image"] == str(image)
    assert abs(record["score"] - expected_score) < ATOL


def test_the_inspection_workflow_runs_on_the_onnx_model(exported, tmp_path):
    from anomalyclip.inspection.run import inspect

    model, path = exported
    folder = tmp_path / "images"
    folder.mkdir()
    generator = np.random.default_rng(1)
    for name in ("a.png", "b.png", "c.png"):
        pixels = generator.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    summary = inspect(
        folder, OnnxAnomalyModel(path), tmp_path / "out", batch_size=2, progress=False
    )
    expected = model.predict(sorted(folder.iterdir()))
    assert [r.score for r in summary.results] == pytest.approx(
        [p.score for p in expected], abs=ATOL
    )
    assert summary.image_threshold == 0.45
    assert (tmp_path / "out" / "predictions.jsonl").read_text().count("\n") == 3

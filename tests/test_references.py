"""Few-shot AnomalyCLIP: maps and scores against a literal re-derivation of the rule in
``methods/references.py``, bank files, and clear errors for references that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.few_shot import (
    FewShotAnomalyCLIP,
    ReferenceBank,
    ReferenceError,
    build_bank,
)
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from tests.factories import tiny_clip

SIZE = 64  # a 8 x 8 grid with the tiny CLIP's 8-pixel patches


def tiny_model(features=(2, 4), **changes) -> AnomalyCLIP:
    fields = dict(
        image_size=SIZE,
        features=features,
        dpam_layers=2,
        n_ctx=4,
        prompt_depth=2,
        deep_prompt_length=2,
    )
    config = AnomalyCLIPConfig(**{**fields, **changes})
    return AnomalyCLIP(tiny_clip(), config).eval()


def noise_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(count)
    ]


def patch_vectors(model: AnomalyCLIP, images: list[Image.Image]) -> dict[int, np.ndarray]:
    """layer -> (images, patches, width) float64, L2-normalised, class token dropped."""
    embeddings = model.encode_image(model.preprocess(images))
    return {k: v[:, 1:].double().numpy() for k, v in embeddings.patch_tokens.items()}


def literal_distance_map(tokens: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """(patches,) 1 - max cosine, one patch and one bank entry at a time."""
    out = np.empty(len(tokens))
    for p, vector in enumerate(tokens):
        out[p] = 1 - max(float(vector @ entry) for entry in bank)
    return out


def literal_reference_max(vectors: dict[int, np.ndarray], grid: int) -> float:
    count = next(iter(vectors.values())).shape[0]
    maxima = []
    for i in range(count):
        total = np.zeros(grid * grid)
        for layer_vectors in vectors.values():
            if count > 1:
                others = np.concatenate([layer_vectors[j] for j in range(count) if j != i])
                total += literal_distance_map(layer_vectors[i], others)
            else:
                for p in range(grid * grid):
                    row, column = divmod(p, grid)
                    far = [
                        layer_vectors[0][q]
                        for q in range(grid * grid)
                        if abs(q // grid - row) > 1 or abs(q % grid - column) > 1
                    ]
                    total[p] += 1 - max(float(layer_vectors[0][p] @ v) for v in far)
        maxima.append(total.max())
    return max(maxima)


def bilinear(grid_map: np.ndarray, size: int) -> np.ndarray:
    tensor = torch.from_numpy(grid_map)[None, None]
    return torch.nn.functional.interpolate(tensor, (size, size), mode="bilinear")[0, 0].numpy()


@pytest.mark.parametrize(("features", "references"), [((2, 4), 3), ((1, 2, 3, 4), 1), ((3,), 5)])
def test_maps_and_scores_match_the_literal_rule(features, references):
    model = tiny_model(features)
    good, tests = noise_images(references, seed=1), noise_images(2, seed=2)
    few_shot = FewShotAnomalyCLIP.from_images(model, good)
    bank_vectors = patch_vectors(model, good)
    grid = SIZE // 8
    expected_max = literal_reference_max(bank_vectors, grid)
    assert few_shot.bank.reference_max == pytest.approx(expected_max, abs=1e-5)

    test_vectors = patch_vectors(model, tests)
    zero_shot = model(model.preprocess(tests))
    predictions = few_shot.predict_images(tests)
    for index, prediction in enumerate(predictions):
        coarse = sum(
            literal_distance_map(
                test_vectors[layer][index], bank_vectors[layer].reshape(-1, vectors.shape[-1])
            ).reshape(grid, grid)
            for layer, vectors in bank_vectors.items()
        )
        reference = bilinear(coarse, SIZE)
        raw = zero_shot.raw_maps[index].double().numpy() + reference
        expected_map = gaussian_filter(raw, model.config.sigma)
        assert prediction.anomaly_map == pytest.approx(expected_map, abs=1e-4)
        ratio = reference.max() / expected_max
        # the peaks of the map's two terms: the zero-shot map's (a mean layer probability)
        # and the reference map's against the references' own (issue 24, item 1)
        peak = float(zero_shot.anomaly_maps[index].max()) / len(model.config.features)
        expected_score = (peak + ratio / (1 + ratio)) / 2
        assert prediction.score == pytest.approx(expected_score, abs=1e-5)


def test_a_reference_scores_low_and_an_odd_image_high():
    model = tiny_model()
    good = noise_images(4, seed=3)
    few_shot = FewShotAnomalyCLIP.from_images(model, good)
    own = few_shot.predict_images(good[:1])[0]
    odd = few_shot.predict_images([Image.new("RGB", (SIZE, SIZE), (250, 10, 10))])[0]
    assert own.anomaly_map.max() < odd.anomaly_map.max()
    assert own.score < odd.score


def test_bank_files_round_trip_in_float16_and_refuse_another_model(tmp_path):
    model = tiny_model()
    bank = build_bank(model, noise_images(2, seed=4))
    stored = bank.to(torch.float16)
    path = stored.save(tmp_path / "line3.bank.pt")
    loaded = ReferenceBank.load(path)
    # the identity is the stored content's, recomputed on load
    assert loaded.digest == stored.digest != bank.digest and loaded.count == 2
    assert loaded.patches[2].dtype == torch.float16
    assert loaded.nbytes == bank.nbytes // 2
    tests = noise_images(1, seed=5)
    exact = FewShotAnomalyCLIP(model, bank).predict_images(tests)[0]
    halved = FewShotAnomalyCLIP(model, loaded).predict_images(tests)[0]
    assert halved.score == pytest.approx(exact.score, abs=1e-3)
    with pytest.raises(ReferenceError, match=r"another model \(image_size: bank 64, model 96\)"):
        FewShotAnomalyCLIP(tiny_model(image_size=96), loaded)
    with pytest.raises(ReferenceError, match="features: bank \\[2, 4\\], model \\[1, 4\\]"):
        FewShotAnomalyCLIP(tiny_model((1, 4)), loaded)


def test_bad_reference_sets_are_named(tmp_path):
    model = tiny_model()
    with pytest.raises(ReferenceError, match="no reference images given"):
        build_bank(model, [])
    broken = tmp_path / "good_1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ReferenceError, match="good_1.png"):
        build_bank(model, [broken])
    not_a_bank = tmp_path / "x.pt"
    torch.save({"format": "other"}, not_a_bank)
    with pytest.raises(ReferenceError, match="is not a reference bank"):
        ReferenceBank.load(not_a_bank)


def test_zero_shot_thresholds_do_not_carry_over_to_the_few_shot_map():
    model = tiny_model(image_threshold=0.4, pixel_threshold=0.9)
    few_shot = FewShotAnomalyCLIP.from_images(model, noise_images(2, seed=6))
    post = few_shot.postprocessor
    assert (post.image_threshold, post.pixel_threshold) == (None, None)
    assert post.map_range == (0.0, 4.0)  # two layers: zero-shot [0, 2] plus up to 1 each
    assert few_shot.settings()["references"]["count"] == 2


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_references.py"
    output = tmp_path / "references.json"
    command = [sys.executable, str(script), "--quick", "--counts", "1", "3"]
    completed = subprocess.run(
        [*command, "--threads", "1", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "| references | bank build s |" in completed.stdout
    rows = json.loads(output.read_text())["results"]
    assert [row["references"] for row in rows] == [1, 3]
    assert all(row["search_deviation"] < 1e-4 for row in rows)
    assert rows[1]["bank_mb"] > rows[0]["bank_mb"]


def test_an_image_threshold_calibrated_on_the_earlier_score_rule_is_not_applied(caplog):
    """Issue 24, item 1: the image score became the map's peaks; a threshold calibrated on
    the zero-shot global probability would be applied to another distribution."""
    import logging

    from anomalyclip.calibration import Calibration

    good = noise_images(3, seed=5)
    bank = FewShotAnomalyCLIP.from_images(tiny_model(), good).bank
    calibration = Calibration(0.61, 1.7, "quantile", "quantile", 3, 0, 0, 0.99, 0.999)
    current = calibration.apply(tiny_model(), reference_bank=bank.digest)
    post = FewShotAnomalyCLIP(current, bank).postprocessor
    assert (post.image_threshold, post.pixel_threshold) == (0.61, 1.7)
    earlier = calibration.apply(tiny_model(), reference_bank=bank.digest)
    settings = dict(earlier.config.extra["calibrated_with"])
    del settings["reference_image_score"]  # what calibrations before the change recorded
    earlier.config = earlier.config.replace(
        extra={**earlier.config.extra, "calibrated_with": settings}
    )
    with caplog.at_level(logging.WARNING):
        post = FewShotAnomalyCLIP(earlier, bank).postprocessor
    assert (post.image_threshold, post.pixel_threshold) == (None, 1.7)
    assert "earlier rule (the zero-shot global probability) and is not applied" in caplog.text

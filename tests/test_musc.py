"""MuSc, number for number: the official code's vectors in shared/reference/musc, and a
literal re-derivation of every step (per-pair cdist, unfold + adaptive pooling, top-k
masks) on small random models of other shapes and settings."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomalyclip.methods.musc.model import (
    MuSc,
    MuScConfig,
    divide_indices,
    lnamd,
    mutual_scores,
    neighbour_count,
    rscin,
)
from tests.factories import tiny_clip

ATOL = 1e-4
LAYERS = (6, 12, 18, 24)
DEGREES = (1, 3, 5)


# the official code's vectors ------------------------------------------------------------


@pytest.fixture(scope="module")
def musc_reference(shared_dir):
    directory = shared_dir / "reference" / "musc"
    expected = dict(np.load(directory / "expected.npz"))
    meta = json.loads((directory / "expected.json").read_text())
    return expected, meta


@pytest.fixture(scope="module")
def reference_clip_file(reference_dir):
    return reference_dir / "clip_openai_layout.pt"


@pytest.fixture(scope="module")
def reference_musc(reference_clip_file, musc_reference):
    """MuSc with the official configuration, built through the public loader."""
    from anomalyclip.backbone.loading import load_clip

    _, meta = musc_reference
    config = MuScConfig(
        backbone=str(reference_clip_file),
        image_size=meta["image_size"],
        features=tuple(meta["feature_layers"]),
        degrees=tuple(meta["r_list"]),
        rscin_k=tuple(meta["k_list"]),
        interval=meta["topmin_max"],
    )
    return MuSc(load_clip(reference_clip_file), config)


@pytest.fixture(scope="module")
def reference_images(reference_musc, musc_reference, shared_dir):
    _, meta = musc_reference
    paths = [shared_dir / "datasets" / name for name in meta["images"]]
    return reference_musc.preprocessor(paths)


@pytest.fixture(scope="module")
def reference_run(reference_musc, reference_images):
    return reference_musc.run(reference_images, keep_features=True)


def test_official_configuration_is_the_default(musc_reference):
    _, meta = musc_reference
    config = MuScConfig()
    assert config.image_size == meta["image_size"]
    assert config.features == tuple(meta["feature_layers"])
    assert config.degrees == tuple(meta["r_list"])
    assert config.rscin_k == tuple(meta["k_list"])
    assert config.interval == meta["topmin_max"] and meta["topmin_min"] == 0
    assert config.backbone == "ViT-L/14@336px"


def test_preprocessing_is_open_clip_centre_crop(reference_musc, reference_images, musc_reference):
    expected, _ = musc_reference
    assert reference_musc.preprocessor.resize == "center-crop"
    images = reference_images[expected["subset"]].numpy()
    np.testing.assert_allclose(images, expected["image"], atol=ATOL)


def test_positional_table_resized_bicubically(reference_musc, musc_reference):
    expected, _ = musc_reference
    visual = reference_musc.clip.visual
    grid = reference_musc.grid
    with torch.no_grad():
        table = visual.positional_embedding_for(grid, grid, "bicubic").numpy()
    np.testing.assert_allclose(table, expected["resized_positional_embedding"], atol=ATOL)


@pytest.mark.parametrize("layer", LAYERS)
def test_raw_tokens(reference_run, musc_reference, layer):
    expected, _ = musc_reference
    tokens = reference_run.patch_tokens[layer][expected["subset"]]
    np.testing.assert_allclose(tokens, expected[f"patch_tokens_layer{layer}"], atol=ATOL)


def test_lnamd_vectors(reference_run, musc_reference):
    expected, _ = musc_reference
    vectors = reference_run.lnamd[(3, 6)][expected["subset"]]
    np.testing.assert_allclose(vectors, expected["lnamd_r3_layer6"], atol=ATOL)


@pytest.mark.parametrize("degree", DEGREES)
@pytest.mark.parametrize("layer", LAYERS)
def test_mutual_scores_per_degree_and_layer(reference_run, musc_reference, degree, layer):
    expected, _ = musc_reference
    scores = reference_run.msm[(degree, layer)]
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected[f"msm_r{degree}_layer{layer}"], atol=ATOL)


def test_patch_scores_maps_and_image_scores(reference_run, musc_reference):
    expected, _ = musc_reference
    np.testing.assert_allclose(reference_run.class_tokens, expected["class_tokens"], atol=ATOL)
    np.testing.assert_allclose(reference_run.patch_scores, expected["patch_scores"], atol=ATOL)
    assert reference_run.anomaly_maps.dtype == np.float32
    np.testing.assert_allclose(reference_run.anomaly_maps, expected["anomaly_map"], atol=ATOL)
    np.testing.assert_allclose(
        reference_run.image_scores_raw, expected["image_score_raw"], atol=ATOL
    )
    np.testing.assert_allclose(reference_run.image_scores, expected["image_score"], atol=ATOL)


def test_rscin_alone_on_the_official_inputs(musc_reference):
    expected, meta = musc_reference
    smoothed = rscin(expected["image_score_raw"], expected["class_tokens"], meta["k_list"])
    np.testing.assert_allclose(smoothed, expected["image_score"], atol=1e-6)


def test_predict_through_the_seam(reference_musc, musc_reference, shared_dir):
    """Predictor.predict scores the whole list as one set, whatever the batch size."""
    expected, meta = musc_reference
    paths = [shared_dir / "datasets" / name for name in meta["images"]]
    predictions = reference_musc.predict(paths, batch_size=3)
    scores = np.array([p.score for p in predictions])
    np.testing.assert_allclose(scores, expected["image_score"], atol=ATOL)
    np.testing.assert_allclose(predictions[5].anomaly_map, expected["anomaly_map"][5], atol=ATOL)
    assert predictions[0].map_range == (0.0, 2.0)
    assert reference_musc.settings()["degrees"] == [1, 3, 5]


# a literal re-derivation ------------------------------------------------------------------


def literal_lnamd(tokens: torch.Tensor, degree: int) -> torch.Tensor:
    """The official _LNAMD: LayerNorm over (C, g, g), unfold r x r, adaptive average pool
    from C r^2 to C values, then L2 normalisation (float64)."""
    batch, count, channels = tokens.shape
    side = int(math.sqrt(count - 1))
    x = tokens[:, 1:].double().reshape(batch, side, side, channels).permute(0, 3, 1, 2)
    x = F.layer_norm(x, x.shape[1:], eps=1e-5)
    if degree == 1:
        patches = x.flatten(2).transpose(1, 2)
    else:
        unfolded = F.unfold(x, degree, padding=(degree - 1) // 2, stride=1)  # (B, C r^2, L)
        flat = unfolded.transpose(1, 2).reshape(-1, 1, channels * degree * degree)
        patches = F.adaptive_avg_pool1d(flat, channels).reshape(batch, side * side, channels)
    return patches / patches.norm(dim=-1, keepdim=True)


def literal_mutual_scores(vectors: torch.Tensor, interval: float = 0.3) -> torch.Tensor:
    """The official compute_scores_fast, image by image, pair by pair, float64 cdist."""
    count = len(vectors)
    vectors = vectors.double()
    keep = int((count - 1) * interval)
    scores = []
    for i in range(count):
        nearest = torch.stack(
            [
                torch.cdist(vectors[i], vectors[j], compute_mode="donot_use_mm_for_euclid_dist")
                .min(dim=1)
                .values
                for j in range(count)
                if j != i
            ],
            dim=1,
        )  # (L, N - 1)
        values = torch.topk(nearest, keep, dim=1, largest=False).values
        scores.append(values.mean(dim=1))
    return torch.stack(scores)


def literal_rscin(scores: np.ndarray, embeddings: np.ndarray, k_list) -> np.ndarray:
    s = (scores - scores.min()) / (scores.max() - scores.min())
    similarity = torch.tensor(embeddings @ embeddings.T, dtype=torch.float64)
    results = []
    for k in k_list:
        values, index = torch.topk(similarity, k, dim=-1)
        weights = torch.zeros_like(similarity).scatter_(1, index, values)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        results.append((weights @ torch.tensor(s)).numpy())
    return np.mean(results, axis=0)


def literal_musc(model: MuSc, images: torch.Tensor, subsets=None) -> dict[str, np.ndarray]:
    config = model.config
    with torch.no_grad():
        hidden, embedding = model.clip.visual.residual_stream(images, config.features)
    embeddings = F.normalize(embedding.double(), dim=-1).numpy()
    subsets = subsets or [np.arange(len(images))]
    per_degree = []
    for degree in config.degrees:
        per_layer = []
        for layer in config.features:
            vectors = literal_lnamd(hidden[layer], degree)
            scores = torch.empty(vectors.shape[:2], dtype=torch.float64)
            for subset in subsets:
                scores[subset] = literal_mutual_scores(vectors[subset], config.interval)
            per_layer.append(scores)
        per_degree.append(torch.stack(per_layer).mean(0))
    patch = torch.stack(per_degree).mean(0)
    grid = model.grid
    maps = F.interpolate(
        patch.reshape(-1, 1, grid, grid),
        size=(config.image_size,) * 2,
        mode="bilinear",
        align_corners=True,
    )[:, 0]
    raw = maps.flatten(1).max(dim=1).values.numpy()
    return {
        "patch_scores": patch.numpy(),
        "maps": maps.numpy(),
        "raw": raw,
        "scores": literal_rscin(raw, embeddings, config.rscin_k) if config.rscin_k else raw,
    }


def random_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)


def assert_matches_literal(model: MuSc, images: torch.Tensor, atol: float = 1e-5) -> None:
    output = model.run(images)
    literal = literal_musc(model, images, output.subsets if len(output.subsets) > 1 else None)
    np.testing.assert_allclose(output.patch_scores, literal["patch_scores"], atol=atol)
    np.testing.assert_allclose(output.anomaly_maps, literal["maps"], atol=atol)
    np.testing.assert_allclose(output.image_scores_raw, literal["raw"], atol=atol)
    np.testing.assert_allclose(output.image_scores, literal["scores"], atol=atol)


@pytest.mark.parametrize(
    ("architecture", "settings"),
    [
        ({}, dict(image_size=48, features=(2, 4), degrees=(1, 3, 5), rscin_k=(1, 2, 3))),
        (
            dict(vision_layers=6, vision_patch_size=6, vision_grid=5),
            dict(image_size=42, features=(1, 3, 6), degrees=(3,), rscin_k=(1, 3, 4)),
        ),
        (
            dict(vision_layers=3, vision_patch_size=4, vision_grid=6, vision_width=128),
            dict(image_size=36, features=(3,), degrees=(1, 7), rscin_k=(), interval=0.5),
        ),
    ],
)
def test_other_shapes_and_settings_match_the_literal_method(architecture, settings):
    model = MuSc(tiny_clip(**architecture), MuScConfig(backbone="tiny", **settings))
    assert_matches_literal(model, random_images(7, settings["image_size"]))


def test_lnamd_equals_unfold_and_adaptive_pooling():
    tokens = torch.randn(3, 1 + 9 * 9, 16)
    for degree in (1, 3, 5, 9):
        np.testing.assert_allclose(
            lnamd(tokens, degree).numpy(), literal_lnamd(tokens, degree).numpy(), atol=1e-6
        )
    with pytest.raises(ValueError, match="odd"):
        lnamd(tokens, 2)
    with pytest.raises(ValueError, match="square"):
        lnamd(tokens[:, :-1], 1)


@pytest.mark.parametrize("distance_budget", [0, 1 << 30])  # image by image; pairs once
@pytest.mark.parametrize("block_elements", [1, 5, 37, 200, 10_000, 1 << 24])
def test_blocked_mutual_scoring_equals_the_literal_computation(block_elements, distance_budget):
    vectors = F.normalize(torch.randn(9, 25, 12), dim=-1)
    literal = literal_mutual_scores(vectors).numpy()
    blocked = mutual_scores(vectors, block_elements=block_elements, distance_budget=distance_budget)
    assert blocked.dtype == torch.float64
    np.testing.assert_allclose(blocked.numpy(), literal, atol=1e-6)


def test_mutual_scoring_of_duplicates_is_exactly_zero():
    """Identical images: every patch finds itself, distance 0, not sqrt(rounding)."""
    vectors = F.normalize(torch.randn(1, 16, 8), dim=-1).repeat(6, 1, 1)
    assert mutual_scores(vectors).abs().max().item() < 1e-6
    assert mutual_scores(vectors, distance_budget=0).abs().max().item() < 1e-6


# small sets, subsets, RsCIN edge cases -----------------------------------------------------


def test_neighbour_count_rule():
    assert [neighbour_count(n) for n in (2, 3, 4, 5, 8, 11, 101)] == [1, 1, 1, 1, 2, 3, 30]
    assert neighbour_count(5, interval=1.0) == 4
    with pytest.raises(ValueError, match="at least 2"):
        neighbour_count(1)
    with pytest.raises(ValueError, match="at least 2"):
        neighbour_count(0)


@pytest.fixture(scope="module")
def small_model():
    return MuSc(tiny_clip(), MuScConfig(backbone="tiny", image_size=32, features=(2, 4)))


def test_one_image_is_a_clear_error(small_model):
    with pytest.raises(ValueError, match="nothing to be compared with"):
        small_model.run(random_images(1, 32))
    with pytest.raises(ValueError, match="nothing to be compared with"):
        small_model.score_tensors(random_images(1, 32))


@pytest.mark.parametrize("count", [2, 3, 4])
def test_sets_below_five_use_the_nearest_image(small_model, count):
    """The official int((N - 1) * 0.3) is 0 below five images; here it is 1: the nearest."""
    images = random_images(count, 32, seed=count)
    output = small_model.run(images)
    assert np.isfinite(output.image_scores).all() and np.isfinite(output.anomaly_maps).all()
    with torch.no_grad():
        hidden, _ = small_model.clip.visual.residual_stream(images, (2, 4))
    expected = np.mean(
        [
            np.mean(
                [
                    literal_mutual_scores(literal_lnamd(hidden[layer], degree), 1.0 / (count - 1))
                    for layer in (2, 4)
                ],
                axis=0,
            )
            for degree in (1, 3, 5)
        ],
        axis=0,
    )
    np.testing.assert_allclose(output.patch_scores, expected, atol=1e-5)


def test_two_images_score_each_other(small_model):
    """Two images: each patch's score is its distance to the other image alone."""
    output = small_model.run(random_images(2, 32))
    assert output.patch_scores.shape == (2, small_model.grid**2)
    # RsCIN min-max over two scores: one image 0, the other 1 before smoothing
    assert sorted(np.round(rscin(output.image_scores_raw, np.eye(2), (1,)), 6)) == [0.0, 1.0]


def test_divide_indices_are_seeded_disjoint_and_cover():
    subsets = divide_indices(23, 3, seed=5)
    joined = np.concatenate(subsets)
    assert sorted(joined.tolist()) == list(range(23))
    assert [len(s) for s in subsets] == [8, 8, 7]
    again = divide_indices(23, 3, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(subsets, again, strict=True))
    other = divide_indices(23, 3, seed=6)
    assert not all(np.array_equal(a, b) for a, b in zip(subsets, other, strict=True))
    assert [s.tolist() for s in divide_indices(4, 1)] == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        divide_indices(4, 0)


def test_divide_indices_keep_every_group_in_every_subset():
    groups = ["good"] * 10 + ["scratch"] * 4 + ["dent"] * 6
    for subset in divide_indices(len(groups), 2, seed=0, groups=groups):
        assert {groups[i] for i in subset} == {"good", "scratch", "dent"}
        assert sorted(groups[i] for i in subset).count("scratch") == 2


def test_divide_num_scores_each_subset_on_its_own():
    config = MuScConfig(backbone="tiny", image_size=32, features=(2, 4), divide_num=2, seed=3)
    model = MuSc(tiny_clip(), config)
    images = random_images(12, 32)
    output = model.run(images)
    assert [s.tolist() for s in output.subsets] == [s.tolist() for s in divide_indices(12, 2, 3)]
    assert_matches_literal(model, images)
    # not the same as scoring the whole set together
    whole = MuSc(model.clip, MuScConfig(backbone="tiny", image_size=32, features=(2, 4)))
    assert not np.allclose(whole.run(images).patch_scores, output.patch_scores)


def test_divide_num_refuses_subsets_of_one(small_model):
    config = MuScConfig(backbone="tiny", image_size=32, features=(2, 4), divide_num=3)
    with pytest.raises(ValueError, match="nothing to be compared with"):
        MuSc(small_model.clip, config).run(random_images(5, 32))


def test_rscin_edge_cases():
    scores = np.array([0.2, 0.2, 0.2])
    embeddings = np.eye(3)
    assert np.array_equal(rscin(scores, embeddings, (1, 2)), np.zeros(3, np.float32))
    raw = np.array([0.1, 0.5, 0.3])
    np.testing.assert_array_equal(rscin(raw, embeddings, ()), raw.astype(np.float32))
    # k above N keeps the whole row
    full = rscin(raw, np.ones((3, 2)) / math.sqrt(2), (10,))
    np.testing.assert_allclose(full, np.full(3, 0.5), atol=1e-6)
    vectors = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1).numpy()
    raw = np.random.default_rng(0).random(6)
    np.testing.assert_allclose(
        rscin(raw, vectors, (1, 2, 5)), literal_rscin(raw, vectors, (1, 2, 5)), atol=1e-6
    )


def test_configuration_checks_and_round_trip():
    config = MuScConfig(features=[6, 12], degrees=[3], rscin_k=[1, 8, 9])
    assert MuScConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["features"] == [6, 12]
    for bad in (
        dict(degrees=(2,)),
        dict(features=(0,)),
        dict(rscin_k=(0,)),
        dict(interval=0.0),
        dict(divide_num=0),
        dict(image_size=-1),
    ):
        with pytest.raises(ValueError, match="invalid MuSc configuration"):
            MuScConfig(**bad)
    with pytest.raises(ValueError, match="exceed"):
        MuSc(tiny_clip(), MuScConfig(backbone="tiny", image_size=32, features=(5,)))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        MuSc(tiny_clip(), MuScConfig(backbone="tiny", image_size=30, features=(2,)))
    with pytest.raises(ValueError, match="shape"):
        MuSc(tiny_clip(), MuScConfig(backbone="tiny", image_size=32, features=(2,))).run(
            random_images(3, 40)
        )


# the command line and real defects ----------------------------------------------------------


def test_cli_predict_reproduces_the_official_scores_and_maps(
    tmp_path, shared_dir, reference_clip_file, musc_reference
):
    """The eight images as one set, with no MuSc flag: the defaults are the official ones."""
    from anomalyclip.cli import main

    expected, meta = musc_reference
    inputs = [str(shared_dir / "datasets" / name) for name in meta["images"]]
    out = tmp_path / "out"
    arguments = ["predict", *inputs, "--method", "musc", "--no-progress"]
    arguments += ["--clip-weights", str(reference_clip_file), "--output-dir", str(out)]
    assert main([*arguments, "--save-maps", str(tmp_path / "maps")]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == inputs
    np.testing.assert_allclose([r["score"] for r in records], expected["image_score"], atol=ATOL)
    np.testing.assert_allclose(
        [r["map_max"] for r in records], expected["image_score_raw"], atol=ATOL
    )
    for index, name in enumerate(meta["images"]):
        saved = np.load(tmp_path / "maps" / f"{name.rsplit('/', 1)[-1][:-4]}.npy")
        assert saved.dtype == np.float32 and saved.shape == (518, 518)
        np.testing.assert_allclose(saved, expected["anomaly_map"][index], atol=ATOL)
    assert (out / "predictions.csv").is_file() and (out / "report.html").is_file()
    assert len(list((out / "overlays").iterdir())) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 8 and summary["map_range"] == [0.0, 2.0]


def test_cli_predict_with_other_settings_and_tiny_sets(tmp_path, clip_file, shared_dir):
    """Flags reach the configuration; one image is refused with the reason, not a NaN."""
    from anomalyclip.cli import main

    images = sorted((shared_dir / "datasets" / "metal_plate" / "test" / "good").iterdir())[:3]
    common = ["predict", "--method", "musc", "--clip-weights", str(clip_file), "--no-progress"]
    common += ["--image-size", "32", "--features", "2", "4", "--musc-degrees", "1", "3"]
    out = tmp_path / "three.jsonl"
    code = main(
        [*common[:1], *map(str, images), *common[1:], "--rscin-k", "0", "--output", str(out)]
    )
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["score"]) for r in records)
    # RsCIN off (the official 0): the score is the map's maximum
    assert all(abs(r["score"] - r["map_max"]) < 1e-6 for r in records)
    one = main([*common[:1], str(images[0]), *common[1:], "--output", str(tmp_path / "1.jsonl")])
    assert one == 2
    assert main([*common[:1], str(images[0]), *common[1:], "--sigma", "4"]) == 2


@pytest.mark.slow
def test_cli_test_finds_real_defects_on_metal_plate(tmp_path, shared_dir, reference_clip_file):
    """16 normal and 16 defective metal plates as one set, the random-weight reference CLIP:
    the official code reaches image AUROC 0.992 and pixel AUROC 0.899 here. Pixel AUROC
    against the masks checks the geometry (centre crop, map placement, mask alignment)."""
    from anomalyclip.cli import main
    from tests.factories import shared_rows, write_manifest

    manifest = write_manifest(tmp_path / "set.csv", shared_rows(shared_dir, "metal_plate", 16, 16))
    out = tmp_path / "results"
    arguments = ["test", f"csv={manifest}", "--method", "musc", "--no-progress", "-o", str(out)]
    arguments.append("--allow-outside-paths")  # the manifest lists shared/'s images
    assert main([*arguments, "--clip-weights", str(reference_clip_file)]) == 0
    result = json.loads((out / "set" / "results.json").read_text())
    mean = result["mean"]
    assert result["settings"]["method"] == "musc"
    assert result["settings"]["config"]["degrees"] == [1, 3, 5]
    assert result["classes"][0]["normal"] == 16 and result["classes"][0]["anomalous"] == 16
    assert mean["image_auroc"] >= 0.95, mean
    assert mean["pixel_auroc"] >= 0.85, mean


def test_python_api_scores_a_folder_or_a_list_as_one_set(tmp_path, clip_file):
    import anomalyclip
    from anomalyclip.predictor import SkippedImage

    rng = np.random.default_rng(0)
    folder = tmp_path / "line"
    folder.mkdir()
    for index in range(4):
        pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"part_{index}.png")
    settings = dict(image_size=32, features=(2, 4), degrees=(1, 3))
    results = anomalyclip.score_set(folder, clip_file, **settings)
    assert [Path(r.source).name for r in results] == [f"part_{i}.png" for i in range(4)]
    model = anomalyclip.MuSc.from_pretrained(clip_file, **settings)
    assert model.settings()["backbone_identity"]["sha256"]
    again = model.score_set(sorted(folder.iterdir()))
    assert [r.score for r in again] == pytest.approx([r.score for r in results], abs=1e-6)
    assert again[0].anomaly_map.shape == (32, 32)
    assert again[0].map_at_original_size().shape == (40, 56)  # the crop placed back
    (folder / "broken.png").write_bytes(b"not an image")
    mixed = model.score_set(folder, errors="skip")
    assert sum(isinstance(r, SkippedImage) for r in mixed) == 1
    with pytest.raises(ValueError, match="no setting 'sigma'"):
        anomalyclip.create_musc(clip_file, overrides={"sigma": 4})


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    """bench_musc.py --quick: both algorithms run, agree, and the JSON is written."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_musc.py"
    output = tmp_path / "musc.json"
    completed = subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "| shapes | images |" in completed.stdout
    (case,) = json.loads(output.read_text())["cases"]
    assert case["max_abs_difference"] < 1e-5 and case["speedup"] > 0
    assert case["bfloat16_max_deviation"] < LOW_PRECISION_MAP_TOLERANCE


# progress, low-precision products, sharding in one process -----------------------------------


@pytest.mark.parametrize("distance_budget", [0, 1 << 30])
def test_mutual_scoring_reports_every_image_once(distance_budget):
    vectors = F.normalize(torch.randn(7, 9, 4), dim=-1)
    steps: list[int] = []
    scores = mutual_scores(vectors, distance_budget=distance_budget, advance=steps.append)
    assert sum(steps) == pytest.approx(7)
    if distance_budget:  # symmetric: image i compares 6 - i pairs, advanced in proportion
        assert steps == pytest.approx([2 * (6 - i) / 6 for i in range(6)])
    # one process: sharding is the plain computation
    sharded = mutual_scores(vectors, distance_budget=distance_budget, shard=True)
    assert torch.equal(scores, sharded)


def test_progress_bar_is_off_in_library_use_and_on_in_the_cli(small_model, capsys, tmp_path):
    assert MuSc.progress is False and small_model.progress is False
    small_model.run(random_images(3, 32))
    assert "MuSc scoring" not in capsys.readouterr().err
    small_model.progress = True
    try:
        small_model.run(random_images(3, 32))
    finally:
        small_model.progress = False
    shown = capsys.readouterr().err
    assert "MuSc scoring" in shown
    assert "elapsed, about" in shown and " left" in shown  # the time left, on the bar


def test_cli_shows_the_scoring_bar_unless_no_progress(tmp_path, clip_file, shared_dir, capsys):
    from anomalyclip.cli import main

    images = sorted((shared_dir / "datasets" / "metal_plate" / "test" / "good").iterdir())[:3]
    common = ["predict", *map(str, images), "--method", "musc", "--clip-weights", str(clip_file)]
    common += ["--image-size", "32", "--features", "2", "--musc-degrees", "1"]
    assert main([*common, "--output", str(tmp_path / "a.jsonl")]) == 0
    assert "MuSc scoring" in capsys.readouterr().err
    assert main([*common, "--output", str(tmp_path / "b.jsonl"), "--no-progress"]) == 0
    assert "MuSc scoring" not in capsys.readouterr().err


# bfloat16 against float32 on the official eight images: what the README states
LOW_PRECISION_MAP_TOLERANCE = 5e-3
LOW_PRECISION_SCORE_TOLERANCE = 1e-3


def test_bfloat16_products_stay_close_to_float32(reference_musc, reference_images, reference_run):
    """Only the nearest patch comes from the bfloat16 product; its distance is float32,
    so distances can only grow, and only where rounding reorders near-ties."""
    config = dataclasses.replace(reference_musc.config, similarity_dtype="bfloat16")
    low = MuSc(reference_musc.clip, config, reference_musc.backbone).run(reference_images)
    difference = low.patch_scores - reference_run.patch_scores
    assert difference.min() > -1e-6  # never below the float32 nearest distance
    assert np.abs(low.anomaly_maps - reference_run.anomaly_maps).max() < (
        LOW_PRECISION_MAP_TOLERANCE
    )
    np.testing.assert_allclose(
        low.image_scores, reference_run.image_scores, atol=LOW_PRECISION_SCORE_TOLERANCE
    )
    for got, want in zip(low.anomaly_maps, reference_run.anomaly_maps, strict=True):
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999
    with pytest.raises(ValueError, match="similarity_dtype must be one of"):
        MuScConfig(similarity_dtype="int8")


@pytest.mark.parametrize("distance_budget", [0, 1 << 30])
@pytest.mark.parametrize("block_elements", [5, 200, 1 << 24])
def test_low_precision_blocks_agree(block_elements, distance_budget):
    """Candidate merging across row and image blocks gives what one block gives."""
    vectors = F.normalize(torch.randn(6, 25, 12), dim=-1)
    whole = mutual_scores(vectors, similarity_dtype=torch.bfloat16)
    blocked = mutual_scores(
        vectors,
        block_elements=block_elements,
        distance_budget=distance_budget,
        similarity_dtype=torch.bfloat16,
    )
    np.testing.assert_allclose(blocked.numpy(), whole.numpy(), atol=1e-6)
    exact = literal_mutual_scores(vectors).numpy()
    assert (blocked.numpy() - exact).min() > -1e-6

"""AnomalyDINO, number for number: every array the authors' code wrote in
shared/reference/anomalydino (few-shot with and without masking, batched zero-shot),
through the public loaders and the Predictor seam; a literal re-derivation (brute-force
distances, OpenCV and PIL called directly) on other shapes, grey non-square images, other
sizes and k; the bank's file; and the real-defect check on metal_plate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from anomalyclip.backbone.dinov2 import DINOv2, DINOv2Architecture
from anomalyclip.backbone.dinov2_layouts import load_dinov2
from anomalyclip.evaluation.metrics import image_auroc, pixel_auroc
from anomalyclip.methods.anomalydino import (
    AnomalyDINO,
    AnomalyDINOBank,
    AnomalyDINOConfig,
    AnomalyDINOPreProcessor,
    BankError,
    BatchedAnomalyDINO,
    build_anomalydino,
    core,
    create_anomalydino,
)
from anomalyclip.predictor import AnomalyPrediction
from anomalyclip.preprocess import load_image, load_mask_array

RTOL, ATOL = 1e-5, 1e-4


def close(got, expected) -> bool:
    return np.allclose(np.asarray(got), np.asarray(expected), rtol=RTOL, atol=ATOL)


# the authors' vectors ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def dino(shared_dir):
    directory = shared_dir / "reference" / "anomalydino"
    meta = json.loads((directory / "expected.json").read_text())
    return directory, dict(np.load(directory / "expected.npz")), meta


@pytest.fixture(scope="module")
def weights(dino) -> Path:
    return dino[0] / "dinov2_small_random.pth"


@pytest.fixture(scope="module")
def backbone(weights) -> DINOv2:
    return load_dinov2(weights)


def dataset(shared_dir: Path, names: list[str]) -> list[Path]:
    return [shared_dir / "datasets" / name for name in names]


def test_preprocessing_and_rotations(dino, shared_dir, backbone):
    _, expected, meta = dino
    preprocessor = AnomalyDINOPreProcessor(meta["resolution"])
    images = dataset(shared_dir, meta["images"])
    for index in expected["subset"]:
        tensor = preprocessor.tensor(load_image(images[index]))
        assert close(tensor, expected[f"image.{index}"])
    reference = np.asarray(load_image(dataset(shared_dir, meta["cases"]["shot4"]["references"])[0]))
    for angle in (45, 90):
        rotated = core.rotate(reference, angle)
        assert np.array_equal(rotated, expected[f"reference0_rotated_{angle}"])
    assert np.array_equal(core.rotate(reference, 90)[1:], np.rot90(reference)[:-1])
    with torch.no_grad():
        for name, image in (
            ("reference0_features", reference),
            ("reference0_rotated_45_features", core.rotate(reference, 45)),
        ):
            features = backbone.patch_features(core.preprocess(image, 448)[None])[0]
            assert close(features, expected[name])


def test_scores_maps_and_masks_from_the_official_grids(dino):
    """Steps 7, 9 and 10 on the official features and grids (all cases, all images)."""
    _, expected, _ = dino
    for case in ("shot1", "shot4", "shot4_mask"):
        for index in range(8):
            grid = expected[f"{case}.patch_dists.{index}"]
            assert math.isclose(
                core.mean_top1p(grid), expected[f"{case}.image_score"][index], abs_tol=1e-9
            )
            if f"{case}.anomaly_map.{index}" in expected:
                made = core.anomaly_map(grid, (512, 512))
                assert close(made, expected[f"{case}.anomaly_map.{index}"])
    for index in expected["subset"]:
        raw = core.stretch_grid(expected[f"shot4.patch_dists.{index}"], (512, 512))
        assert close(raw, expected[f"shot4.anomaly_map_raw.{index}"])
        mask, pc1 = core.background_mask(expected[f"patch_features.{index}"], (32, 32))
        assert np.array_equal(mask, expected[f"shot4_mask.mask.{index}"])
        assert close(pc1, expected[f"shot4_mask.pc1.{index}"])


@pytest.fixture(scope="module")
def shot4(dino, weights, shared_dir) -> AnomalyDINO:
    _, _, meta = dino
    references = dataset(shared_dir, meta["cases"]["shot4"]["references"])
    model = create_anomalydino(weights, references, image_size=meta["resolution"])
    assert isinstance(model, AnomalyDINO)
    return model


@pytest.fixture(scope="module")
def test_features(dino, shot4, shared_dir):
    """Each test image's features, grid and size, computed once for every case."""
    _, _, meta = dino
    preprocessor = shot4.preprocessor
    found = []
    for path in dataset(shared_dir, meta["images"]):
        image = load_image(path)
        tensor = preprocessor.tensor(image)
        (features,) = shot4.encode([tensor])
        found.append((features, (tensor.shape[1] // 14, tensor.shape[2] // 14), image.size))
    return found


def case_model(case: str, shot4: AnomalyDINO) -> AnomalyDINO:
    """shot1's bank is the first reference's 8 rotations, the head of shot4's (reference
    order); shot4_mask is shot4 with masking on."""
    if case == "shot4_mask":
        config = AnomalyDINOConfig(**{**shot4.config.to_dict(), "masking": True})
        return AnomalyDINO(shot4.backbone, shot4.bank, config, shot4.identity)
    if case == "shot1":
        bank = shot4.bank
        head = AnomalyDINOBank.from_features(
            list(bank.features[: sum(bank.patches[:8])].split(bank.patches[:8])),
            bank.angles,
            bank.identity,
            bank.sources[:1],
        )
        return AnomalyDINO(shot4.backbone, head, shot4.config, shot4.identity)
    return shot4


@pytest.mark.slow
@pytest.mark.parametrize("case", ["shot1", "shot4", "shot4_mask"])
def test_few_shot_cases(dino, shot4, test_features, case):
    _, expected, meta = dino
    model = case_model(case, shot4)
    assert model.bank.size == int(expected[f"{case}.bank_size"]) == meta["cases"][case]["bank_size"]
    scores = []
    for index, (features, grid, size) in enumerate(test_features):
        result = model.score_features(features, grid, size)
        assert close(result.patch_dists, expected[f"{case}.patch_dists.{index}"])
        scores.append(result.score)
        if f"{case}.anomaly_map.{index}" in expected:
            assert close(result.anomaly_map, expected[f"{case}.anomaly_map.{index}"])
        if case == "shot4_mask":
            assert result.mask is not None and result.pc1 is not None
            assert np.array_equal(result.mask, expected[f"{case}.mask.{index}"])
            assert close(result.pc1, expected[f"{case}.pc1.{index}"])
            assert (result.patch_dists.ravel()[~result.mask] == 0).all()
        if f"{case}.nn_index.{index}" in expected:  # informational: ties are possible
            assert result.nearest is not None
            kept = result.nearest[result.nearest >= 0]
            agree = (kept == expected[f"{case}.nn_index.{index}"][:, 0]).mean()
            assert agree > 0.99
    assert close(scores, expected[f"{case}.image_score"])


@pytest.mark.slow
def test_few_shot_through_the_seam(dino, shot4, shared_dir):
    """``predict`` hands back the authors' map at the original size, unchanged by
    ``map_at_original_size``."""
    _, expected, meta = dino
    paths = dataset(shared_dir, meta["images"])
    subset = [int(i) for i in expected["subset"]]
    predictions = shot4.predict([paths[i] for i in subset], batch_size=2)
    for index, prediction in zip(subset, predictions, strict=True):
        assert isinstance(prediction, AnomalyPrediction)
        assert prediction.source == str(paths[index])
        assert math.isclose(prediction.score, expected["shot4.image_score"][index], abs_tol=1e-4)
        assert prediction.anomaly_map.shape == (512, 512)
        assert close(prediction.map_at_original_size(), expected[f"shot4.anomaly_map.{index}"])
    settings = json.loads(json.dumps(shot4.describe()))
    assert settings["settings"]["references"]["patches"] == 32768
    assert settings["settings"]["backbone_identity"]["sha256"] == meta["weights_sha256"]


@pytest.mark.slow
def test_batched_zero_shot(dino, weights, shared_dir):
    _, expected, meta = dino
    model = create_anomalydino(weights)
    assert isinstance(model, BatchedAnomalyDINO) and model.scores_sets
    case = meta["cases"]["batched"]
    images = [load_image(p) for p in dataset(shared_dir, meta["images"])]
    results = model.score_images(images)
    ties: dict[int, list[int]] = {}
    for image, patch, _, _ in case["near_ties"]:
        ties.setdefault(image, []).append(patch)
    for index, result in enumerate(results):
        assert result.patch_dists.shape == tuple(case["grids"][index])
        got = result.patch_dists.ravel().copy()
        want = expected[f"batched.patch_dists.{index}"].ravel().copy()
        got[ties.get(index, [])] = want[ties.get(index, [])] = 0
        assert close(got, want)
    assert close([r.score for r in results], expected["batched.image_score"])


@pytest.mark.slow
def test_real_defects(dino, shot4, shared_dir):
    """The README's real-data check: 4 references, 16 good and 16 defect images."""
    root = shared_dir / "datasets" / "metal_plate"
    good = sorted((root / "test" / "good").glob("test_*.png"))[:16]
    defect = sorted((root / "test" / "defect").glob("test_*.png"))[:16]
    results = shot4.score_images([load_image(p) for p in good + defect])
    labels = np.array([0] * len(good) + [1] * len(defect))
    masks = [np.zeros((512, 512), bool)] * len(good) + [
        load_mask_array(root / "ground_truth" / "defect" / f"{p.stem}_mask.png") for p in defect
    ]
    assert image_auroc(labels, [r.score for r in results]) >= 0.98
    assert pixel_auroc(np.stack(masks), np.stack([r.anomaly_map for r in results])) >= 0.90


# other shapes against a literal re-derivation ---------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> DINOv2:
    arch = DINOv2Architecture(32, 2, 2, 64, grid=6)
    generator = torch.Generator().manual_seed(3)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DINOv2(arch).state_dict().items()}
    state = {k: torch.randn(s, generator=generator) * 0.5 for k, s in shapes.items()}
    state["norm.weight"] = state["norm.weight"] + 3  # a first component past the threshold
    return DINOv2.from_state_dict(state, arch)


def grey_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    values = 120 + 60 * np.sin(x / 7.0) * np.cos(y / 5.0) + rng.normal(0, 20, (height, width))
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")


def literal_features(model: DINOv2, image: Image.Image, shorter: int) -> tuple[torch.Tensor, tuple]:
    """torchvision's Resize(shorter) on PIL, ImageNet norm, top-left crop, by hand."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    if width <= height:
        size = (shorter, int(shorter * height / width))
    else:
        size = (int(shorter * width / height), shorter)
    array = np.asarray(rgb.resize(size, Image.Resampling.BICUBIC), np.float32) / 255.0
    array = (array - np.array(core.IMAGENET_MEAN, np.float32)) / np.array(
        core.IMAGENET_STD, np.float32
    )
    rows, columns = array.shape[0] // 14, array.shape[1] // 14
    tensor = torch.from_numpy(array[: rows * 14, : columns * 14]).permute(2, 0, 1)
    with torch.no_grad():
        return model.patch_features(tensor[None].contiguous())[0], (rows, columns)


def literal_rotation(image: Image.Image, angle: int) -> Image.Image:
    array = np.asarray(image.convert("RGB"))
    h, w = array.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    warped = cv2.warpAffine(
        array, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    return Image.fromarray(warped)


def literal_mask(features: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """sklearn's PCA, the authors' centre test and cv2 on the (n, 1) column, as written."""
    from sklearn.decomposition import PCA

    pc1 = PCA(n_components=1, svd_solver="full").fit_transform(features.numpy())
    mask = pc1 > 10
    window = mask.reshape(grid)[
        int(grid[0] * 0.2) : int(grid[0] * 0.8), int(grid[1] * 0.2) : int(grid[1] * 0.8)
    ]
    if window.sum() <= window.size * 0.35:
        mask = -pc1 > 10
    kernel = np.ones((3, 3), np.uint8)
    mask = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)[:, 0]


@pytest.mark.parametrize(
    ("shorter", "neighbours", "rotation", "masking"),
    [(56, 1, True, False), (70, 3, False, True), (42, 2, True, True)],
)
def test_few_shot_by_hand(tiny, shorter, neighbours, rotation, masking):
    references = [grey_image(90, 60, 0), grey_image(50, 75, 1)]
    tests = [grey_image(80, 45, 2), grey_image(61, 99, 3)]
    config = AnomalyDINOConfig(
        image_size=shorter, neighbours=neighbours, rotation=rotation, masking=masking
    )
    model = AnomalyDINO.from_images(tiny, references, config)
    angles = range(0, 360, 45) if rotation else [0]
    bank = torch.cat(
        [
            literal_features(tiny, literal_rotation(reference, angle), shorter)[0]
            for reference in references
            for angle in angles
        ]
    )
    bank = F.normalize(bank, dim=-1).double()
    assert model.bank.size == len(bank)
    predictions = model.predict(tests)
    for image, prediction in zip(tests, predictions, strict=True):
        features, grid = literal_features(tiny, image, shorter)
        distances = 1 - F.normalize(features, dim=-1).double() @ bank.T
        dists = distances.topk(neighbours, dim=1, largest=False).values.mean(dim=1).numpy()
        if masking:
            dists = np.where(literal_mask(features, grid), dists, 0.0)
        grid_map = dists.reshape(grid)
        count = int(0.01 * grid_map.size)
        score = np.sort(grid_map.ravel())[-count:].mean() if count else grid_map.max()
        width, height = image.size
        stretched = cv2.resize(grid_map, (width, height), interpolation=cv2.INTER_LINEAR)
        assert isinstance(prediction, AnomalyPrediction)
        assert math.isclose(prediction.score, score, abs_tol=1e-5)
        assert prediction.anomaly_map.shape == (height, width)
        assert close(prediction.map_at_original_size(), gaussian_filter(stretched, sigma=4))
    scores, maps = model.score_tensors(torch.stack([model.preprocessor.tensor(tests[0])] * 2))
    assert scores.shape == (2,) and maps.shape[1:] == model.preprocessor.tensor(tests[0]).shape[1:]


def test_batched_by_hand(tiny):
    """The official kthvalue rule where it is defined (k >= 2, no ties), on grey images of
    different shapes, with masking; the documented decisions where it is not."""
    images = [grey_image(560, 400, 10 + i) for i in range(3)] + [grey_image(400, 580, 20)]
    config = AnomalyDINOConfig(zero_shot_size=392, masking=True)
    model = BatchedAnomalyDINO(tiny, config)
    predictions = model.predict(images, batch_size=2)  # scores_sets: one call, whole set
    features = [literal_features(tiny, image, 392) for image in images]
    units = [F.normalize(f, dim=-1) for f, _ in features]
    for index, prediction in enumerate(predictions):
        others = torch.cat([u for i, u in enumerate(units) if i != index])
        distances = 1 - units[index] @ others.T
        k = int(0.001 * len(others))
        assert k >= 2
        kth = torch.kthvalue(distances, k, dim=1, keepdim=True).values
        below = distances < kth
        scores = (distances * below).sum(dim=1) / below.sum(dim=1)
        grid = features[index][1]
        scores = np.where(literal_mask(features[index][0], grid), scores.numpy(), 0.0)
        count = int(0.01 * scores.size)
        assert isinstance(prediction, AnomalyPrediction)
        assert math.isclose(prediction.score, np.sort(scores)[-count:].mean(), abs_tol=1e-5)
        assert prediction.anomaly_map.shape == images[index].size[::-1]


def test_batched_decisions_where_the_official_code_fails():
    rng = torch.Generator().manual_seed(0)
    features = [torch.randn(30, 8, generator=rng) for _ in range(3)]  # M = 60: k = 0
    scores = core.batched_distances(features, 0)
    others = F.normalize(torch.cat(features[1:]), dim=-1)
    nearest = (1 - F.normalize(features[0], dim=-1) @ others.T).min(dim=1).values
    torch.testing.assert_close(scores, nearest)  # k raised to 1, the k-th itself
    tied = [torch.eye(8)[[0] * 4], torch.eye(8)[[0] * 2400]]  # k = 2, every distance 0
    assert torch.equal(core.batched_distances(tied, 0), torch.zeros(4))  # the k-th, not 0/0
    with pytest.raises(ValueError, match="at least 2"):
        core.batched_distances(features[:1], 0)
    assert core.mean_top1p(np.arange(50.0)) == 49.0  # n < 100: the maximum, not NaN


def test_nearest_distances_blocked(tiny):
    rng = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(37, 16, generator=rng), dim=-1)
    bank = F.normalize(torch.randn(301, 16, generator=rng), dim=-1)
    exact = 1 - (queries.double() @ bank.double().T)
    for neighbours in (1, 4):
        for block in (7, 64, 1 << 20):
            got, rows = core.nearest_distances(queries, bank, neighbours, block)
            want = exact.topk(neighbours, dim=1, largest=False)
            torch.testing.assert_close(got, want.values.mean(dim=1), atol=1e-6, rtol=0)
            assert torch.equal(rows, want.indices[:, 0])
    with pytest.raises(ValueError, match="neighbours"):
        core.nearest_distances(queries, bank, 302)


def test_pca_sign_and_one_dimensional_morphology():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    for seed in range(5):
        data = rng.normal(size=(64, 12)).astype(np.float32) * rng.uniform(0.5, 3, 12)
        expected = PCA(n_components=1, svd_solver="full").fit_transform(data)[:, 0]
        np.testing.assert_allclose(core.first_component(data), expected, atol=1e-4)
        raw = rng.random(64) > 0.7 + 0.05 * seed
        column = raw.astype(np.uint8)[:, None]
        kernel = np.ones((3, 3), np.uint8)
        by_cv2 = cv2.morphologyEx(cv2.dilate(column, kernel), cv2.MORPH_CLOSE, kernel)
        assert np.array_equal(core.morphology_1d(raw), by_cv2[:, 0].astype(bool))


# the bank's file --------------------------------------------------------------------------


def test_bank_file_round_trip_and_refusals(tiny, tmp_path):
    config = AnomalyDINOConfig(image_size=42, rotation=False)
    model = AnomalyDINO.from_images(tiny, [grey_image(60, 60, 5)], config)
    bank = model.bank
    for dtype in ("float32", "float16"):
        path = bank.save(tmp_path / f"bank_{dtype}.pt", dtype=dtype)
        loaded = AnomalyDINOBank.load(path)
        assert str(loaded.features.dtype) == f"torch.{dtype}"
        assert loaded.patches == bank.patches and loaded.digest == bank.digest
        torch.testing.assert_close(loaded.features.float(), bank.features, atol=1e-3, rtol=0)
        again = create_anomalydino(tiny, path, config=config)
        assert isinstance(again, AnomalyDINO) and again.bank.digest == bank.digest
    record = torch.load(tmp_path / "bank_float32.pt", weights_only=True)
    damaged = {
        "nan": {**record, "features": record["features"].clone().fill_(float("nan"))},
        "not unit": {**record, "features": record["features"] * 2},
        "counts": {**record, "patches": [1]},
        "dtype": {**record, "features": record["features"].double()},
        "shape": {**record, "features": record["features"][0]},
        "sources": {**record, "sources": "one.png"},
        "format": {**record, "format": "something else"},
    }
    for name, data in damaged.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(data, path)
        with pytest.raises(BankError) as caught:
            AnomalyDINOBank.load(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(BankError, match="image_size"):
        AnomalyDINO(tiny, bank, AnomalyDINOConfig(image_size=56, rotation=False))
    with pytest.raises(BankError, match="angles"):
        AnomalyDINO(tiny, bank, AnomalyDINOConfig(image_size=42, rotation=True))


def test_the_references_memory_is_reported_through_the_seam(tiny):
    """The service reports a kept set's bytes from ``reference_bytes()``: the bank's
    features (rows x dimension x 4 bytes), also under tiles; none without references."""
    from anomalyclip.methods.tiled import TiledPredictor, Tiling

    few = AnomalyDINO.from_images(tiny, [grey_image(40, 40, 7)], AnomalyDINOConfig(image_size=28))
    rows, dimension = few.bank.features.shape
    assert few.reference_bytes() == rows * dimension * 4 > 0
    assert TiledPredictor(few, Tiling(20)).reference_bytes() == few.reference_bytes()
    assert BatchedAnomalyDINO(tiny, AnomalyDINOConfig()).reference_bytes() == 0


def test_settings_and_modes(tiny, tmp_path, monkeypatch):
    few = AnomalyDINO.from_images(tiny, [grey_image(40, 40, 7)], AnomalyDINOConfig(image_size=28))
    assert not few.scores_sets and few.method == "anomalydino"
    record = json.loads(json.dumps(few.settings()))
    assert record["image_size"] == 28 and record["references"]["count"] == 1
    assert AnomalyDINOConfig.from_dict(AnomalyDINOConfig().to_dict()) == AnomalyDINOConfig()
    with pytest.raises(ValueError, match="neighbours"):
        AnomalyDINOConfig(neighbours=0)
    with pytest.raises(BankError, match="no reference"):
        AnomalyDINO.from_images(tiny, [])
    batched = create_anomalydino(tiny, zero_shot_size=28, image_size=28)
    assert isinstance(batched, BatchedAnomalyDINO) and batched.scores_sets
    with pytest.raises(ValueError, match="at least 2"):
        batched.predict([grey_image(40, 40, 8)])
    again = batched.with_references([grey_image(40, 40, 7)])
    assert again.bank.digest == few.bank.digest  # the METHODS path builds the same bank
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path))
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="`anomalyclip download dinov2_vits14`"):
        build_anomalydino("dinov2_vits14")  # a registered name, resolved through the cache
    with pytest.raises(ValueError, match="no setting 'depth'"):
        build_anomalydino(tiny, overrides={"depth": 3})


def test_preprocessor_geometry():
    """Masks land on the input tensor's pixels; tensor-size maps stretch over the original
    (the authors' rule), original-size maps pass unchanged."""
    preprocessor = AnomalyDINOPreProcessor(56)
    image = grey_image(90, 60, 4)
    tensor = preprocessor.tensor(image)
    assert tuple(tensor.shape) == (3, 56, 84) and preprocessor.tensor_size(image.size) == (84, 56)
    mask = np.zeros((60, 90), bool)
    mask[:, 45:] = True
    on_input = preprocessor.mask(mask).numpy()
    assert on_input.shape == (56, 84) and on_input[:, :40].sum() == 0 and on_input[:, 44:].all()
    small = np.arange(56 * 84, dtype=np.float32).reshape(56, 84)
    stretched = cv2.resize(small, (90, 60), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(preprocessor.map_to_original(small, (90, 60)), stretched)
    assert np.array_equal(preprocessor.map_to_original(stretched, (90, 60)), stretched)

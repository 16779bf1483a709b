"""Lower precision (issue 23): ``auto``'s choice from the CPU's flags, MuSc's bfloat16
mutual scoring and reference searches within their bounds of float32, AnomalyCLIP in
bfloat16 and int8, float32 untouched, and ``--precision`` recorded with the results."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalyclip.methods.assemble import PredictorSpec, build_method
from anomalyclip.methods.musc.model import MuSc, MuScConfig, mutual_scores
from anomalyclip.methods.nearest import centred_forms, nearest_columns, nearest_rows
from anomalyclip.utils import precision
from anomalyclip.utils.precision import resolve_precision
from tests.factories import tiny_clip
from tests.helpers import cli, tiny_service_model

NATIVE = precision.native_bfloat16("cpu")
needs_bfloat16 = pytest.mark.skipif(not NATIVE, reason="this CPU has no native bfloat16")


def clustered(count: int, patches: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Unit vectors with shared structure (as LNAMD's are): close but not tied."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(patches, channels, generator=generator)
    noise = torch.randn(count, patches, channels, generator=generator)
    return F.normalize(common + 0.5 * noise, dim=-1)


# auto's choice ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "offered", "expected"),
    [
        ({"avx512f", "avx512_bf16", "avx512_vnni"}, ("bfloat16", "int8", "float32"), "bfloat16"),
        ({"avx512f", "amx_bf16", "amx_int8"}, ("bfloat16", "float32"), "bfloat16"),
        ({"avx2", "avx_vnni"}, ("bfloat16", "int8", "float32"), "int8"),
        ({"avx2", "avx_vnni"}, ("bfloat16", "float32"), "float32"),
        ({"avx2", "fma"}, ("bfloat16", "int8", "float32"), "float32"),
        (set(), ("bfloat16", "int8", "float32"), "float32"),
    ],
)
def test_auto_takes_the_fastest_native_path_from_the_cpu_flags(
    monkeypatch, caplog, flags, offered, expected
):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    with caplog.at_level("INFO", logger="anomalyclip.utils.precision"):
        choice = resolve_precision("auto", "cpu", offered)
    assert (choice.requested, choice.precision) == ("auto", expected)
    assert "auto on CPU capability" in choice.reason
    assert f"precision {expected}" in caplog.text


def test_explicit_precision_is_kept_and_a_missing_one_refused(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level("WARNING"):
        choice = resolve_precision("bfloat16", "cpu", ("bfloat16", "float32"))
    assert choice.precision == "bfloat16" and "not native here" in caplog.text
    with pytest.raises(ValueError, match="int8 is not available for this method"):
        resolve_precision("int8", "cpu", ("bfloat16", "float32"))
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu", ("float32",))


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\n")
    monkeypatch.setattr(precision, "CPUINFO", info)
    precision.cpu_flags.cache_clear()
    try:
        assert precision.cpu_flags() == {"fpu", "avx512f", "avx512_bf16"}
        assert precision.native_bfloat16("cpu")
    finally:
        precision.cpu_flags.cache_clear()


# MuSc and the nearest-patch searches ---------------------------------------------------


@pytest.mark.parametrize("budget", [1 << 30, 1])  # symmetric, and image by image
def test_bfloat16_mutual_scores_only_grow_and_stay_within_the_bound(budget):
    vectors = clustered(8, 100, 32)
    exact = mutual_scores(vectors, distance_budget=budget)
    low = mutual_scores(vectors, distance_budget=budget, similarity_dtype=torch.bfloat16)
    difference = low - exact
    # a chosen patch is never nearer than the nearest: the mean of distances only grows
    assert float(difference.min()) >= -1e-6
    assert float(difference.abs().max()) < 1e-3
    assert float(np.corrcoef(low.flatten(), exact.flatten())[0, 1]) > 0.9999


@needs_bfloat16
def test_nearest_rows_choose_the_float32_nearest_among_candidates():
    generator = torch.Generator().manual_seed(3)
    references = F.normalize(torch.randn(500, 64, generator=generator), dim=-1)
    queries = F.normalize(references[:40] + 0.05 * torch.randn(40, 64, generator=generator), dim=-1)
    best, rows = nearest_rows(queries, references)
    exact = queries @ references.T
    assert torch.equal(rows, exact.argmax(dim=1))
    torch.testing.assert_close(best, exact.amax(dim=1), atol=1e-6, rtol=0)


def test_musc_set_in_bfloat16_is_within_the_bound_of_float32():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32)
    config = MuScConfig(backbone="tiny", image_size=32, features=(2, 4), rscin_k=())
    exact = MuSc(tiny_clip(), config).run(images)
    low_config = MuScConfig(**{**config.to_dict(), "similarity_dtype": "bfloat16"})
    low = MuSc(tiny_clip(), low_config).run(images)
    # a tiny random CLIP's patches are near-identical (the worst case for rounding: many
    # near-ties); the bound at real sizes is measured by benchmarks/bench_precision.py
    change = low.image_scores - exact.image_scores
    assert change.min() >= -1e-6 and change.max() < 5e-3
    assert np.corrcoef(low.anomaly_maps.ravel(), exact.anomaly_maps.ravel())[0, 1] > 0.999


# the seam, the CLI ---------------------------------------------------------------------


def test_precision_through_the_spec_is_applied_and_recorded(clip_file, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    tiny = {"image_size": 32, "features": (2, 4)}
    spec = PredictorSpec(method="musc", weights=str(clip_file), overrides=tiny, precision="auto")
    musc = build_method(spec)
    recorded = musc.settings()
    # bfloat16 products are native with AVX-512 BF16 and hold MuSc's bound: auto takes them
    assert recorded["similarity_dtype"] == "bfloat16"
    assert recorded["precision"]["requested"] == "auto"
    assert recorded["precision"]["precision"] == "bfloat16"
    assert "avx512_bf16" in recorded["precision"]["reason"]
    plain = build_method(PredictorSpec(method="musc", weights=str(clip_file), overrides=tiny))
    assert "precision" not in plain.settings()
    assert plain.settings()["similarity_dtype"] == "float32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    fallback = build_method(spec).settings()
    assert fallback["similarity_dtype"] == "float32"
    assert fallback["precision"]["precision"] == "float32"


@pytest.mark.parametrize(("choice", "tolerance"), [("bfloat16", 0.05), ("int8", 0.05)])
def test_anomalyclip_in_lower_precision_stays_near_float32(choice, tolerance):
    from anomalyclip.methods.anomalyclip.quantize import apply_precision
    from anomalyclip.utils.precision import PrecisionChoice

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    exact_scores, exact_maps = tiny_service_model().score_tensors(images)
    model = apply_precision(tiny_service_model(), PrecisionChoice(choice, choice, "asked for"))
    scores, maps = model.score_tensors(images)
    assert model.settings()["precision"]["precision"] == choice
    assert scores.dtype == np.float32 and maps.dtype == np.float32
    assert np.abs(scores - exact_scores).max() < tolerance
    assert np.corrcoef(maps.ravel(), exact_maps.ravel())[0, 1] > 0.99


def test_precision_flag_reaches_the_predictions_settings(tmp_path, clip_file, shared_dir):
    images = sorted((shared_dir / "datasets" / "metal_plate" / "test" / "good").iterdir())[:3]
    out = tmp_path / "set.jsonl"
    arguments = ["predict", *map(str, images), "--method", "musc", "--clip-weights"]
    arguments += [str(clip_file), "--image-size", "32", "--features", "2", "4"]
    arguments += ["--no-progress", "--precision", "bfloat16", "--output", str(out)]
    assert cli(*arguments) == 0
    settings = json.loads(out.with_name("set.run.json").read_text())
    model = settings["settings"]["model"] if "settings" in settings else settings["model"]
    assert model["precision"] == {
        "requested": "bfloat16",
        "precision": "bfloat16",
        "reason": "asked for",
    }
    assert model["similarity_dtype"] == "bfloat16"
    assert len(out.read_text().splitlines()) == 3


def test_an_unknown_precision_is_refused_by_the_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("predict", "x.png", "--precision", "fp8")
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


# the centred bfloat16 search (MuSc on a CPU, AnomalyDINO's references) -------------------


def test_centred_forms_multiply_to_half_squared_distances():
    vectors = clustered(2, 300, 64)
    query, reference = centred_forms(vectors.mean(dim=(0, 1)), vectors)
    assert query.dtype == reference.dtype == torch.bfloat16
    products = (query[0].float() @ reference[1].float().T).double()
    exact = torch.cdist(vectors[0].double(), vectors[1].double()) ** 2 / 2
    # inputs rounded to bfloat16, products exact: far finer than 0.004 of a raw dot product
    assert float((products - exact).abs().max()) < 2e-3
    # the form is symmetric: query(i) . reference(j) = query(j) . reference(i)
    swapped = (query[1].float() @ reference[0].float().T).double()
    torch.testing.assert_close(swapped.T, products, atol=1e-6, rtol=0)


def test_nearest_columns_read_the_bits_in_the_order_of_the_values():
    values = torch.tensor([[0.5, 0.0625, 3.0, 0.07], [2.0, 1.5, 1e-3, 0.0]]).bfloat16()
    assert nearest_columns(values).tolist() == [1, 3]
    block = torch.rand(50, 400, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert torch.equal(nearest_columns(block), block.float().min(dim=1).indices)


@needs_bfloat16
def test_cpu_bfloat16_mutual_scores_take_the_centred_path_and_are_faster():
    """The acceptance's shape scaled down: 8 images of 37 x 37 patches, 128 channels."""
    vectors = clustered(8, 37 * 37, 128)
    timings: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    results = {}
    for _ in range(3):  # interleaved: the machine is shared
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            started = time.perf_counter()
            results[name] = mutual_scores(vectors, similarity_dtype=dtype)
            timings[name].append(time.perf_counter() - started)
    change = results["bfloat16"] - results["float32"]
    assert float(change.min()) >= -1e-6 and float(change.abs().max()) < 1e-3
    assert min(timings["bfloat16"]) < min(timings["float32"])


@pytest.mark.parametrize("neighbours", [1, 3])
@pytest.mark.parametrize("block_elements", [1 << 24, 5000])
def test_anomalydino_bfloat16_search_only_grows_within_the_bound(neighbours, block_elements):
    from anomalyclip.methods.anomalydino import core

    bank = clustered(1, 3000, 96, seed=4)[0]
    queries = F.normalize(bank[:500] + 0.3 * clustered(1, 500, 96, seed=5)[0], dim=-1)
    exact, rows = core.nearest_distances(queries, bank, neighbours, block_elements)
    low, low_rows = core.nearest_distances_bfloat16(
        queries, bank, core.bank_form(bank), neighbours, block_elements
    )
    assert low.dtype == torch.float64 and low_rows.dtype == torch.long
    assert float((low - exact).min()) > -1e-6  # a chosen neighbour is never nearer
    # a near-tie reorders only within the output's rounding: half a bfloat16 step
    # (2^-9 relative) on each of the two products compared, plus the inputs' rounding
    bound = 2**-8 * float(exact.max()) + 1e-4
    assert float((low - exact).abs().max()) < bound
    assert float((low_rows == rows).float().mean()) > 0.99
    chosen = 1 - (queries * bank[low_rows]).sum(dim=1)
    if neighbours == 1:  # the row returned is the one whose distance is returned
        torch.testing.assert_close(chosen.double(), low, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_anomalydino_precision_through_the_cli(shared_dir, tmp_path):
    folder = shared_dir / "reference" / "anomalydino"
    meta = json.loads((folder / "expected.json").read_text())
    expected = dict(np.load(folder / "expected.npz"))
    datasets = shared_dir / "datasets"
    images = [datasets / p for p in meta["images"]]
    references = [datasets / p for p in meta["cases"]["shot1"]["references"]]
    out = tmp_path / "out.jsonl"
    arguments = ["predict", *images, "--method", "anomalydino", "--backbone"]
    arguments += [folder / "dinov2_small_random.pth", "--reference", *references]
    assert cli(*arguments, "--precision", "bfloat16", "--output", out, "--no-progress") == 0
    model = json.loads(out.with_name("out.run.json").read_text())
    model = model["settings"]["model"] if "settings" in model else model["model"]
    assert model["precision"] == {
        "requested": "bfloat16",
        "precision": "bfloat16",
        "reason": "asked for",
    }
    assert model["similarity_dtype"] == "bfloat16"
    scores = np.array([json.loads(line)["score"] for line in out.read_text().splitlines()])
    change = scores - expected["shot1.image_score"]
    assert change.min() > -1e-5 and np.abs(change).max() < 1e-3


@needs_bfloat16
def test_anomalyclip_reference_search_in_bfloat16_is_taken_and_within_the_bound(monkeypatch):
    from anomalyclip.methods.anomalyclip import few_shot

    bank = clustered(1, 2000, 64, seed=6)[0]
    tokens = F.normalize(bank[:300] + 0.4 * clustered(1, 300, 64, seed=7)[0], dim=-1)
    tokens = tokens.reshape(3, 100, 64)  # float32 unit tokens, as the model gives them
    exact = few_shot.nearest_distances(tokens, bank)
    calls = []
    monkeypatch.setattr(few_shot, "nearest_rows", lambda *a: calls.append(1) or nearest_rows(*a))
    low = few_shot.nearest_distances(tokens, bank, block=700, low_precision=True)
    assert len(calls) == 3  # the bfloat16 search ran, once per block of the bank
    assert float((low - exact).min()) > -1e-6
    assert float((low - exact).abs().max()) < 2**-8 * float(exact.max()) + 1e-4

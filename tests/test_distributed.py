"""Several processes: torchrun's environment, sharding helpers, and training and evaluation
with 2 CPU processes on gloo giving the numbers of one process."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyclip import distributed
from anomalyclip.cli import main
from anomalyclip.distributed import LaunchEnvironment, RankFilter
from tests.factories import shared_rows, write_manifest
from tests.helpers import TORCHRUN_FLAGS, TORCHRUN_SECONDS, WORLD, torchrun

# the launch environment and the helpers in one process ---------------------------------


def test_launch_environment_is_read_from_torchruns_variables():
    assert LaunchEnvironment.from_env({}) == LaunchEnvironment(0, 1, 0)
    launch = LaunchEnvironment.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.distributed) == (
        3,
        4,
        1,
        True,
    )
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        LaunchEnvironment.from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        LaunchEnvironment.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_devices_and_backends_follow_the_local_rank():
    launch = LaunchEnvironment(rank=5, world_size=8, local_rank=1)
    assert distributed.device_for("cuda", launch) == torch.device("cuda", 1)
    assert distributed.device_for("cpu", launch) == torch.device("cpu")
    assert distributed.device_for("cuda:3", LaunchEnvironment()) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="names one GPU for all 8 processes; use --device cuda"):
        distributed.device_for("cuda:0", launch)
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("cuda:1") == "nccl"
    with pytest.raises(ValueError, match="'meta' cannot run distributed"):
        distributed.backend_for("meta")


def test_items_go_round_the_ranks():
    assert [distributed.owner(i, world=3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_one_process_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (
        0,
        1,
        True,
    )
    assert distributed.owner(5) == 0
    assert distributed.gather_to_main({"a": 1}) == [{"a": 1}]
    assert distributed.all_gather(2.5) == [2.5]
    assert distributed.broadcast_from_main("x") == "x"
    assert distributed.sum_across_ranks([1, 2.5]) == [1.0, 2.5]
    distributed.barrier()


def _helpers_on_two_ranks(rank: int, folder: str) -> None:
    """One of two gloo processes: what each helper gives, written to ``rank<r>.json``."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    with distributed.process_group("cpu"):
        seen = {
            "rank": distributed.rank(),
            "gathered": distributed.gather_to_main(rank * 10),
            "all": distributed.all_gather(f"r{rank}"),
            "sums": distributed.sum_across_ranks([rank, 0.5]),
            "main": distributed.run_on_main(lambda: f"read by rank {rank}"),
        }
        try:
            distributed.run_on_main(lambda: Path(folder, "missing.pt").read_bytes())
        except FileNotFoundError as error:
            seen["error"] = f"{type(error).__name__}: {Path(error.filename).name}"
    Path(folder, f"rank{rank}.json").write_text(json.dumps(seen))


def test_helpers_agree_across_two_processes(tmp_path, monkeypatch):
    """Gathers, sums and rank 0's reads (its errors too) reach the ranks they should."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
    torch.multiprocessing.spawn(_helpers_on_two_ranks, args=(str(tmp_path),), nprocs=WORLD)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [s["rank"] for s in seen] == [0, 1]
    assert [s["gathered"] for s in seen] == [[0, 10], None]
    assert all(s["all"] == ["r0", "r1"] and s["sums"] == [1.0, 1.0] for s in seen)
    assert all(s["main"] == "read by rank 0" for s in seen)
    assert all(s["error"] == "FileNotFoundError: missing.pt" for s in seen)


def test_other_ranks_log_only_warnings_with_their_rank():
    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("anomalyclip", level, __file__, 1, message, (3,), None)

    assert not RankFilter(1).filter(record(logging.INFO, "epoch %d"))
    warning = record(logging.WARNING, "cache entry %d unreadable")
    assert RankFilter(1).filter(warning) and RankFilter(1).filter(warning)
    assert warning.getMessage() == "[rank 1] cache entry 3 unreadable"
    assert RankFilter(0).filter(record(logging.INFO, "epoch %d"))


# two processes against one ---------------------------------------------------------------


def prompts(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["prompt_learner"]


@pytest.mark.slow
def test_torchrun_training_gives_the_single_process_prompts(shared_dir, clip_file, tmp_path):
    """Object-aware prompts for two classes, images without masks (global loss only) and a
    last batch of one image (one rank has nothing): 2 processes, trained for one epoch
    and resumed for a second, end where one process does, and write only rank 0's files;
    so do 2 processes resuming one process's checkpoint."""
    rows = shared_rows(shared_dir, "glass", 2, 2, unmasked=1)
    rows += shared_rows(shared_dir, "metal_plate", 2, 2)
    manifest = write_manifest(tmp_path / "train.csv", rows)
    common = [f"csv={manifest}", "--clip-weights", str(clip_file), *TORCHRUN_FLAGS]
    common += ["--prompt-mode", "aware", "--allow-missing-masks", "--batch-size", "4"]
    assert len(rows) == 9  # batches of 4, 4 and 1

    single = tmp_path / "single"
    assert main(["train", *common, "-o", str(single), "--epochs", "2"]) == 0
    split = tmp_path / "split"
    first = torchrun(["train", *common, "-o", str(split), "--epochs", "1"], tmp_path)
    assert first.stderr.count("epoch 1/1: loss") == 1  # logged by rank 0 only
    assert sorted(p.name for p in split.iterdir()) == [
        "epoch_1.pt",
        "train_log.csv",
        "train_log.json",
    ]
    torchrun(["train", *common, "-o", str(split), "--epochs", "2", "--resume"], tmp_path)
    # one process's first epoch, resumed by two processes
    handed_over = tmp_path / "handed-over"
    handed_over.mkdir()
    shutil.copy(single / "epoch_1.pt", handed_over / "epoch_1.pt")
    resume = ["train", *common, "-o", str(handed_over), "--epochs", "2", "--resume"]
    torchrun(resume, tmp_path)

    differences = []
    for epoch, run in ((1, split), (2, split), (2, handed_over)):
        expected = prompts(single / f"epoch_{epoch}.pt")
        got = prompts(run / f"epoch_{epoch}.pt")
        assert set(got) == set(expected)
        differences += [(got[k] - expected[k]).abs().max().item() for k in expected]
    assert max(differences) < 1e-6
    moved = prompts(split / "epoch_2.pt")["ctx_pos"] - prompts(split / "epoch_1.pt")["ctx_pos"]
    assert moved.abs().max() > 1e-4

    expected_log = json.loads((single / "train_log.json").read_text())["epochs"]
    got_log = json.loads((split / "train_log.json").read_text())["epochs"]
    for want, got in zip(expected_log, got_log, strict=True):
        for term in ("loss", "image_loss", "local_loss"):
            assert got[term] == pytest.approx(want[term], rel=1e-6), term
    # each image is encoded by one rank only; the resumed launch starts with empty caches
    assert [e["images_encoded"] for e in expected_log] == [9, 0]
    assert [e["images_encoded"] for e in got_log] == [9, 9]


def assert_same_maps(single: Path, split: Path, count: int) -> None:
    """Every map the two runs saved, one per image, bit-identical."""
    single_maps = sorted((single / "maps").rglob("*.npy"))
    split_maps = sorted((split / "maps").rglob("*.npy"))
    assert len(split_maps) == count == len(single_maps)
    for want, got in zip(single_maps, split_maps, strict=True):
        assert np.array_equal(np.load(want), np.load(got)), got.name


@pytest.mark.slow
def test_torchrun_evaluation_gives_the_single_process_metrics(shared_dir, clip_file, tmp_path):
    """Two classes in batches of 3, spread over 2 ranks: the same tables to the last bit,
    every map saved by the rank that scored it."""
    rows = shared_rows(shared_dir, "glass", 4, 3) + shared_rows(shared_dir, "metal_plate", 3, 4)
    manifest = write_manifest(tmp_path / "test.csv", rows)
    common = [f"csv={manifest}", "--clip-weights", str(clip_file), *TORCHRUN_FLAGS]
    common += ["--checkpoint", "none", "--batch-size", "3", "--save-maps"]

    assert main(["test", *common, "-o", str(tmp_path / "single")]) == 0
    done = torchrun(["test", *common, "-o", str(tmp_path / "split")], tmp_path)
    assert done.stdout.count("| glass |") == 1  # rank 0 prints the table once

    single = json.loads((tmp_path / "single" / "test" / "results.json").read_text())
    split = json.loads((tmp_path / "split" / "test" / "results.json").read_text())
    assert split["classes"] == single["classes"] and split["mean"] == single["mean"]
    assert [c["category"] for c in split["classes"]] == ["glass", "metal_plate"]
    assert all(isinstance(split["mean"][m], float) for m in ("image_auroc", "pixel_aupro"))
    assert_same_maps(tmp_path / "single" / "test", tmp_path / "split" / "test", len(rows))


@pytest.mark.slow
def test_torchrun_musc_evaluation_gives_the_single_process_results(shared_dir, clip_file, tmp_path):
    """MuSc under torchrun: each class one set, its backbone batches and mutual scoring
    shared between 2 ranks (batches of 3 over 7 images: one rank has more), results
    summed back: the tables and every map identical to one process's."""
    rows = shared_rows(shared_dir, "glass", 4, 3) + shared_rows(shared_dir, "metal_plate", 3, 4)
    manifest = write_manifest(tmp_path / "test.csv", rows)
    common = [f"csv={manifest}", "--method", "musc", "--clip-weights", str(clip_file)]
    common += ["--image-size", "32", "--features", "2", "4", "--musc-degrees", "1", "3"]
    common += ["--batch-size", "3", "--save-maps", "--no-progress", "--allow-outside-paths"]

    assert main(["test", *common, "-o", str(tmp_path / "single")]) == 0
    done = torchrun(["test", *common, "-o", str(tmp_path / "split")], tmp_path)
    assert done.stdout.count("| glass |") == 1

    single = json.loads((tmp_path / "single" / "test" / "results.json").read_text())
    split = json.loads((tmp_path / "split" / "test" / "results.json").read_text())
    assert split["classes"] == single["classes"] and split["mean"] == single["mean"]
    assert split["settings"]["method"] == "musc"
    single_scores = (tmp_path / "single" / "test" / "scores.csv").read_text()
    assert (tmp_path / "split" / "test" / "scores.csv").read_text() == single_scores
    assert_same_maps(tmp_path / "single" / "test", tmp_path / "split" / "test", len(rows))


@pytest.mark.slow
def test_torchrun_shards_a_wrapped_per_image_method(shared_dir, clip_file, tmp_path):
    """Tiling wraps AnomalyCLIP: its batches are spread over 2 ranks and gathered as
    AnomalyCLIP's are (not computed by every rank): the same tables and maps."""
    rows = shared_rows(shared_dir, "glass", 4, 3) + shared_rows(shared_dir, "metal_plate", 3, 4)
    manifest = write_manifest(tmp_path / "test.csv", rows)
    common = [f"csv={manifest}", "--clip-weights", str(clip_file), *TORCHRUN_FLAGS]
    common += ["--checkpoint", "none", "--batch-size", "3", "--save-maps", "--tile-size", "200"]

    assert main(["test", *common, "-o", str(tmp_path / "single")]) == 0
    torchrun(["test", *common, "-o", str(tmp_path / "split")], tmp_path)
    single = json.loads((tmp_path / "single" / "test" / "results.json").read_text())
    split = json.loads((tmp_path / "split" / "test" / "results.json").read_text())
    assert split["classes"] == single["classes"] and split["mean"] == single["mean"]
    assert split["settings"]["config"]["tiling"] == {"tile_size": 200, "overlap": 0.25}
    assert_same_maps(tmp_path / "single" / "test", tmp_path / "split" / "test", len(rows))


MUSC_SHARDING_SCRIPT = """
import sys, torch, torch.nn.functional as F
from anomalyclip import distributed
from anomalyclip.methods.musc.model import mutual_scores
distributed.init_from_env("cpu")
vectors = F.normalize(torch.randn(9, 16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
steps = []
result = {
    budget: mutual_scores(vectors, distance_budget=budget, shard=True, advance=steps.append)
    for budget in (0, 1 << 30)
}
assert abs(sum(steps) - 18) < 1e-9
if distributed.is_main_process():
    torch.save(result, sys.argv[1])
distributed.shutdown()
"""


@pytest.mark.slow
def test_torchrun_mutual_scoring_in_both_modes_is_the_single_process_result(tmp_path):
    """Pairs once (the distance table summed) and image by image (the scores summed)."""
    import torch.nn.functional as F

    from anomalyclip.methods.musc.model import mutual_scores

    script = tmp_path / "shard.py"
    script.write_text(MUSC_SHARDING_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(WORLD), str(script), str(tmp_path / "out.pt")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=TORCHRUN_SECONDS
    )
    assert done.returncode == 0, done.stderr[-6000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    vectors = F.normalize(torch.randn(9, 16, 8, generator=generator), dim=-1)
    for budget in (0, 1 << 30):
        assert torch.equal(got[budget], mutual_scores(vectors, distance_budget=budget))

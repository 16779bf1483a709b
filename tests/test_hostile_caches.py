"""Hostile or failing storage: shard indexes that point out of their folder, full disks under
the feature cache and the training output, damaged checkpoints at resume, caches that are
files. Every payload is generated here; a full disk is a monkeypatched write."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from anomalyclip import hub
from anomalyclip.backbone.loading import WeightsError, read_weights
from anomalyclip.cli import main
from anomalyclip.data import open_dataset
from anomalyclip.methods.anomalyclip.embedding_cache import FeatureCache
from anomalyclip.methods.anomalyclip.training import TrainOptions, train
from anomalyclip.methods.anomalyclip.training_checkpoints import find_checkpoints
from anomalyclip.utils import atomic
from tests.helpers import TRAINING_FLAGS, tiny_training_model

SECRET = b"root:x:0:0:secret-bytes\n"


def disk_full(kind: str):
    """A stand-in for a write on a full disk: the OS's ENOSPC or torch's zip writer."""

    def fail(*_: object, **__: object) -> None:
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    return fail


# shard indexes --------------------------------------------------------------------------


def sharded_folder(folder: Path, shards: dict[str, object]) -> Path:
    """A Hugging Face folder whose index maps one tensor to each of ``shards``' values."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    index = {"metadata": {}, "weight_map": dict(shards)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    ("shard", "problem"),
    [
        ("../../../../etc/passwd", "not a plain file name"),
        ("SECRET_ABSOLUTE", "not a plain file name"),
        (".", "not a plain file name"),
        ("..", "not a plain file name"),
        ("sub", "not a file"),
        ("link.safetensors", "a link to a file outside the folder"),
        (["a", "list"], "a JSON list, not a file name"),
    ],
)
def test_shard_index_naming_anything_but_a_file_in_its_folder_is_refused(tmp_path, shard, problem):
    """Bug: ../../../../etc/passwd was read and its first bytes quoted; "." recursed forever."""
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "sub").mkdir()
    (folder / "link.safetensors").symlink_to(secret)
    if shard == "SECRET_ABSOLUTE":
        shard = str(secret)
    elif shard == "../../../../etc/passwd":
        shard = os.path.relpath(secret, folder)
    sharded_folder(folder, {"visual.proj": shard})
    with pytest.raises(WeightsError) as refusal:
        read_weights(folder)
    message = str(refusal.value)
    assert "\n" not in message and "model.safetensors.index.json" in message
    assert problem in message and repr(shard) in message
    assert "secret" not in message.replace(str(tmp_path), "")  # no byte of the target


def test_shard_links_into_the_hugging_face_cache_blobs_are_followed(tmp_path):
    """The HF cache keeps every file as snapshots/<rev>/name -> ../../blobs/<hash>."""
    repo = tmp_path / "models--someone--clip"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, key in enumerate(("a", "b"), 1):
        blob = repo / "blobs" / f"{number:040d}"
        save_file({key: torch.full((2,), float(number))}, blob)
        (snapshot / f"model-0000{number}-of-00002.safetensors").symlink_to(
            Path("../../blobs") / blob.name
        )
    sharded_folder(
        snapshot, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    )
    state_dict, config = read_weights(snapshot)
    assert sorted(state_dict) == ["a", "b"] and config == {}
    assert torch.equal(state_dict["b"], torch.full((2,), 2.0))


def test_a_missing_shard_is_named_with_its_index(tmp_path):
    folder = sharded_folder(tmp_path / "model", {"a": "model-00001-of-00002.safetensors"})
    with pytest.raises(WeightsError, match=r"index.json: shard 'model-00001-of-00002.safetensors'"):
        read_weights(folder)


# caches that are files --------------------------------------------------------------------


def test_hub_cache_that_is_a_file_is_refused_with_a_hint(tmp_path, monkeypatch, caplog):
    weights = tmp_path / "ViT-L-14.pt"
    weights.write_bytes(b"not a folder")
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(weights))
    with pytest.raises(NotADirectoryError, match="is a file, not a folder: point it at a folder"):
        hub.cache_dir()
    with caplog.at_level(logging.ERROR):
        assert main(["download", "ViT-B/32"]) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"ANOMALYCLIP_CACHE={weights} is a file" in line and "--clip-weights FILE" in line
    assert "Errno" not in line


def test_feature_cache_that_is_a_file_is_refused_with_a_hint(tmp_path):
    not_a_folder = tmp_path / "features"
    not_a_folder.write_text("")
    with pytest.raises(NotADirectoryError, match=f"{not_a_folder} is a file, not a folder"):
        FeatureCache(tiny_training_model(), not_a_folder)


# a full disk under the feature cache -------------------------------------------------------


@pytest.mark.parametrize("kind", ["enospc", "unexpected pos"])
def test_a_full_feature_cache_disk_disables_the_cache_once_and_training_goes_on(
    glass_manifest, tmp_path, caplog, monkeypatch, kind
):
    """Bug: training died with `[enforce fail at inline_container.cc:672] . unexpected pos`."""
    images = [s.image for s in open_dataset(glass_manifest, allow_outside_paths=True)][:3]
    expected = FeatureCache(tiny_training_model(), memory=False).embeddings(images)
    if kind == "enospc":  # every atomic write fails, the cache's key.json first
        monkeypatch.setattr(atomic.os, "fsync", disk_full(kind))
    else:  # torch's writer stops short inside the entries
        monkeypatch.setattr(torch, "save", disk_full(kind))
    with caplog.at_level(logging.WARNING):
        cache = FeatureCache(tiny_training_model(), tmp_path / "features", memory=False)
        got = [cache.embeddings(images) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "feature cache disabled for the rest of this run" in warnings[0]
    assert "no space left on device" in warnings[0] and str(tmp_path / "features") in warnings[0]
    assert cache.stats.computed == 6 and not list((tmp_path / "features").rglob("*.pt"))
    for embeddings in got:
        assert torch.equal(embeddings.global_embedding, expected.global_embedding)


# a full disk under the training output -----------------------------------------------------


@pytest.mark.parametrize("kind", ["enospc", "unexpected pos"])
def test_a_full_output_disk_stops_training_in_one_line_and_keeps_the_last_epoch(
    glass_manifest, clip_file, tmp_path, caplog, monkeypatch, kind
):
    """Bug: `[enforce fail at inline_container.cc:672] . unexpected pos` at epoch 9."""
    real_save = torch.save
    calls = []

    def full_at_second_checkpoint(obj: object, handle: object, *args: object, **kw: object):
        calls.append(1)
        if len(calls) == 2:
            disk_full(kind)()
        real_save(obj, handle, *args, **kw)

    monkeypatch.setattr(torch, "save", full_at_second_checkpoint)
    out = tmp_path / "run"
    common = [f"csv={glass_manifest}", "--clip-weights", str(clip_file), *TRAINING_FLAGS]
    with caplog.at_level(logging.ERROR):
        code = main(["train", *common, "-o", str(out), "--epochs", "3"])
    assert code == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"cannot write {out / 'epoch_2.pt'}: no space left on device")
    assert f"the last complete checkpoint is {out / 'epoch_1.pt'}" in line and "\n" not in line
    assert caplog.text.count("Traceback") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "epoch_1.pt",
        "train_log.csv",
        "train_log.json",
    ]
    assert torch.load(out / "epoch_1.pt", weights_only=True)["extra"]["epoch"] == 1


# a damaged last checkpoint at resume ------------------------------------------------------


def overwrite_inside_a_tensor(path: Path) -> None:
    """64 bytes of the first prompt tensor's data replaced: the file still unpickles."""
    tensor = next(iter(torch.load(path, weights_only=True)["prompt_learner"].values()))
    data = bytearray(path.read_bytes())
    at = bytes(data).index(tensor.numpy().tobytes()[:64])
    data[at : at + 64] = torch.full((16,), 1e31).numpy().tobytes()
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [truncate, overwrite_inside_a_tensor])
def test_resume_falls_back_from_a_damaged_last_checkpoint(glass_manifest, tmp_path, caplog, damage):
    dataset = open_dataset(glass_manifest, allow_outside_paths=True)
    whole = train(
        tiny_training_model(), dataset, tmp_path / "whole", TrainOptions(epochs=3), progress=False
    )
    run = tmp_path / "run"
    train(tiny_training_model(), dataset, run, TrainOptions(epochs=2), progress=False)
    damage(run / "epoch_2.pt")
    damaged = (run / "epoch_2.pt").read_bytes()

    with caplog.at_level(
        logging.WARNING, logger="anomalyclip.methods.anomalyclip.training_checkpoints"
    ):
        result = train(
            tiny_training_model(), dataset, run, TrainOptions(epochs=3), resume=True, progress=False
        )
    assert result.resumed_from == 1
    (warning,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == "anomalyclip.methods.anomalyclip.training_checkpoints"
    ]
    assert str(run / "epoch_2.pt") in warning and f"resuming from {run / 'epoch_1.pt'}" in warning
    if damage is overwrite_inside_a_tensor:
        assert "checksum mismatch" in warning
    assert "kept as epoch_2.pt.damaged" in warning
    assert (run / "epoch_2.pt.damaged").read_bytes() == damaged  # kept, never deleted
    assert (run / "epoch_2.pt").read_bytes() != damaged
    assert sorted(find_checkpoints(run)) == [1, 2, 3]
    expected = torch.load(whole.checkpoint, weights_only=True)["prompt_learner"]
    resumed = torch.load(run / "epoch_3.pt", weights_only=True)["prompt_learner"]
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_resume_with_no_intact_checkpoint_says_so_and_moves_nothing(glass_manifest, tmp_path):
    dataset = open_dataset(glass_manifest, allow_outside_paths=True)
    train(tiny_training_model(), dataset, tmp_path, TrainOptions(epochs=1), progress=False)
    truncate(tmp_path / "epoch_1.pt")
    with pytest.raises(ValueError, match="cannot resume: no checkpoint in .* is intact"):
        train(tiny_training_model(), dataset, tmp_path, TrainOptions(epochs=2), resume=True)
    assert (tmp_path / "epoch_1.pt").is_file() and not list(tmp_path.glob("*.damaged*"))


@pytest.mark.parametrize("garbage", [b"", b"damaged", b"PK\x03\x04" + bytes(60)])
def test_an_unreadable_cache_entry_is_recomputed_saying_why(
    glass_manifest, tmp_path, caplog, garbage
):
    """The reason is never empty (the attack saw "unreadable ()")."""
    images = [s.image for s in open_dataset(glass_manifest, allow_outside_paths=True)][:1]
    first = FeatureCache(tiny_training_model(), tmp_path, memory=False)
    expected = first.embeddings(images)
    (entry,) = first.directory.rglob("*.pt")
    entry.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="anomalyclip.methods.anomalyclip.embedding_cache"):
        again = FeatureCache(tiny_training_model(), tmp_path, memory=False)
        got = again.embeddings(images)
    (warning,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == "anomalyclip.methods.anomalyclip.embedding_cache"
    ]
    assert f"{entry} is not a readable feature cache entry: " in warning
    assert warning.endswith("; recomputing") and "()" not in warning
    reason = warning.split("entry: ", 1)[1].removesuffix("; recomputing").strip()
    assert reason == "the file is empty" if not garbage else reason
    assert again.stats.computed == 1
    assert torch.equal(got.global_embedding, expected.global_embedding)

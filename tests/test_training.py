"""Training: the loss it optimises, checkpoints and resume, the feature cache, the CLI."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from anomalyclip.cli import main
from anomalyclip.data import open_dataset
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.embedding_cache import CacheKey, FeatureCache
from anomalyclip.methods.anomalyclip.losses import glocal_loss, local_loss
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.methods.anomalyclip.training import (
    TrainOptions,
    batch_loss,
    select_embeddings,
    train,
)
from tests.factories import tiny_clip, write_manifest
from tests.helpers import TINY, TRAINING_FLAGS, tiny_training_model


@pytest.fixture(scope="module")
def headct_manifest(shared_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("headct")
    root = shared_dir / "datasets" / "headct"
    rows = [(p, 0, None, "headct") for p in sorted((root / "good").iterdir())[:4]]
    rows += [(p, 1, None, "headct") for p in sorted((root / "anomaly").iterdir())[:4]]
    return write_manifest(folder / "headct.csv", rows)


def random_batch(model: AnomalyCLIP, batch: int = 4):
    torch.manual_seed(3)
    images = torch.randn(batch, 3, 32, 32)
    masks = (torch.rand(batch, 32, 32) > 0.8).float()
    masks[0] = 0
    labels = torch.tensor([0] + [1] * (batch - 1))
    return model.encode_image(images), labels, masks


def prompt_state(model: AnomalyCLIP) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.prompt_learner.state_dict().items()}


# the loss -----------------------------------------------------------------------------


def test_batch_loss_is_the_glocal_loss_for_one_class_with_masks():
    model = tiny_training_model()
    embeddings, labels, masks = random_batch(model)
    expected = glocal_loss(model, embeddings, labels, masks, lam=4.0)
    got = batch_loss(model, embeddings, labels, masks, [True] * 4, None, "glocal", 4.0)
    assert torch.equal(got.total, expected.total)
    assert torch.equal(got.image, expected.image)
    assert torch.equal(got.local, expected.local)
    only_global = batch_loss(model, embeddings, labels, masks, [True] * 4, None, "global")
    assert only_global.local is None and torch.equal(only_global.total, expected.image)
    only_local = batch_loss(model, embeddings, labels, masks, [True] * 4, None, "local")
    assert only_local.image is None and torch.equal(only_local.total, expected.local)


def test_batch_loss_is_a_per_image_mean_over_classes_and_unknown_masks():
    """Object-aware prompts (one text per class) and an image without pixel truth: the
    loss is still the mean over the batch of each image's own terms."""
    model = tiny_training_model(prompt_mode="aware")
    embeddings, labels, masks = random_batch(model)
    names = ["bottle", "screw", "bottle", "screw"]
    truth = [True, True, False, True]
    got = batch_loss(model, embeddings, labels, masks, truth, names, "glocal", 4.0)
    image_terms, local_terms = [], []
    for index in range(4):
        one = select_embeddings(embeddings, [index])
        text = model.compute_text_features(names[index])
        logits = model.image_logits(one, text)
        image_terms.append(torch.nn.functional.cross_entropy(logits, labels[[index]]))
        if truth[index]:
            probabilities = model.layer_probabilities(one, text, (32, 32))
            local_terms.append(4.0 * local_loss(probabilities, masks[[index]]))
    assert got.image.item() == pytest.approx(sum(image_terms).item() / 4, rel=1e-6)
    assert got.local.item() == pytest.approx(sum(local_terms).item() / 4, rel=1e-6)
    assert got.total.item() == pytest.approx(got.image.item() + got.local.item(), rel=1e-7)


def test_options_are_checked():
    with pytest.raises(ValueError, match="loss must be one of glocal, global, local"):
        TrainOptions(loss="focal")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainOptions(epochs=0)


# training runs ------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_checkpoints_and_logs(glass_manifest, tmp_path):
    dataset = open_dataset(glass_manifest, allow_outside_paths=True)
    model = tiny_training_model()
    start = prompt_state(model)
    result = train(model, dataset, tmp_path, TrainOptions(epochs=3, batch_size=4), progress=False)
    losses = [entry.loss for entry in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert [entry.images_encoded for entry in result.history] == [12, 0, 0]
    assert all(p.grad is None for p in model.clip.parameters())
    assert not torch.equal(start["ctx_pos"], model.prompt_learner.ctx_pos)

    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == [
        "epoch_1.pt",
        "epoch_2.pt",
        "epoch_3.pt",
    ]
    data = torch.load(tmp_path / "epoch_2.pt", weights_only=True)
    extra = data["extra"]
    assert extra["epoch"] == 2
    assert extra["options"]["betas"] == [0.5, 0.999] and extra["options"]["seed"] == 111
    assert set(extra["optimizer"]["state"]) == set(range(len(extra["optimizer"]["state"])))
    assert isinstance(extra["rng"]["torch"], torch.Tensor)
    assert [e["loss"] for e in extra["history"]] == losses[:2]
    assert data["config"]["features"] == [2, 4]

    with (tmp_path / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses, rel=1e-12)
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["images"] == 12 and log["images_with_masks"] == 12
    assert log["options"]["lr"] == 1e-3
    assert [e["local_loss"] for e in log["epochs"]] == [e.local_loss for e in result.history]

    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(tiny_training_model(), dataset, tmp_path, TrainOptions(epochs=3, batch_size=4))


def test_cached_and_recomputed_features_give_the_same_losses(glass_manifest, tmp_path):
    dataset = open_dataset(glass_manifest, allow_outside_paths=True)
    options = TrainOptions(epochs=2, batch_size=4)
    cached_model = tiny_training_model()
    cached = train(cached_model, dataset, tmp_path / "cached", options, progress=False)
    plain_model = tiny_training_model()
    plain = train(
        plain_model,
        dataset,
        tmp_path / "plain",
        options,
        cache=FeatureCache(plain_model, memory=False),
        progress=False,
    )
    assert [e.images_encoded for e in plain.history] == [12, 12]
    assert [e.images_encoded for e in cached.history] == [12, 0]
    for a, b in zip(cached.history, plain.history, strict=True):
        assert (a.loss, a.image_loss, a.local_loss) == (b.loss, b.image_loss, b.local_loss)
    for name, value in prompt_state(cached_model).items():
        assert torch.equal(value, prompt_state(plain_model)[name]), name


def test_disk_cache_is_reused_only_for_the_same_key(glass_manifest, tmp_path):
    dataset = open_dataset(glass_manifest, allow_outside_paths=True)
    images = [s.image for s in dataset][:3]
    model = tiny_training_model()
    first = FeatureCache(model, tmp_path, memory=False)
    computed = first.embeddings(images)
    assert first.stats.computed == 3
    entries = list(first.directory.rglob("*.pt"))
    assert len(entries) == 3
    assert json.loads((first.directory / "key.json").read_text())["image_size"] == 32

    again = FeatureCache(tiny_training_model(), tmp_path)
    read = again.embeddings(images)
    assert (again.stats.disk_hits, again.stats.computed) == (3, 0)
    assert torch.equal(read.global_embedding, computed.global_embedding)
    for layer in (2, 4):
        assert torch.equal(read.patch_tokens[layer], computed.patch_tokens[layer])
    again.embeddings(images)
    assert again.stats.memory_hits == 3

    other_size = FeatureCache(tiny_training_model(image_size=48), tmp_path)
    other_layers = FeatureCache(tiny_training_model(features=(3, 4)), tmp_path)
    other_backbone = FeatureCache(
        AnomalyCLIP(tiny_clip(seed=5), AnomalyCLIPConfig(**TINY)), tmp_path
    )
    for cache in (other_size, other_layers, other_backbone):
        assert cache.directory != first.directory
        cache.embeddings(images[:1])
        assert cache.stats.computed == 1 and cache.stats.disk_hits == 0

    entries[0].write_bytes(b"damaged")
    repaired = FeatureCache(tiny_training_model(), tmp_path)
    repaired.embeddings(images)
    assert (repaired.stats.disk_hits, repaired.stats.computed) == (2, 1)


def test_overwritten_bytes_inside_a_cache_entry_are_caught_by_its_checksum(
    glass_manifest, tmp_path, caplog
):
    """Bug: 64 overwritten bytes inside an entry loaded fine and fed 1e31 into training."""
    images = [s.image for s in open_dataset(glass_manifest, allow_outside_paths=True)][:2]
    first = FeatureCache(tiny_training_model(), tmp_path, memory=False)
    expected = first.embeddings(images)
    entry = sorted(first.directory.rglob("*.pt"))[0]
    record = torch.load(entry, weights_only=True)
    data = bytearray(entry.read_bytes())
    needle = record["global"].numpy().tobytes()[:64]
    at = bytes(data).index(needle)  # inside the stored tensor's bytes
    data[at : at + 64] = torch.full((16,), 1e31).numpy().tobytes()
    entry.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = FeatureCache(tiny_training_model(), tmp_path, memory=False).embeddings(images)
    assert "checksum mismatch; recomputing" in caplog.text
    assert torch.equal(again.global_embedding, expected.global_embedding)


def test_cache_key_covers_what_the_embeddings_depend_on():
    base = CacheKey.for_model(tiny_training_model())
    assert CacheKey.for_model(tiny_training_model()).digest == base.digest
    for change in (dict(dpam_mode="qq"), dict(dpam_layers=2), dict(global_head="clip")):
        assert CacheKey.for_model(tiny_training_model(**change)).digest != base.digest, change
    # prompts and smoothing do not change the image embeddings
    assert CacheKey.for_model(tiny_training_model(seed=1, sigma=2.0)).digest == base.digest


def test_image_level_data_trains_the_global_loss_and_says_so(headct_manifest, tmp_path, caplog):
    dataset = open_dataset(headct_manifest, allow_outside_paths=True)
    assert not dataset.pixel_level
    with caplog.at_level(logging.WARNING, logger="anomalyclip.methods.anomalyclip.training"):
        result = train(
            tiny_training_model(), dataset, tmp_path, TrainOptions(epochs=1), progress=False
        )
    assert "training on image-level labels only: global loss" in caplog.text
    entry = result.history[0]
    assert entry.local_loss is None and entry.loss == entry.image_loss
    with pytest.raises(ValueError, match="no pixel ground truth"):
        train(tiny_training_model(), dataset, tmp_path / "local", TrainOptions(loss="local"))


def test_a_trainable_backbone_is_refused(glass_manifest, tmp_path):
    model = tiny_training_model()
    model.clip.visual.proj.requires_grad_(True)
    with pytest.raises(RuntimeError, match="must be frozen"):
        train(model, open_dataset(glass_manifest, allow_outside_paths=True), tmp_path)


# the command line ---------------------------------------------------------------------


def test_cli_resume_gives_the_same_prompts_as_an_uninterrupted_run(
    glass_manifest, clip_file, tmp_path
):
    common = [f"csv={glass_manifest}", "--clip-weights", str(clip_file), *TRAINING_FLAGS]
    assert main(["train", *common, "-o", str(tmp_path / "whole"), "--epochs", "3"]) == 0
    parts = tmp_path / "parts"
    assert main(["train", *common, "-o", str(parts), "--epochs", "1"]) == 0
    assert sorted(p.name for p in parts.glob("epoch_*.pt")) == ["epoch_1.pt"]
    assert main(["train", *common, "-o", str(parts), "--epochs", "3", "--resume"]) == 0

    whole = torch.load(tmp_path / "whole" / "epoch_3.pt", weights_only=True)
    resumed = torch.load(parts / "epoch_3.pt", weights_only=True)
    for name, value in whole["prompt_learner"].items():
        assert torch.equal(value, resumed["prompt_learner"][name]), name
    assert [e["loss"] for e in whole["extra"]["history"]] == [
        e["loss"] for e in resumed["extra"]["history"]
    ]
    assert whole["extra"]["history"][-1]["loss"] < whole["extra"]["history"][0]["loss"]
    assert len(json.loads((parts / "train_log.json").read_text())["epochs"]) == 3


def test_cli_resume_refuses_other_settings(glass_manifest, clip_file, tmp_path, caplog):
    common = [f"csv={glass_manifest}", "--clip-weights", str(clip_file), *TRAINING_FLAGS]
    assert main(["train", *common, "-o", str(tmp_path), "--epochs", "1"]) == 0
    with caplog.at_level(logging.ERROR):
        code = main(
            ["train", *common, "-o", str(tmp_path), "--epochs", "2", "--resume", "--lam", "1"]
        )
    assert code == 2
    assert "cannot resume from" in caplog.text and "lam: checkpoint 4.0, now 1.0" in caplog.text
    assert not (tmp_path / "epoch_2.pt").exists()


def test_cli_refuses_to_train_a_hand_written_baseline(glass_manifest, clip_file, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(
            [
                "train",
                f"csv={glass_manifest}",
                "--clip-weights",
                str(clip_file),
                "-o",
                str(tmp_path),
                "--preset",
                "winclip",
            ]
        )
    assert code == 2 and "nothing to train" in caplog.text


def test_cli_init_starts_from_earlier_prompts(glass_manifest, clip_file, tmp_path):
    """Fine-tuning: --init takes a checkpoint's prompts (and settings) as the start."""
    common = [f"csv={glass_manifest}", "--clip-weights", str(clip_file), *TRAINING_FLAGS]
    assert main(["train", *common, "-o", str(tmp_path / "first"), "--epochs", "1"]) == 0
    start = tmp_path / "first" / "epoch_1.pt"
    assert (
        main(
            ["train", *common, "-o", str(tmp_path / "tuned"), "--epochs", "1", "--init", str(start)]
        )
        == 0
    )
    first = torch.load(start, weights_only=True)
    tuned = torch.load(tmp_path / "tuned" / "epoch_1.pt", weights_only=True)
    # One more epoch from the first run's prompts: the loss starts where the first ended.
    assert tuned["extra"]["history"][0]["loss"] < first["extra"]["history"][0]["loss"]
    assert not torch.equal(tuned["prompt_learner"]["ctx_pos"], first["prompt_learner"]["ctx_pos"])


def test_training_without_masks_says_global_loss_throughout(clip_file, tmp_path, caplog):
    """Bug: the log said "global loss" and then "glocal loss" for a set without masks."""
    from PIL import Image

    rows = []
    for index in range(4):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (32, 32), (index * 50, 100, 30)).save(path)
        rows.append((path, index % 2, None, "parts"))
    manifest = write_manifest(tmp_path / "m.csv", rows)
    with caplog.at_level(logging.INFO):
        code = main(
            [
                "train",
                f"csv={manifest}",
                "--clip-weights",
                str(clip_file),
                *TRAINING_FLAGS,
                "-o",
                str(tmp_path / "run"),
                "--epochs",
                "1",
            ]
        )
    assert code == 0
    assert "global loss" in caplog.text and "glocal loss" not in caplog.text

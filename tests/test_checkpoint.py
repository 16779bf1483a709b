"""Prompt checkpoints: the authors' layout, ours, and refusals that say what differs."""

from __future__ import annotations

import pickle

import pytest
import torch

from anomalyclip.methods.anomalyclip.checkpoint import (
    apply_prompt_state,
    config_for,
    read_checkpoint,
    save_checkpoint,
)
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from tests.factories import tiny_clip

SMALL = dict(
    image_size=32, features=(2, 4), dpam_layers=3, n_ctx=5, prompt_depth=3, deep_prompt_length=2
)


def test_authors_checkpoint_shapes_are_inferred(reference_dir):
    checkpoint = read_checkpoint(reference_dir / "prompt_learner_checkpoint.pth")
    assert checkpoint.layout == "authors"
    config = config_for(checkpoint, AnomalyCLIPConfig(n_ctx=1, prompt_depth=1))
    assert (config.n_ctx, config.prompt_depth, config.deep_prompt_length) == (12, 9, 4)


def test_own_checkpoint_round_trip_restores_configuration(tmp_path):
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**SMALL, sigma=2.5))
    with torch.no_grad():
        model.prompt_learner.ctx_neg.normal_()
    path = save_checkpoint(tmp_path / "prompts.pt", model, extra={"epoch": 3})
    checkpoint = read_checkpoint(path)
    assert checkpoint.layout == "anomalyclip"
    assert checkpoint.config == model.config
    assert checkpoint.extra == {"epoch": 3}
    assert checkpoint.backbone["architecture"] == model.clip.arch.to_dict()
    restored = AnomalyCLIP(tiny_clip(), checkpoint.config)
    apply_prompt_state(restored, checkpoint)
    torch.testing.assert_close(restored.prompt_learner.ctx_neg, model.prompt_learner.ctx_neg)
    assert not list(tmp_path.glob(".*tmp"))


def test_authors_layout_loads_back(tmp_path):
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**SMALL))
    path = save_checkpoint(tmp_path / "epoch_15.pth", model, layout="authors")
    raw = torch.load(path, weights_only=True)
    assert raw["prompt_learner"]["compound_prompt_projections.0.weight"].shape == (896, 64)
    restored = AnomalyCLIP(
        tiny_clip(),
        config_for(
            read_checkpoint(path), AnomalyCLIPConfig(image_size=32, features=(2, 4), dpam_layers=3)
        ),
    )
    apply_prompt_state(restored, read_checkpoint(path))
    torch.testing.assert_close(restored.prompt_learner.ctx_pos, model.prompt_learner.ctx_pos)


def test_checkpoint_for_another_backbone_is_refused(tmp_path):
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**SMALL))
    path = save_checkpoint(tmp_path / "prompts.pt", model)
    other = AnomalyCLIP(tiny_clip(vision_layers=5), AnomalyCLIPConfig(**SMALL))
    with pytest.raises(ValueError, match="vision_layers 4 recorded, 5 given"):
        apply_prompt_state(other, read_checkpoint(path))
    authors = save_checkpoint(tmp_path / "authors.pth", model, layout="authors")
    reseeded = AnomalyCLIP(tiny_clip(seed=9), AnomalyCLIPConfig(**SMALL))
    with pytest.raises(ValueError, match="another CLIP backbone"):
        apply_prompt_state(reseeded, read_checkpoint(authors))


def test_shape_mismatch_names_both_shapes(tmp_path):
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**SMALL))
    path = save_checkpoint(tmp_path / "a.pth", model, layout="authors")
    other = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**{**SMALL, "n_ctx": 6}))
    with pytest.raises(ValueError, match="n_ctx=5.*n_ctx=6"):
        apply_prompt_state(other, read_checkpoint(path))


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"prompt_learner": _Exploit()}, handle)
    with pytest.raises(ValueError, match="refusing to load"):
        read_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "not a readable PyTorch checkpoint"), (b"garbage", "not a readable")],
)
def test_unreadable_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value)


def test_wrong_content_is_explained(tmp_path):
    path = tmp_path / "state.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="not an AnomalyCLIP prompt checkpoint.*model"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_checkpoint(tmp_path / "missing.pth")


def saved(tmp_path, change) -> str:
    """A valid checkpoint of ours, changed by ``change(data)`` and written again."""
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**SMALL))
    path = save_checkpoint(tmp_path / "good.pt", model)
    data = torch.load(path, weights_only=True)
    change(data)
    target = tmp_path / "changed.pt"
    torch.save(data, target)
    return str(target)


def test_non_finite_prompts_are_refused_naming_the_tensor(tmp_path):
    """Bug: a checkpoint with NaN prompts loaded and its NaN scores read as "normal"."""

    def poison(data):
        data["prompt_learner"]["ctx_pos"].view(-1)[0] = float("nan")

    with pytest.raises(ValueError, match=r"prompt_learner\.ctx_pos holds 1 non-finite values"):
        read_checkpoint(saved(tmp_path, poison))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format_version="2"), "format_version must be an integer, got '2'"),
        (lambda d: d.pop("prompt_learner"), "'prompt_learner' must be a dictionary, it is missing"),
        (lambda d: d.update(config="garbage"), "'config' must be a dictionary, it is a str"),
        (
            lambda d: d["config"].update(image_size="huge"),
            "configuration field 'image_size' must be an integer, got 'huge'",
        ),
        (
            lambda d: d["config"].update(features=["a"]),
            "configuration field 'features' must be a list of integers",
        ),
        (
            lambda d: d["prompt_learner"].update(ctx_pos="not a tensor"),
            r"prompt_learner\.ctx_pos is a str, not a tensor",
        ),
    ],
)
def test_malformed_checkpoints_get_one_line_naming_the_field(tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as caught:
        read_checkpoint(saved(tmp_path, change))
    assert "\n" not in str(caught.value) and "changed.pt" in str(caught.value)

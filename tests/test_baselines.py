"""Baselines and ablations: hand-written prompts, presets, and the options reaching the model."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anomalyclip.backbone.tokenizer import tokenize
from anomalyclip.cli import main
from anomalyclip.data import open_dataset
from anomalyclip.methods.anomalyclip.baselines import (
    ABNORMAL_STATES,
    NORMAL_STATES,
    WINCLIP_TEMPLATES,
    baseline_sentences,
    handcrafted_text_features,
)
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.methods.anomalyclip.presets import PRESETS, get_preset
from tests.factories import tiny_clip

TINY = dict(
    image_size=32, features=(2, 4), dpam_layers=3, prompt_depth=2, n_ctx=4, deep_prompt_length=2
)


def encode(clip, sentences):
    with torch.no_grad():
        return F.normalize(clip.encode_text(tokenize(sentences)).float(), dim=-1)


def test_winclip_sentences_are_every_state_in_every_template():
    normal, abnormal = baseline_sentences("winclip", "bottle")
    assert len(WINCLIP_TEMPLATES) == 22
    assert len(normal) == 7 * 22 and len(abnormal) == 5 * 22
    assert len(NORMAL_STATES) == 7 and len(ABNORMAL_STATES) == 5
    assert "a cropped photo of the flawless bottle." in normal
    assert "a photo of a bottle without defect for visual inspection." in normal
    assert "a bright photo of the broken bottle." in abnormal
    assert not set(normal) & set(abnormal)
    assert baseline_sentences("plain", "screw") == (
        ["a photo of a normal screw."],
        ["a photo of a damaged screw."],
    )
    with pytest.raises(ValueError, match="text_prompts must be one of learned, plain, winclip"):
        baseline_sentences("fancy", "screw")


def test_plain_prompts_are_the_normalised_pair():
    clip = tiny_clip()
    config = AnomalyCLIPConfig(text_prompts="plain", prompt_mode="aware")
    features = handcrafted_text_features(clip, config, "metal nut")
    expected = encode(clip, ["a photo of a normal metal nut.", "a photo of a damaged metal nut."])
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    # object-agnostic mode keeps the configured word whatever class is asked for
    agnostic = handcrafted_text_features(clip, config.replace(prompt_mode="agnostic"), "screw")
    expected = encode(clip, ["a photo of a normal object.", "a photo of a damaged object."])
    torch.testing.assert_close(agnostic, expected, rtol=0, atol=1e-6)


def test_winclip_features_average_normalised_embeddings_and_are_cached():
    clip = tiny_clip()
    config = AnomalyCLIPConfig(text_prompts="winclip", prompt_mode="aware")
    features = handcrafted_text_features(clip, config, "pill")
    normal, abnormal = baseline_sentences("winclip", "pill")
    expected = torch.stack(
        [F.normalize(encode(clip, s).mean(0), dim=-1) for s in (normal, abnormal)]
    )
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert features.norm(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert handcrafted_text_features(clip, config, "pill") is features


def test_the_model_uses_hand_written_prompts_when_configured():
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(text_prompts="plain", **TINY))
    torch.testing.assert_close(
        model.compute_text_features("bottle"),
        encode(model.clip, ["a photo of a normal object.", "a photo of a damaged object."]),
        rtol=0,
        atol=1e-6,
    )
    output = model(torch.randn(2, 3, 32, 32))
    assert output.image_scores.shape == (2,) and output.anomaly_maps.shape == (2, 32, 32)


def test_presets_make_valid_configurations():
    base = AnomalyCLIPConfig()
    assert get_preset("anomalyclip").apply(base, 24) == base
    assert get_preset("single-layer").apply(base, 24).features == (24,)
    assert get_preset("no-deep-prompts").apply(base, 24).prompt_depth == 1
    assert get_preset("no-dpam").apply(base, 24).dpam_layers == 0
    assert get_preset("dpam-kk").apply(base, 24).dpam_mode == "kk"
    assert get_preset("object-aware").apply(base, 24).prompt_mode == "aware"
    assert (get_preset("global-loss").loss, get_preset("local-loss").loss) == ("global", "local")
    winclip = get_preset("winclip").apply(base, 24)
    assert (winclip.text_prompts, winclip.prompt_mode, winclip.dpam_layers) == (
        "winclip",
        "aware",
        0,
    )
    assert not PRESETS["clip"].trained and not PRESETS["winclip"].trained
    for preset in PRESETS.values():
        preset.apply(base, 24).validate()
    with pytest.raises(ValueError, match="unknown preset 'dpam'; choose one of anomalyclip"):
        get_preset("dpam")


@pytest.mark.parametrize(
    "change", [dict(dpam_mode="qq"), dict(dpam_mode="kk"), dict(dpam_layers=0)]
)
def test_dpam_ablations_reach_the_patch_embeddings(change):
    torch.manual_seed(0)
    images = torch.randn(1, 3, 32, 32)
    base = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**TINY)).encode_image(images)
    config = AnomalyCLIPConfig(**{**TINY, **change})
    changed = AnomalyCLIP(tiny_clip(), config).encode_image(images)
    # the original stream, and so the global embedding, is the same in every DPAM variant
    torch.testing.assert_close(changed.global_embedding, base.global_embedding)
    assert not torch.allclose(changed.patch_tokens[4], base.patch_tokens[4], atol=1e-3)


def test_single_layer_map_is_that_layers_map():
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**{**TINY, "features": (4,)}))
    output = model(torch.randn(2, 3, 32, 32), keep_layer_maps=True)
    assert list(output.layer_maps) == [4]
    torch.testing.assert_close(output.raw_maps, output.layer_maps[4])


def test_no_deep_prompts_has_only_the_context_vectors():
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**{**TINY, "prompt_depth": 1}))
    names = [name for name, _ in model.prompt_learner.named_parameters()]
    assert names == ["ctx_pos", "ctx_neg"]
    model.compute_text_features().sum().backward()
    assert model.prompt_learner.ctx_pos.grad is not None


@pytest.fixture(scope="module")
def glass_sample(shared_dir, tmp_path_factory) -> Path:
    """A manifest of 4 normal and 4 anomalous images of the shared glass dataset."""
    dataset = open_dataset(shared_dir / "datasets" / "glass")
    chosen = [s for s in dataset if s.label == 0][:4] + [s for s in dataset if s.label][:4]
    path = tmp_path_factory.mktemp("glass") / "glass.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "mask", "category"])
        writer.writerows([s.image, s.label, s.mask or "", "glass"] for s in chosen)
    return path


def test_cli_evaluates_a_baseline_preset_without_a_checkpoint(glass_sample, clip_file, tmp_path):
    code = main(
        [
            "test",
            str(glass_sample),
            "--allow-outside-paths",
            "--preset",
            "winclip",
            "--clip-weights",
            str(clip_file),
            "--image-size",
            "32",
            "--features",
            "2",
            "4",
            "--prompt-depth",
            "2",
            "--no-progress",
            "-o",
            str(tmp_path / "results"),
        ]
    )
    assert code == 0
    data = json.loads((tmp_path / "results" / "glass" / "results.json").read_text())
    config = data["settings"]["config"]
    assert (config["text_prompts"], config["prompt_mode"], config["dpam_layers"]) == (
        "winclip",
        "aware",
        0,
    )
    assert config["global_head"] == "clip"
    assert all(isinstance(data["mean"][m], float) for m in ("image_auroc", "pixel_aupro"))


def test_cli_single_layer_preset_uses_the_last_layer(glass_sample, clip_file, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        code = main(
            [
                "test",
                str(glass_sample),
                "--allow-outside-paths",
                "--checkpoint",
                "none",
                "--preset",
                "single-layer",
                "--clip-weights",
                str(clip_file),
                "--image-size",
                "32",
                "--dpam-layers",
                "3",
                "--prompt-depth",
                "2",
                "--no-progress",
                "-o",
                str(tmp_path / "results"),
            ]
        )
    assert code == 0
    assert "the prompts are untrained" in caplog.text
    data = json.loads((tmp_path / "results" / "glass" / "results.json").read_text())
    assert data["settings"]["config"]["features"] == [4]

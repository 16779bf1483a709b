"""CLIP weights in every layout users have load into the same model, and unsafe files do not.

One small random CLIP is written as an OpenAI state dict (fp16), a TorchScript archive, in
open_clip's layouts and as a Hugging Face ``CLIPModel`` (safetensors, sharded, bin); each
must load to the same features, and the Hugging Face one to what ``transformers`` computes.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from anomalyclip.backbone import loading
from anomalyclip.backbone.clip import CLIP
from anomalyclip.backbone.layouts import LayoutError, detect_layout, to_openai_layout
from anomalyclip.backbone.loading import UntrustedFileError, WeightsError, load_clip
from tests.factories import tiny_clip

WIDTH, HEADS, EMBED, PATCH, GRID, LAYERS, VOCAB, CONTEXT = 128, 2, 32, 8, 4, 2, 1000, 16
ARCH = dict(
    embed_dim=EMBED,
    vision_width=WIDTH,
    vision_layers=LAYERS,
    vision_patch_size=PATCH,
    vision_grid=GRID,
    vision_heads=HEADS,
    context_length=CONTEXT,
    vocab_size=VOCAB,
    text_width=WIDTH,
    text_layers=LAYERS,
    text_heads=HEADS,
)
BOS, EOS = VOCAB - 2, VOCAB - 1
ATOL = 1e-5


def fp16_exact_clip(seed: int = 0, **overrides) -> CLIP:
    """A tiny CLIP whose weights survive fp16, as OpenAI's files store them."""
    model = tiny_clip(seed, **{**ARCH, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model


def sample_tokens() -> torch.Tensor:
    """Start and end tokens around random words, zero padding, end-of-text at 3 positions."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.zeros(3, CONTEXT, dtype=torch.long)
    for row, length in enumerate((4, 9, CONTEXT - 2)):
        tokens[row, 0] = BOS
        tokens[row, 1 : length + 1] = torch.randint(1, BOS, (length,), generator=generator)
        tokens[row, length + 1] = EOS
    return tokens


IMAGES = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1))
TOKENS = sample_tokens()


def features(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(IMAGES), model.encode_text(TOKENS)


def assert_same_features(model: CLIP, expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, text = features(model)
    torch.testing.assert_close(image, expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(text, expected[1], atol=ATOL, rtol=0)


def hf_config(heads: int = HEADS, activation: str = "quick_gelu") -> transformers.CLIPConfig:
    tower = dict(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        hidden_act=activation,
    )
    return transformers.CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=VOCAB,
            max_position_embeddings=CONTEXT,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=0,
        ),
        vision_config=dict(tower, image_size=GRID * PATCH, patch_size=PATCH),
        projection_dim=EMBED,
    )


def openai_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse mapping, written independently of the loader's."""
    hf = {
        "logit_scale": state_dict["logit_scale"],
        "text_projection.weight": state_dict["text_projection"].T,
        "visual_projection.weight": state_dict["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": state_dict["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state_dict["positional_embedding"],
        "vision_model.embeddings.class_embedding": state_dict["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state_dict["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state_dict[
            "visual.positional_embedding"
        ],
    }
    for ours, theirs in (
        ("ln_final", "text_model.final_layer_norm"),
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
    ):
        for kind in ("weight", "bias"):
            hf[f"{theirs}.{kind}"] = state_dict[f"{ours}.{kind}"]
    for ours, theirs in (
        ("transformer.resblocks", "text_model.encoder.layers"),
        ("visual.transformer.resblocks", "vision_model.encoder.layers"),
    ):
        for layer in range(LAYERS):
            src, dst = f"{ours}.{layer}.", f"{theirs}.{layer}."
            for kind in ("weight", "bias"):
                q, k, v = state_dict[f"{src}attn.in_proj_{kind}"].chunk(3)
                for name, part in (("q", q), ("k", k), ("v", v)):
                    hf[f"{dst}self_attn.{name}_proj.{kind}"] = part
                for a, b in (
                    ("attn.out_proj", "self_attn.out_proj"),
                    ("ln_1", "layer_norm1"),
                    ("ln_2", "layer_norm2"),
                    ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"),
                ):
                    hf[f"{dst}{b}.{kind}"] = state_dict[f"{src}{a}.{kind}"]
    return {key: value.contiguous() for key, value in hf.items()}


def hf_model(clip: CLIP, **config) -> transformers.CLIPModel:
    model = transformers.CLIPModel(hf_config(**config)).eval()
    model.load_state_dict(openai_to_hf(clip.state_dict()), strict=True)
    return model


def hf_features(model: transformers.CLIPModel) -> tuple[torch.Tensor, torch.Tensor]:
    def tensor(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    with torch.no_grad():
        image = tensor(model.get_image_features(pixel_values=IMAGES))
        text = tensor(model.get_text_features(input_ids=TOKENS))
    return image, text


def open_clip_custom_text(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CustomTextCLIP: text tower under ``text.``, plus buffers open_clip may save."""
    custom = {}
    for key, value in state_dict.items():
        is_text = not key.startswith("visual.") and key != "logit_scale"
        custom[f"text.{key}" if is_text else key] = value
    custom["text.attn_mask"] = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    custom["logit_bias"] = torch.tensor(-10.0)
    return custom


@pytest.fixture(scope="module")
def source() -> CLIP:
    return fp16_exact_clip()


@pytest.fixture(scope="module")
def expected(source) -> tuple[torch.Tensor, torch.Tensor]:
    return features(source)


@pytest.fixture(scope="module")
def files(source, tmp_path_factory) -> dict[str, Path]:
    """The same weights in every layout."""
    folder = tmp_path_factory.mktemp("layouts")
    state_dict = source.state_dict()
    paths = {name: folder / name for name in ("openai.pt", "torchscript.pt")}
    torch.save({k: v.half() for k, v in state_dict.items()}, paths["openai.pt"])

    scripted_source = copy.deepcopy(source)
    for name, value in (("input_resolution", 32), ("context_length", CONTEXT), ("vocab_size", 1)):
        scripted_source.register_buffer(name, torch.tensor(value))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's deprecation and constant-branch notices
        traced = torch.jit.trace_module(scripted_source, {"encode_image": IMAGES})
        torch.jit.save(traced.half(), paths["torchscript.pt"])

    paths["open_clip.safetensors"] = folder / "open_clip.safetensors"
    save_file(
        {**state_dict, "attn_mask": torch.zeros(CONTEXT, CONTEXT)}, paths["open_clip.safetensors"]
    )
    paths["open_clip_custom_text.pt"] = folder / "open_clip_custom_text.pt"
    training_checkpoint = {
        "epoch": 3,
        "name": "run",
        "state_dict": {f"module.{k}": v for k, v in open_clip_custom_text(state_dict).items()},
    }
    torch.save(training_checkpoint, paths["open_clip_custom_text.pt"])

    hf = hf_model(source)
    for name, kwargs in (("hf_safetensors", {}), ("hf_sharded", {"max_shard_size": "1MB"})):
        paths[name] = folder / name
        hf.save_pretrained(paths[name], **kwargs)
    paths["hf_bin"] = folder / "hf_bin"
    hf.config.save_pretrained(paths["hf_bin"])
    torch.save(hf.state_dict(), paths["hf_bin"] / "pytorch_model.bin")
    paths["hf_single_file"] = folder / "hf_single_file.safetensors"
    save_file(openai_to_hf(state_dict), paths["hf_single_file"])
    return paths


def test_hf_fixture_is_what_transformers_computes(source, expected):
    """The inverse mapping is right: transformers, on the mapped weights, gives our features."""
    image, text = hf_features(hf_model(source))
    torch.testing.assert_close(image, expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(text, expected[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "name",
    [
        "openai.pt",
        "torchscript.pt",
        "open_clip.safetensors",
        "open_clip_custom_text.pt",
        "hf_safetensors",
        "hf_sharded",
        "hf_bin",
        "hf_single_file",
    ],
)
def test_every_layout_loads_to_the_same_model(files, source, expected, name):
    model = load_clip(files[name])
    assert model.arch == source.arch
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    loaded, original = model.state_dict(), source.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    assert_same_features(model, expected)


def test_hf_folder_is_split_into_shards(files):
    index = json.loads((files["hf_sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_torchscript_archive_loads_as_data_without_trust(files, expected, monkeypatch):
    """No trust flag and no TorchScript: the default backbone's format survives jit's removal."""

    def no_jit(*_args, **_kwargs):
        raise AssertionError("torch.jit was asked to load the archive")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    model = load_clip(files["torchscript.pt"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert_same_features(model, expected)
    assert_same_features(load_clip(files["torchscript.pt"]), expected)


def test_registered_name_resolves_through_the_hub(files, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "registry.json"))
    with pytest.raises(FileNotFoundError, match="'ViT-H-14': no such file, and not a registered"):
        load_clip("ViT-H-14")
    asked = []
    monkeypatch.setattr(
        loading, "resolve_backbone", lambda name: asked.append(name) or files["openai.pt"]
    )
    assert_same_features(load_clip("ViT-L/14@336px"), expected)
    assert asked == ["ViT-L/14@336px"]


class CodeRunningPayload:
    """Unpickling this creates a folder: proof that the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.conv1.weight": CodeRunningPayload(marker)}}, path)
    with pytest.raises(UntrustedFileError, match="could run code") as refusal:
        load_clip(path)
    assert str(path) in str(refusal.value) and "posix.mkdir" in str(refusal.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.is_dir()


def test_fp16_file_loads_in_float32_and_converts_on_request(files):
    assert load_clip(files["openai.pt"]).visual.proj.dtype == torch.float32
    model = load_clip(files["openai.pt"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.visual.conv1.weight.device == torch.device("cpu")


def test_open_clip_gelu_model_needs_and_takes_the_activation(tmp_path):
    model = fp16_exact_clip(seed=2, activation="gelu")
    path = tmp_path / "open_clip_gelu.pt"
    torch.save(open_clip_custom_text(model.state_dict()), path)
    expected = features(model)

    assert load_clip(path).arch.activation == "quick_gelu"
    loaded = load_clip(path, activation="gelu")
    assert loaded.arch == model.arch
    assert_same_features(loaded, expected)

    folder = tmp_path / "hub_folder"
    folder.mkdir()
    model_cfg = {
        "embed_dim": EMBED,
        "vision_cfg": {"image_size": 32, "layers": LAYERS, "width": WIDTH, "patch_size": PATCH},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH},
    }
    model_cfg["text_cfg"].update(heads=HEADS, layers=LAYERS)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    from_folder = load_clip(folder)
    assert from_folder.arch == model.arch
    assert_same_features(from_folder, expected)


def test_hf_config_supplies_heads_and_activation(tmp_path):
    """Four heads of 32 and GELU: nothing the tensors alone could tell."""
    source = fp16_exact_clip(seed=3, vision_heads=4, text_heads=4, activation="gelu")
    hf = hf_model(source, heads=4, activation="gelu")
    hf.save_pretrained(tmp_path / "hf")
    model = load_clip(tmp_path / "hf")
    assert (model.arch.vision_heads, model.arch.text_heads, model.arch.activation) == (
        4,
        4,
        "gelu",
    )
    image, text = hf_features(hf)
    assert_same_features(model, (image, text))

    assert load_clip(tmp_path / "hf" / "model.safetensors").arch == model.arch
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    assert load_clip(alone).arch.vision_heads == 2
    overridden = load_clip(alone, vision_heads=4, text_heads=4, activation="gelu")
    assert_same_features(overridden, (image, text))


def test_hf_config_that_contradicts_the_tensors_is_refused(files, tmp_path):
    folder = tmp_path / "bad_config"
    folder.mkdir()
    config = json.loads((files["hf_safetensors"] / "config.json").read_text())
    config["vision_config"]["patch_size"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(
        (files["hf_safetensors"] / "model.safetensors").read_bytes()
    )
    with pytest.raises(WeightsError, match="vision_patch_size=16 but the tensors say 8"):
        load_clip(folder)


def test_detect_layout(source):
    state_dict = source.state_dict()
    assert detect_layout(state_dict) == "openai"
    assert detect_layout({f"module.{k}": v for k, v in state_dict.items()}) == "openai"
    assert detect_layout(open_clip_custom_text(state_dict)) == "open_clip"
    assert detect_layout({**state_dict, "attn_mask": torch.zeros(1)}) == "open_clip"
    assert detect_layout(openai_to_hf(state_dict)) == "hf"
    assert detect_layout({"visual.layer1.0.conv1.weight": torch.zeros(1)}) == "resnet"
    assert detect_layout({"conv1.weight": torch.zeros(1)}) == "unknown"


def test_to_openai_layout_returns_model_keys_and_architecture(source):
    converted, arch = to_openai_layout(openai_to_hf(source.state_dict()))
    assert arch == source.arch
    assert converted.keys() == source.state_dict().keys()
    assert converted["visual.proj"].shape == (WIDTH, EMBED)


def save(path: Path, state_dict: dict) -> Path:
    torch.save(state_dict, path)
    return path


def test_missing_and_unexpected_keys_are_named(source, tmp_path):
    state_dict = source.state_dict()
    missing = {k: v for k, v in state_dict.items() if k != "visual.ln_post.bias"}
    path = save(tmp_path / "missing.pt", missing)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): visual\.ln_post\.bias") as error:
        load_clip(path)
    assert str(path) in str(error.value)

    extra = {**state_dict, "visual.adapter.weight": torch.zeros(3)}
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): visual\.adapter\.weight"):
        load_clip(save(tmp_path / "extra.pt", extra))

    hf = openai_to_hf(state_dict)
    del hf["vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(
        LayoutError, match=r"visual\.transformer\.resblocks\.1\. lacks k_proj\.bias"
    ):
        to_openai_layout(hf)


def test_what_is_not_clip_is_refused_with_the_reason(source, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt not found"):
        load_clip(tmp_path / "nowhere.pt")

    text_file = tmp_path / "notes.pt"
    text_file.write_text("not weights")
    with pytest.raises(WeightsError, match="not a recognised weights file") as error:
        load_clip(text_file)
    assert str(text_file) in str(error.value) and "safetensors" in str(error.value)

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="it is empty"):
        load_clip(empty)

    resnet = {
        "visual.layer1.0.conv1.weight": torch.zeros(1),
        "token_embedding.weight": torch.zeros(1),
    }
    with pytest.raises(WeightsError, match="ResNet CLIP models are not supported"):
        load_clip(save(tmp_path / "rn50.pt", resnet))

    classifier = {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"not CLIP weights .* 2 entries under conv1, fc"):
        load_clip(save(tmp_path / "resnet50.pth", classifier))

    prompts = {"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 2, 8)}}
    with pytest.raises(WeightsError, match="prompt checkpoint"):
        load_clip(save(tmp_path / "epoch_15.pth", prompts))

    visual_only = {k: v for k, v in source.state_dict().items() if k.startswith("visual.")}
    with pytest.raises(WeightsError, match="both the visual and the text tower"):
        load_clip(save(tmp_path / "visual.pt", visual_only))

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "readme.txt").write_text("")
    with pytest.raises(WeightsError, match=r"folder without recognised weights \(found readme.txt"):
        load_clip(folder)


def test_reference_weights_architecture(shared_dir):
    model = load_clip(shared_dir / "reference" / "paper" / "clip_openai_layout.pt")
    arch = model.arch
    assert (arch.vision_layers, arch.vision_width, arch.vision_patch_size) == (24, 128, 14)
    assert (arch.vision_grid, arch.embed_dim, arch.activation) == (24, 96, "quick_gelu")
    assert model.visual.proj.dtype == torch.float32

"""DINOv2, number for number: the official code's features in shared/reference/anomalydino
and shared/reference/musc_dinov2 through the public loader; the official, timm and Hugging
Face layouts of ViT-S/14 (with and without registers) giving identical outputs; Hugging
Face's own forward; and a literal re-derivation (plain tensor arithmetic, a hand-written
bicubic) on other widths, depths, registers and grids."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from anomalyclip.backbone.dinov2 import DINOv2, DINOv2Architecture, interpolate_positions
from anomalyclip.backbone.dinov2_layouts import detect_dinov2_layout, load_dinov2
from anomalyclip.backbone.loading import WeightsError
from anomalyclip.methods.musc.dinov2 import MuScDINOv2
from anomalyclip.preprocess import load_image

RTOL, ATOL = 1e-5, 1e-4
VIT_S = {"width": 384, "depth": 12, "heads": 6, "mlp_width": 1536}


def close(got, expected) -> bool:
    return np.allclose(np.asarray(got), np.asarray(expected), rtol=RTOL, atol=ATOL)


# the official code's vectors --------------------------------------------------------------


@pytest.fixture(scope="module")
def dino_reference(shared_dir):
    directory = shared_dir / "reference" / "anomalydino"
    meta = json.loads((directory / "expected.json").read_text())
    return directory, dict(np.load(directory / "expected.npz")), meta


@pytest.fixture(scope="module")
def reference_model(dino_reference) -> DINOv2:
    directory, _, _ = dino_reference
    return load_dinov2(directory / "dinov2_small_random.pth")


def test_reference_weights_are_the_official_layout(dino_reference, reference_model):
    directory, _, meta = dino_reference
    path = directory / "dinov2_small_random.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["weights_sha256"]
    state = torch.load(path, weights_only=True)
    assert list(state) == meta["weight_keys"]
    assert detect_dinov2_layout(state) == "official"
    official = meta["architecture"]
    arch = reference_model.arch
    assert (arch.width, arch.depth, arch.heads, arch.patch) == (
        official["embed_dim"],
        official["depth"],
        official["num_heads"],
        official["patch_size"],
    )
    assert arch.mlp_width == official["mlp_ratio"] * official["embed_dim"]
    assert arch.grid * arch.patch == official["img_size"]
    assert arch.registers == official["num_register_tokens"]
    assert arch.interpolate_offset == official["interpolate_offset"]
    assert arch.interpolate_antialias == official["interpolate_antialias"]


def test_features_and_positional_tables_at_448(dino_reference, reference_model):
    _, expected, _ = dino_reference
    for index in expected["subset"]:
        image = torch.from_numpy(expected[f"image.{index}"])[None]
        with torch.no_grad():
            features = reference_model.patch_features(image)[0]
        assert close(features, expected[f"patch_features.{index}"])
        table = interpolate_positions(reference_model.pos_embed, (32, 32), reference_model.arch)
        assert close(table[0], expected[f"pos_embed.{index}"])


def literal_bicubic(grid: np.ndarray, scale: tuple[float, float], size: tuple[int, int]):
    """PyTorch's bicubic (A = -0.75, align_corners False, borders clamped) by hand, with
    the source coordinate (i + 0.5) / scale - 0.5 taken from the scale given."""

    def weights(t: float) -> list[float]:
        a = -0.75

        def near(x: float) -> float:
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x: float) -> float:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    def axis(length: int, out: int, factor: float) -> np.ndarray:
        matrix = np.zeros((out, length))
        for i in range(out):
            x = (i + 0.5) / factor - 0.5
            base = math.floor(x)
            for offset, w in zip(range(-1, 3), weights(x - base), strict=True):
                matrix[i, min(max(base + offset, 0), length - 1)] += w
        return matrix

    rows = axis(grid.shape[0], size[0], scale[0])
    columns = axis(grid.shape[1], size[1], scale[1])
    return np.einsum("ri,ijc,sj->rsc", rows, grid, columns)


def test_positional_offset_rule_by_hand(dino_reference, reference_model):
    """(g + 0.1) / 37 as the scale, not a plain resize to g: the official table."""
    _, expected, _ = dino_reference
    table = reference_model.pos_embed[0, 1:].double().numpy().reshape(37, 37, -1)
    literal = literal_bicubic(table, (32.1 / 37, 32.1 / 37), (32, 32)).reshape(1024, -1)
    assert close(literal, expected["pos_embed.0"][1:])
    plain = F.interpolate(
        reference_model.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2),
        size=(32, 32),
        mode="bicubic",
    )
    plain_rows = plain.permute(0, 2, 3, 1).reshape(1024, -1).numpy()
    assert np.abs(plain_rows - expected["pos_embed.0"][1:]).max() > 0.05


@pytest.fixture(scope="module")
def musc_dinov2_reference(shared_dir):
    directory = shared_dir / "reference" / "musc_dinov2"
    meta = json.loads((directory / "expected.json").read_text())
    return dict(np.load(directory / "expected.npz")), meta


@pytest.fixture(scope="module")
def musc_inputs(musc_dinov2_reference, reference_model, shared_dir):
    expected, meta = musc_dinov2_reference
    musc = MuScDINOv2(reference_model)
    paths = [shared_dir / "datasets" / name for name in meta["images"]]
    images = torch.stack([musc.preprocessor.tensor(load_image(p)) for p in paths])
    return musc, images


def test_musc_on_dinov2_features(musc_dinov2_reference, musc_inputs):
    """The stage MuSc-on-DINOv2 adds: 518 px squash (bilinear), ImageNet norm, final-norm
    blocks 3 6 9 12 behind a zero class token, raw final-norm class tokens."""
    expected, meta = musc_dinov2_reference
    musc, images = musc_inputs
    assert musc.config.features == tuple(meta["feature_layers_1based"])
    assert musc.config.image_size == meta["img_resize"]
    subset = expected["subset"]
    assert close(images[subset], expected["image"])
    tokens, class_tokens = musc.features(images[subset])
    for layer in meta["feature_layers_1based"]:
        assert close(tokens[layer], expected[f"patch_tokens_layer{layer}"])
    assert close(class_tokens, expected["class_tokens"][subset])


@pytest.mark.slow
def test_musc_on_dinov2_reproduces_the_official_run(musc_dinov2_reference, musc_inputs):
    """Then the existing LNAMD, MSM, maps and RsCIN: every array of the official run."""
    expected, meta = musc_dinov2_reference
    musc, images = musc_inputs
    output = musc.run(images, keep_features=True)
    for layer in meta["feature_layers_1based"]:
        for degree in meta["r_list"]:
            got = output.msm[(degree, layer)]
            assert close(got, expected[f"msm_r{degree}_layer{layer}"])
    assert close(output.lnamd[(3, 3)][expected["subset"]], expected["lnamd_r3_layer3"])
    assert close(output.class_tokens, expected["class_tokens"])
    assert close(output.patch_scores, expected["patch_scores"])
    assert close(output.anomaly_maps, expected["anomaly_map"])
    assert close(output.image_scores_raw, expected["image_score_raw"])
    assert close(output.image_scores, expected["image_score"])


# layouts ----------------------------------------------------------------------------------


def hf_config(registers: int, width: int, depth: int, heads: int, image_size: int):
    settings = {
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "mlp_ratio": 4,
        "image_size": image_size,
        "patch_size": 14,
        "layer_norm_eps": 1e-6,
    }
    if registers:
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **settings)
    return transformers.Dinov2Config(**settings)


def hf_model(config) -> torch.nn.Module:
    """A Hugging Face DINOv2 with every parameter randomised (LayerScale and norms too)."""
    torch.manual_seed(0)
    if isinstance(config, transformers.Dinov2WithRegistersConfig):
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(torch.randn_like(parameter) * (0.3 if "embeddings" in name else 0.05))
    return model.eval()


def official_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key map written out literally, as Hugging Face's DINOv2 files name things."""
    out: dict[str, torch.Tensor] = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.mask_token": state["mask_token"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if "register_tokens" in state:
        out["embeddings.register_tokens"] = state["register_tokens"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for n in range(depth):
        hf, ours = f"encoder.layer.{n}.", f"blocks.{n}."
        for kind in ("weight", "bias"):
            parts = state[f"{ours}attn.qkv.{kind}"].chunk(3)
            for name, part in zip(("query", "key", "value"), parts, strict=True):
                out[f"{hf}attention.attention.{name}.{kind}"] = part.clone()
            out[f"{hf}attention.output.dense.{kind}"] = state[f"{ours}attn.proj.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{hf}{name}.{kind}"] = state[f"{ours}{name}.{kind}"]
        out[f"{hf}layer_scale1.lambda1"] = state[f"{ours}ls1.gamma"]
        out[f"{hf}layer_scale2.lambda1"] = state[f"{ours}ls2.gamma"]
    return out


def official_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ``_convert_dinov2``: mask token dropped; with registers, the class position
    folded into the class token and removed from the table (no_embed_class)."""
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, 0]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def save_hf_folder(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.mark.parametrize(
    ("registers", "depth"),
    [
        (0, 2),
        (4, 2),
        pytest.param(0, 12, marks=pytest.mark.slow),
        pytest.param(4, 12, marks=pytest.mark.slow),
    ],
)
def test_vit_s_layouts_give_identical_outputs(tmp_path, registers, depth):
    """ViT-S/14's real keys and shapes (37 x 37 table, 4 registers or none) in the official,
    timm and Hugging Face layouts load to the same model, bit for bit (all 12 blocks in
    the slow run, 2 otherwise)."""
    arch = DINOv2Architecture(
        **{**VIT_S, "depth": depth},
        registers=registers,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
    )
    official = random_state(arch, seed=registers)
    assert official["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(official, tmp_path / "official.pth")
    timm = official_to_timm(official)
    torch.save(timm, tmp_path / "timm.pth")
    assert detect_dinov2_layout(timm) == "timm"
    folder = tmp_path / "hf"
    hf_config(registers, 384, depth, 6, 518).save_pretrained(folder)
    save_file(official_to_hf(official), str(folder / "model.safetensors"), {"format": "pt"})
    loaded = [load_dinov2(p) for p in (tmp_path / "official.pth", tmp_path / "timm.pth", folder)]
    assert all(dinov2.arch == arch for dinov2 in loaded)
    images = torch.randn(2, 3, 70, 98)
    with torch.no_grad():
        outputs = [m.forward_intermediates(images, [1, depth]) for m in loaded]
    for output in outputs[1:]:
        for block in (1, depth):
            torch.testing.assert_close(
                output.patch_tokens[block], outputs[0].patch_tokens[block], rtol=1e-6, atol=1e-6
            )
        torch.testing.assert_close(output.class_token, outputs[0].class_token, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("registers", "height", "width"), [(0, 56, 56), (4, 56, 56), (4, 28, 42)])
def test_hugging_face_forward(tmp_path, registers, height, width):
    """Our model from a Hugging Face folder against ``transformers`` itself: at the trained
    grid for both classes, and shrunk (antialiased size rule) for the register model,
    whose interpolation is the official one (Dinov2Model's is not: it drops the offset)."""
    model = hf_model(hf_config(registers, 64, 3, 2, 56))
    folder = save_hf_folder(model, tmp_path / "hf")
    written = load_file(str(folder / "model.safetensors"))
    # the literal key map of the ViT-S test names exactly what transformers writes
    dinov2 = load_dinov2(folder)
    assert official_to_hf(dinov2.state_dict()).keys() == written.keys()
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        hidden = model(pixel_values=images).last_hidden_state
        output = dinov2.forward_intermediates(images)
    torch.testing.assert_close(
        output.patch_tokens[3], hidden[:, 1 + registers :], atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(output.class_token, hidden[:, 0], atol=2e-5, rtol=1e-5)
    # transformers 5 names in memory (q_proj, o_proj); no config, so the heads are given
    in_memory = load_dinov2(model.state_dict(), heads=2)
    with torch.no_grad():
        torch.testing.assert_close(in_memory(images), output.class_token)


# other shapes against a literal re-derivation ---------------------------------------------


def literal_forward(
    state: dict[str, torch.Tensor], images: torch.Tensor, arch: DINOv2Architecture
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's final-norm patch tokens and the class token, by plain arithmetic."""
    width, patch, heads = arch.width, arch.patch, arch.heads
    batch, _, height, image_width = images.shape
    rows, columns = height // patch, image_width // patch
    patches = images.unfold(2, patch, patch).unfold(3, patch, patch)  # B,3,r,c,p,p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, rows * columns, -1)
    x = patches @ state["patch_embed.proj.weight"].reshape(width, -1).T
    x = x + state["patch_embed.proj.bias"]
    table = state["pos_embed"][0]
    if (rows, columns) != (arch.grid, arch.grid):
        grid = table[1:].double().numpy().reshape(arch.grid, arch.grid, width)
        offset = arch.interpolate_offset
        scale = ((rows + offset) / arch.grid, (columns + offset) / arch.grid)
        resized = literal_bicubic(grid, scale, (rows, columns)).reshape(rows * columns, width)
        table = torch.cat((table[:1], torch.from_numpy(resized).float()))
    x = torch.cat((state["cls_token"].expand(batch, 1, width), x), dim=1) + table
    if arch.registers:
        x = torch.cat((x[:, :1], state["register_tokens"].expand(batch, -1, -1), x[:, 1:]), 1)

    def norm(values: torch.Tensor, name: str) -> torch.Tensor:
        mean = values.mean(-1, keepdim=True)
        variance = ((values - mean) ** 2).mean(-1, keepdim=True)
        return (values - mean) / torch.sqrt(variance + 1e-6) * state[f"{name}.weight"] + state[
            f"{name}.bias"
        ]

    outputs = []
    for n in range(arch.depth):
        p = f"blocks.{n}."
        h = norm(x, p + "norm1") @ state[p + "attn.qkv.weight"].T + state[p + "attn.qkv.bias"]
        q, k, v = h.reshape(batch, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, -1, width)
        x = x + state[p + "ls1.gamma"] * (
            attended @ state[p + "attn.proj.weight"].T + state[p + "attn.proj.bias"]
        )
        h = norm(x, p + "norm2") @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        h = h @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
        x = x + state[p + "ls2.gamma"] * h
        outputs.append(norm(x, "norm")[:, 1 + arch.registers :])
    return outputs, norm(x, "norm")[:, 0]


def random_state(arch: DINOv2Architecture, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DINOv2(arch).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator) * 0.1
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
            values = values + 1
        if name.endswith(("_token", "pos_embed")):
            values = values * 5
        state[name] = values
    return state


@pytest.mark.parametrize(
    ("arch", "size"),
    [
        (DINOv2Architecture(96, 3, 3, 192, grid=6), (42, 70)),  # grow, non-square
        (DINOv2Architecture(64, 2, 1, 256, grid=4), (56, 56)),  # the trained grid
        (DINOv2Architecture(48, 2, 2, 96, 2, 8, 5, interpolate_offset=0.0), (32, 56)),
    ],
)
def test_other_shapes_by_hand(arch, size):
    """Widths, depths, heads, patch sizes and registers, against plain arithmetic (the
    register model without antialias here, the hand-written bicubic being unaliased;
    the antialiased rule is checked against Hugging Face's register model)."""
    state = random_state(arch, seed=arch.width)
    model = DINOv2.from_state_dict(state, arch)
    images = torch.randn(2, 3, *size)
    expected, class_token = literal_forward(state, images, arch)
    with torch.no_grad():
        output = model.forward_intermediates(images, range(1, arch.depth + 1))
    for block in range(1, arch.depth + 1):
        torch.testing.assert_close(
            output.patch_tokens[block], expected[block - 1], atol=2e-5, rtol=1e-5
        )
    assert output.class_token is not None
    torch.testing.assert_close(output.class_token, class_token, atol=2e-5, rtol=1e-5)
    without_norm = model.forward_intermediates(images, [1], norm=False)
    assert not torch.allclose(without_norm.patch_tokens[1], output.patch_tokens[1])
    assert without_norm.class_token is None  # the last block did not run


def test_register_rule_shrinks_with_antialias():
    arch = DINOv2Architecture(
        32, 1, 1, 64, registers=4, grid=37, interpolate_offset=0.0, interpolate_antialias=True
    )
    table = torch.randn(1, 1 + 37 * 37, 32)
    resized = interpolate_positions(table, (16, 20), arch)
    grid = table[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 20), mode="bicubic", antialias=True)
    torch.testing.assert_close(resized[0, 1:], expected[0].permute(1, 2, 0).reshape(-1, 32))
    assert torch.equal(interpolate_positions(table, (37, 37), arch), table)


# refusals ---------------------------------------------------------------------------------


@pytest.fixture
def small_state() -> dict[str, torch.Tensor]:
    return random_state(DINOv2Architecture(32, 2, 1, 64, grid=3), seed=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s["blocks.1.mlp.fc1.bias"].__setitem__(0, float("nan")),
            "blocks.1.mlp.fc1.bias",
        ),
        (lambda s: s.__setitem__("blocks.0.ls1.gamma", torch.ones(31)), "blocks.0.ls1.gamma"),
        (lambda s: s.pop("norm.bias"), "missing key norm.bias"),
        (lambda s: s.__setitem__("blocks.0.extra", torch.ones(1)), "unexpected key blocks.0.extra"),
        (lambda s: s.__setitem__("pos_embed", torch.ones(1, 11, 32)), "square grid"),
    ],
)
def test_refusals_name_the_file_and_the_key(tmp_path, small_state, change, message):
    change(small_state)
    path = tmp_path / "bad.pth"
    torch.save(small_state, path)
    with pytest.raises(WeightsError, match=message) as caught:
        load_dinov2(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_not_dinov2(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"visual.conv1.weight": torch.ones(2, 3, 4, 4)}, str(path))
    with pytest.raises(WeightsError, match="not DINOv2 weights"):
        load_dinov2(path)
    with pytest.raises(FileNotFoundError):
        load_dinov2(tmp_path / "missing.pth")

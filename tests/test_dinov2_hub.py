"""Registered DINOv2 names: the official addresses, trust on first use (no checksum is
published: the first copy's SHA-256 is recorded, a later change refused), resolution by
name for AnomalyDINO and MuSc like CLIP names, the offline message; and ViT-g/14's SwiGLU
against a literal re-derivation."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip import hub
from anomalyclip.backbone.dinov2 import DINOv2, DINOv2Architecture
from anomalyclip.backbone.dinov2_layouts import is_dinov2_weights, load_dinov2
from anomalyclip.hub import registry
from anomalyclip.methods.anomalydino import create_anomalydino
from anomalyclip.methods.musc.factory import create_musc
from tests.helpers import cli

OFFICIAL = "https://dl.fbaipublicfiles.com/dinov2"


def test_registry_names_the_official_dinov2_files():
    names = {f"dinov2_vit{size}14{suffix}" for size in "sblg" for suffix in ("", "_reg")}
    assert set(hub.DINOV2_BACKBONES) == names
    small = hub.lookup_backbone("dinov2_vits14")
    assert small is not None and small.trust_on_first_use and small.sha256 is None
    assert small.url == f"{OFFICIAL}/dinov2_vits14/dinov2_vits14_pretrain.pth"
    giant_reg = hub.lookup_backbone("dinov2_vitg14_reg")
    assert giant_reg is not None
    assert giant_reg.url == f"{OFFICIAL}/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    assert hub.is_dinov2_name("dinov2_vitl14") and not hub.is_dinov2_name("ViT-L/14")
    assert is_dinov2_weights("dinov2_vitb14_reg") and not is_dinov2_weights("ViT-L/14@336px")
    assert set(hub.BACKBONES) == {"ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"}


def tiny_state(seed: int = 0, **changes) -> dict[str, torch.Tensor]:
    """A small random DINOv2 in the official key layout."""
    arch = DINOv2Architecture(
        **{"width": 32, "depth": 2, "heads": 2, "mlp_width": 64, "grid": 4, **changes}
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DINOv2(arch).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator) * 0.1
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
            values = values + 1
        state[name] = values
    return state


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.delenv("ANOMALYCLIP_OFFLINE", raising=False)
    monkeypatch.setattr(hub.transfer, "RETRY_DELAY_S", 0.0)
    return tmp_path / "cache"


def published(tmp_path: Path, name: str, seed: int = 0) -> tuple[Path, hub.RemoteFile]:
    """A DINOv2 file at a file:// address, registered as ``name`` with no checksum."""
    source = tmp_path / "share" / f"{name}_pretrain.pth"
    source.parent.mkdir(exist_ok=True)
    torch.save(tiny_state(seed), source)
    entry = hub.RemoteFile(name, source.as_uri(), source.name, trust_on_first_use=True)
    return source, entry


def test_first_download_records_the_sha256_and_says_so(cache, tmp_path, caplog, monkeypatch):
    source, entry = published(tmp_path, "dinov2_vits14")
    with caplog.at_level(logging.WARNING):
        path = hub.fetch(entry, progress=False)
    digest = hub.backbone_sha256(source)
    assert path == entry.cache_path() and path.read_bytes() == source.read_bytes()
    record = json.loads(entry.recorded_path().read_text())
    assert record["sha256"] == digest and record["url"] == source.as_uri()
    assert entry.checksum == f"sha256:{digest}" and entry.known_sha256 == digest
    assert "no checksum is published; recorded the SHA-256" in caplog.text
    assert digest in caplog.text
    # the cache lists it, and a later run takes the copy without downloading
    source.unlink()
    assert hub.fetch(entry, progress=False) == path
    monkeypatch.setitem(registry.DINOV2_BACKBONES, "dinov2_vits14", entry)
    listed = {e.name: e for e in hub.list_cached()}
    assert (listed["dinov2_vits14"].status, listed["dinov2_vits14"].checksum) == (
        "ok",
        f"sha256:{digest}",
    )


def test_a_changed_file_is_refused_after_the_first_use(cache, tmp_path):
    source, entry = published(tmp_path, "dinov2_vits14")
    path = hub.fetch(entry, progress=False)
    first = entry.recorded_sha256()
    torch.save(tiny_state(seed=1), source)  # the publisher's file changes
    path.write_bytes(b"tampered")  # and the cached copy is damaged: fetched again
    with pytest.raises(hub.DownloadError, match="the file at this address has changed since"):
        hub.fetch(entry, progress=False, attempts=1)
    assert entry.recorded_sha256() == first and not path.exists()
    assert not hub.is_verified(entry, source)  # the new content is not the recorded one


def test_a_damaged_copy_is_fetched_again_when_the_source_is_unchanged(cache, tmp_path):
    source, entry = published(tmp_path, "dinov2_vits14")
    path = hub.fetch(entry, progress=False)
    path.write_bytes(b"damaged")
    assert not hub.is_verified(entry, path)
    assert hub.fetch(entry, progress=False).read_bytes() == source.read_bytes()
    entry.recorded_path().write_text("{}")  # a damaged record trusts nothing
    with pytest.raises(ValueError, match=r"dinov2_vits14_pretrain.pth.sha256: not a record of"):
        hub.fetch(entry, progress=False)


def test_a_copy_put_in_the_cache_by_hand_is_recorded_at_first_use(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    source, entry = published(tmp_path, "dinov2_vits14")
    entry.cache_path().parent.mkdir(parents=True)
    entry.cache_path().write_bytes(source.read_bytes())
    assert hub.fetch(entry, progress=False) == entry.cache_path()
    assert entry.recorded_sha256() == hub.backbone_sha256(source)


def test_offline_message_for_a_registered_dinov2(cache, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    image = tmp_path / "part.png"
    Image.new("RGB", (28, 28)).save(image)
    code = cli("predict", image, "--method", "anomalydino", "--reference", image)
    message = caplog.text
    assert code != 0 and "Traceback" not in message
    entry = hub.DINOV2_BACKBONES["dinov2_vits14"]
    assert "`anomalyclip download dinov2_vits14`" in message
    assert f"  dinov2_vits14: {OFFICIAL}/dinov2_vits14/dinov2_vits14_pretrain.pth" in message
    assert f"put it at {entry.cache_path()}" in message
    assert "checksum sha256 not published (recorded at first download)" in message


def test_unknown_dinov2_name_lists_the_registered_ones():
    with pytest.raises(FileNotFoundError, match=r"not a registered DINOv2 \(dinov2_vits14, "):
        create_anomalydino("dinov2_vits15")


def registered(monkeypatch, tmp_path: Path, name: str, seed: int = 0) -> Path:
    source, entry = published(tmp_path, name, seed)
    monkeypatch.setitem(registry.DINOV2_BACKBONES, name, entry)
    return source


def noise_images(folder: Path, count: int, size: int = 42) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    paths = []
    for index in range(count):
        path = folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_anomalydino_resolves_its_default_name_through_the_cache(cache, tmp_path, monkeypatch):
    source = registered(monkeypatch, tmp_path, "dinov2_vits14")
    references = noise_images(tmp_path / "refs", 2)
    images = noise_images(tmp_path / "test", 3)
    by_name = create_anomalydino("dinov2_vits14", references, image_size=28, rotation=False)
    by_file = create_anomalydino(source, references, image_size=28, rotation=False)
    assert by_name.identity.name == "dinov2_vits14"
    assert by_name.identity.sha256 == hub.backbone_sha256(source)
    assert by_name.bank.identity["backbone_sha256"] == by_name.identity.sha256
    loaded = [Image.open(p) for p in images]
    expected = [r.score for r in by_file.score_images(loaded)]
    assert [r.score for r in by_name.score_images(loaded)] == pytest.approx(expected, abs=1e-6)
    # the CLI's default backbone is the same name; the copy is now cached
    source.unlink()
    out = tmp_path / "out.jsonl"
    flags = ("--image-size", "28", "--no-rotation", "--no-progress", "--output", out)
    assert (
        cli("predict", *images, "--method", "anomalydino", "--reference", *references, *flags) == 0
    )
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_download_fills_the_cache_and_records_the_digest(cache, tmp_path, monkeypatch, capsys):
    source = registered(monkeypatch, tmp_path, "dinov2_vitb14_reg", seed=2)
    assert cli("download", "dinov2_vitb14_reg", "--no-progress") == 0
    entry = hub.DINOV2_BACKBONES["dinov2_vitb14_reg"]
    assert capsys.readouterr().out == f"dinov2_vitb14_reg\t{entry.cache_path()}\n"
    assert entry.recorded_sha256() == hub.backbone_sha256(source)


def test_musc_resolves_a_registered_dinov2(cache, tmp_path, monkeypatch):
    registered(monkeypatch, tmp_path, "dinov2_vitl14", seed=3)
    model = create_musc("dinov2_vitl14", overrides={"image_size": 28, "features": [1, 2]})
    assert model.backbone.name == "dinov2_vitl14"
    assert model.backbone.sha256 == hub.DINOV2_BACKBONES["dinov2_vitl14"].recorded_sha256()
    images = noise_images(tmp_path / "set", 3)
    out = tmp_path / "musc.jsonl"
    flags = ("--image-size", "28", "--features", "1", "2", "--no-progress", "--output", out)
    assert cli("predict", *images, "--method", "musc", "--backbone", "dinov2_vitl14", *flags) == 0
    assert len(out.read_text().splitlines()) == 3


# ViT-g/14: SwiGLU ------------------------------------------------------------------------


def swiglu_literal(
    state: dict[str, torch.Tensor], images: torch.Tensor, heads: int
) -> torch.Tensor:
    """Final-norm patch tokens of a SwiGLU DINOv2 on its trained grid, by plain arithmetic
    (the official ``SwiGLUFFN``: x1, x2 = chunk(w12 x); w3(silu(x1) * x2))."""
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    batch = len(images)
    patches = images.unfold(2, patch, patch).unfold(3, patch, patch)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, 3 * patch * patch)
    x = (
        patches @ state["patch_embed.proj.weight"].reshape(width, -1).T
        + state["patch_embed.proj.bias"]
    )
    x = torch.cat((state["cls_token"].expand(batch, 1, width), x), dim=1) + state["pos_embed"]

    def norm(values: torch.Tensor, name: str) -> torch.Tensor:
        mean = values.mean(-1, keepdim=True)
        variance = ((values - mean) ** 2).mean(-1, keepdim=True)
        scaled = (values - mean) / torch.sqrt(variance + 1e-6)
        return scaled * state[f"{name}.weight"] + state[f"{name}.bias"]

    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for n in range(depth):
        p = f"blocks.{n}."
        h = norm(x, p + "norm1") @ state[p + "attn.qkv.weight"].T + state[p + "attn.qkv.bias"]
        q, k, v = h.reshape(batch, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, -1, width)
        x = x + state[p + "ls1.gamma"] * (
            attended @ state[p + "attn.proj.weight"].T + state[p + "attn.proj.bias"]
        )
        h = norm(x, p + "norm2") @ state[p + "mlp.w12.weight"].T + state[p + "mlp.w12.bias"]
        hidden = h.shape[-1] // 2
        gate, value = h[..., :hidden], h[..., hidden:]
        h = (gate / (1 + torch.exp(-gate))) * value
        x = x + state[p + "ls2.gamma"] * (
            h @ state[p + "mlp.w3.weight"].T + state[p + "mlp.w3.bias"]
        )
    return norm(x, "norm")[:, 1:]


def swiglu_state() -> dict[str, torch.Tensor]:
    # the giant's proportions, small: hidden = (int(4 * width * 2 / 3) + 7) // 8 * 8
    width = 192  # three 64-wide heads, as a file's head count is read
    hidden = (int(4 * width * 2 / 3) + 7) // 8 * 8
    return tiny_state(seed=5, width=width, heads=3, mlp_width=hidden, feed_forward="swiglu")


def test_swiglu_feed_forward_against_a_literal_re_derivation(tmp_path):
    state = swiglu_state()
    assert state["blocks.0.mlp.w12.weight"].shape == (2 * 512, 192)
    torch.save(state, tmp_path / "dinov2_vitg14_like.pth")
    model = load_dinov2(tmp_path / "dinov2_vitg14_like.pth")
    assert (model.arch.feed_forward, model.arch.mlp_width, model.arch.heads) == ("swiglu", 512, 3)
    assert model.arch.to_dict()["feed_forward"] == "swiglu"
    assert "feed_forward" not in load_dinov2(tiny_state()).arch.to_dict()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got = model.patch_features(images)
    torch.testing.assert_close(got, swiglu_literal(state, images, heads=3), atol=2e-5, rtol=1e-5)


def test_swiglu_in_timm_and_hugging_face_layouts_loads_the_same():
    state = swiglu_state()
    timm = {
        k.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2."): v
        for k, v in state.items()
        if k != "mask_token"
    }
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = load_dinov2(state, heads=3).patch_features(images)
        torch.testing.assert_close(load_dinov2(timm, heads=3).patch_features(images), expected)
    hf_names = {"mlp.w12.": "mlp.weights_in.", "mlp.w3.": "mlp.weights_out."}
    hf = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, number, rest = key.split(".", 2)
            for old, new in hf_names.items():
                rest = rest.replace(old, new)
            rest = rest.replace("ls1.gamma", "layer_scale1.lambda1")
            rest = rest.replace("ls2.gamma", "layer_scale2.lambda1")
            rest = rest.replace("attn.proj.", "attention.output.dense.")
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for part, chunk in zip(("query", "key", "value"), value.chunk(3), strict=True):
                    hf[f"encoder.layer.{number}.attention.attention.{part}.{kind}"] = chunk
                continue
            hf[f"encoder.layer.{number}.{rest}"] = value
        else:
            hf[key] = value
    with torch.no_grad():
        torch.testing.assert_close(load_dinov2(hf, heads=3).patch_features(images), expected)


# predict --save-bank ----------------------------------------------------------------------


def test_predict_saves_the_bank_it_used_and_reuses_it(tmp_path, caplog):
    from anomalyclip.methods.anomalydino import AnomalyDINOBank

    weights = tmp_path / "dino.pth"
    torch.save(tiny_state(seed=7), weights)
    references = noise_images(tmp_path / "refs", 2)
    images = noise_images(tmp_path / "test", 3)
    common = ("--method", "anomalydino", "--backbone", weights, "--image-size", "28")
    bank_file, first, second = (
        tmp_path / "line3.bank.pt",
        tmp_path / "a.jsonl",
        tmp_path / "b.jsonl",
    )
    assert (
        cli(
            "predict", *images, *common, "--reference", *references,
            "--save-bank", bank_file, "--bank-dtype", "float16",
            "--output", first, "--no-progress",
        )
        == 0
    )  # fmt: skip
    bank = AnomalyDINOBank.load(bank_file)
    assert bank.features.dtype == torch.float16 and bank.count == 2
    assert bank.size == 2 * 8 * 4  # 2 references x 8 rotations x a 2 x 2 grid
    assert cli("predict", *images, *common, "--reference", bank_file, "--output", second) == 0
    scores = [
        [json.loads(line)["score"] for line in path.read_text().splitlines()]
        for path in (first, second)
    ]
    assert scores[1] == pytest.approx(scores[0], abs=2e-3)  # float16 storage
    assert scores[1] != pytest.approx([0.0] * 3)
    caplog.clear()
    assert cli("predict", *images, *common, "--save-bank", tmp_path / "none.pt") != 0
    assert "AnomalyDINO has no reference bank here: give --reference images" in caplog.text
    assert not (tmp_path / "none.pt").exists()

"""Small random models and files for tests: nothing is downloaded."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from anomalyclip.backbone.clip import CLIP, CLIPArchitecture
from anomalyclip.data import open_dataset

ManifestRow = tuple[Path, int, Path | None, str]


def tiny_architecture(**overrides) -> CLIPArchitecture:
    """A CLIP small enough for a test to run in well under a second.

    Heads are width // 64, as loaders infer them from a state dict, so a model built here
    equals the same model saved and loaded again.
    """
    fields = dict(
        embed_dim=32,
        vision_width=64,
        vision_layers=4,
        vision_patch_size=8,
        vision_grid=4,
        vision_heads=1,
        context_length=77,
        vocab_size=49408,
        text_width=64,
        text_layers=4,
        text_heads=1,
    )
    fields.update(overrides)
    return CLIPArchitecture(**fields)


def tiny_clip(seed: int = 0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(tiny_architecture(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.02)
            elif "ln" in name and name.endswith("weight"):
                parameter.normal_(1, 0.05)
    return model.eval()


def write_manifest(path: Path, rows: list[ManifestRow]) -> Path:
    """A CSV manifest (``image,label,mask,category``) of ``rows``."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "mask", "category"])
        for image, label, mask, category in rows:
            writer.writerow([image, label, mask or "", category])
    return path


def shared_rows(
    shared: Path, name: str, normal: int, masked: int, unmasked: int = 0
) -> list[ManifestRow]:
    """The first images of a shared MVTec-layout dataset; ``unmasked`` more anomalous
    ones lose their mask."""
    dataset = open_dataset(shared / "datasets" / name)
    good = [s for s in dataset if s.label == 0][:normal]
    bad = [s for s in dataset if s.label == 1][: masked + unmasked]
    rows: list[ManifestRow] = [(s.image, 0, None, name) for s in good]
    rows += [(s.image, 1, s.mask if i < masked else None, name) for i, s in enumerate(bad)]
    return rows

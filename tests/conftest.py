"""Shared fixtures. ``shared/`` is found through ANOMALYCLIP_SHARED (default ../shared):
tests that need it skip on a user's clone and fail under CI, so CI never passes by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.factories import shared_rows, tiny_clip, write_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_path() -> Path:
    return Path(os.environ.get("ANOMALYCLIP_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_path()
    if not (path / "reference" / "README.md").is_file():
        message = f"shared test data not found at {path} (set ANOMALYCLIP_SHARED)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must not skip these tests")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def reference_dir(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "paper"


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    """A tiny random CLIP saved as an OpenAI-layout state dict."""
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(tiny_clip().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def glass_manifest(shared_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("glass")
    return write_manifest(folder / "glass.csv", shared_rows(shared_dir, "glass", 6, 6))

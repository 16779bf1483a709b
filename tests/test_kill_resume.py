"""A training run killed at an arbitrary point resumes to the prompts of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from anomalyclip.cli import main
from tests.helpers import TRAINING_FLAGS

EPOCHS = "8"
LAUNCH = "import sys; from anomalyclip.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_sigkilled_training_resumes_to_the_same_prompts(glass_manifest, clip_file, tmp_path):
    common = [f"csv={glass_manifest}", "--clip-weights", str(clip_file), *TRAINING_FLAGS]
    killed = tmp_path / "killed"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "train", *common, "-o", str(killed), "--epochs", EPOCHS],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "epoch_1.pt").exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    written = sorted(p.name for p in killed.glob("epoch_*.pt"))
    assert f"epoch_{EPOCHS}.pt" not in written
    for path in killed.glob("epoch_*.pt"):
        torch.load(path, weights_only=True)  # every checkpoint on disk is complete

    assert main(["train", *common, "-o", str(killed), "--epochs", EPOCHS, "--resume"]) == 0
    whole = tmp_path / "whole"
    assert main(["train", *common, "-o", str(whole), "--epochs", EPOCHS]) == 0
    expected = torch.load(whole / f"epoch_{EPOCHS}.pt", weights_only=True)["prompt_learner"]
    resumed = torch.load(killed / f"epoch_{EPOCHS}.pt", weights_only=True)["prompt_learner"]
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), name

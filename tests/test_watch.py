"""``anomalyclip watch`` and the rolling bank: set methods scored one image at a time.

Fast tests run the tiny random CLIP on noise images; the acceptance tests (slow) run
MuSc with the random-weight reference CLIP on real metal plates: image AUROC over the
images scored against the rolling bank, a watch killed mid-run and resumed, and files
dropped into a folder while a watch runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyclip.evaluation.metrics import image_auroc
from anomalyclip.inspection.bank import bank_id, image_sha256
from anomalyclip.inspection.watch import FolderPoller
from tests.helpers import cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def noise_files(folder: Path, count: int, seed: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(start, start + count):
        path = folder / f"part_{index:03d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def records(out: Path) -> list[dict]:
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def tiny_musc(clip_file: Path) -> list[str]:
    arguments = ["--method", "musc", "--clip-weights", str(clip_file), "--image-size", "32"]
    return [*arguments, "--features", "2", "4"]


def test_cold_start_seeds_the_bank_and_later_images_are_scored_against_it(tmp_path, clip_file):
    folder, out = tmp_path / "line", tmp_path / "out"
    paths = noise_files(folder, 6, seed=1)
    code = cli(
        "watch", str(folder), "--output-dir", str(out), "--window", "3", "--once",
        "--poll-interval", "0.05", *tiny_musc(clip_file),
    )  # fmt: skip
    assert code == 0
    rows = records(out)
    assert [Path(r["image"]).name for r in rows] == [p.name for p in paths]
    assert [r["phase"] for r in rows] == ["cold-start"] * 3 + ["bank"] * 3
    seed_digests = [image_sha256(p) for p in paths[:3]]
    assert all(r["bank_admitted"] for r in rows[:3])  # no threshold: the seed is the bank
    assert rows[3]["bank_id"] == bank_id(seed_digests) and rows[3]["bank_size"] == 3
    assert rows[0]["bank_id"] == "empty" and rows[0]["bank_size"] == 0
    edge = rows[0]["admission_threshold"]
    assert edge is not None and all(r["admission_threshold"] == edge for r in rows)
    for row in rows[3:]:
        assert row["bank_admitted"] == (row["score"] < edge)
    # the run folder is predict's: CSV, summary, report, overlays, thumbnails
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 6
    csv_header = (out / "predictions.csv").read_text().splitlines()[0]
    assert csv_header.startswith("image,score,anomalous") and "bank_id" in csv_header
    assert (out / "report.html").is_file()
    assert len(list((out / "overlays").iterdir())) == 6


def test_an_image_over_the_threshold_never_enters_the_bank(tmp_path, clip_file):
    folder, out = tmp_path / "line", tmp_path / "out"
    noise_files(folder, 5, seed=2)
    code = cli(
        "watch", str(folder), "--output-dir", str(out), "--window", "2", "--once",
        "--poll-interval", "0.05", "--threshold", "-1", *tiny_musc(clip_file),
    )  # fmt: skip
    assert code == 0
    rows = records(out)
    # every score is over -1: each set of 2 seeds nothing, so the next 2 start again
    assert [r["phase"] for r in rows] == ["cold-start"] * 4
    assert not any(r["bank_admitted"] for r in rows) and all(r["anomalous"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [
        {"image": str(folder / "part_004.png"), "reason": "musc needs a set of at least 2 to "
         "start its bank"}
    ]


def test_a_poll_takes_only_files_unchanged_since_the_last(tmp_path):
    poller = FolderPoller(tmp_path)
    first = tmp_path / "a.png"
    first.write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    assert poller.poll() == ([], 1)
    with first.open("ab") as handle:  # still being written
        handle.write(b"more")
    assert poller.poll() == ([], 1)
    assert poller.poll() == ([first], 0)

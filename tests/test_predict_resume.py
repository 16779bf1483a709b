"""``predict`` keeps what it finished: results streamed a batch at a time, a write that
fails names its file, and ``--resume`` completes a stopped run to the outputs of an
uninterrupted one (bug: a kill or a full disk after 7 of 80 images lost every result)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip.inspection import run_folder
from anomalyclip.inspection.run import inspect
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import PreProcessor
from tests.helpers import cli, model_arguments, write_tiny_model

BATCH = "2"
RUN_SPECIFIC = ("seconds", "resumed", "files", "output_dir")  # summary keys
# The child scores slowly (50 ms an image) so that the kill lands in the middle of the run.
LAUNCH = (
    "import sys, time; import anomalyclip.inspection.run as inference; "
    "draw = inference.write_images; "
    "inference.write_images = lambda *a: (time.sleep(0.05), draw(*a))[1]; "
    "from anomalyclip.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def tiny_model_files(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def generated_images(folder: Path, count: int) -> Path:
    """``count`` small noise images of a few sizes, and one file that is no image."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        size = (40 + index % 3 * 8, 32 + index % 2 * 16)
        pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index:03d}.png")
    (folder / "img_005b.png").write_bytes(b"not a png")
    return folder


def run_flags(files, out: Path) -> list:
    return [
        *model_arguments(files),
        "--output-dir",
        out,
        "--threshold",
        "0.4",
        "--pixel-threshold",
        "0.5",
        "--batch-size",
        BATCH,
        "--no-progress",
    ]


def final_outputs(out: Path) -> dict[str, Any]:
    """What must not depend on the run being stopped: the tables, the summary's counts
    and verdicts, and the files the records name."""
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    named = sorted(r[key] for r in records for key in ("overlay", "mask", "thumbnail"))
    assert all((out / name).is_file() for name in named)
    assert not list(out.rglob(".*.tmp"))  # no temporary file of a write a kill cut short
    return {
        "jsonl": (out / "predictions.jsonl").read_text(),
        "csv": (out / "predictions.csv").read_text(),
        "summary": {k: v for k, v in summary.items() if k not in RUN_SPECIFIC},
        "files": named,
        "images": sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")),
    }


@pytest.fixture
def uninterrupted(tmp_path, tiny_model_files) -> tuple[Path, dict[str, Any]]:
    images = generated_images(tmp_path / "images", 16)
    whole = tmp_path / "whole"
    assert cli("predict", images, *run_flags(tiny_model_files, whole)) == 0
    return images, final_outputs(whole)


def complete_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_a_sigkilled_predict_resumes_to_the_outputs_of_an_uninterrupted_run(
    tmp_path, tiny_model_files, uninterrupted
):
    images, expected = uninterrupted
    killed = tmp_path / "killed"
    flags = [str(a) for a in run_flags(tiny_model_files, killed)]
    threads = str(torch.get_num_threads())  # the same sums as this process's
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "predict", str(images), *flags],
        env={**os.environ, "OMP_NUM_THREADS": threads},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stream = killed / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while not (stream.is_file() and stream.stat().st_size > 0):
        assert process.poll() is None, "predict ended before its first results"
        assert time.monotonic() < deadline, "no results within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    # Every finished batch is on disk, as whole lines, before the tables are written.
    written = complete_lines(stream)
    assert 0 < len(written) < 16 and len(written) % int(BATCH) == 0
    assert not (killed / "summary.json").exists() and not (killed / "predictions.csv").exists()
    assert (killed / "predictions.run.json").is_file()

    assert cli("predict", images, *flags, "--resume") == 0
    assert final_outputs(killed) == expected
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed"] == len(written)


def test_a_full_disk_names_the_file_keeps_whole_batches_and_resume_finishes(
    tmp_path, tiny_model_files, uninterrupted, monkeypatch, caplog
):
    images, expected = uninterrupted
    out = tmp_path / "out"
    saved = []
    save = Image.Image.save

    def save_until_full(image, target, *args, **kwargs):
        if len(saved) == 7 * 3:  # overlay, mask and thumbnail of 7 images
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(target)
        return save(image, target, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    with caplog.at_level(logging.ERROR):
        assert cli("predict", images, *run_flags(tiny_model_files, out)) == 2
    monkeypatch.undo()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    eighth = json.loads(expected["jsonl"].splitlines()[7])["overlay"]
    assert errors == [
        f"cannot write {out / eighth}: no space left on device; the images finished so far "
        "are kept: make room and run again with --resume"
    ]
    assert "Traceback" not in caplog.text
    # The 7th image's batch was not finished: 3 batches of 2 are kept, as whole lines.
    assert [r["image"] for r in complete_lines(out / "predictions.jsonl")] == [
        json.loads(line)["image"] for line in expected["jsonl"].splitlines()[:6]
    ]
    assert not (out / "summary.json").exists()

    assert cli("predict", images, *run_flags(tiny_model_files, out), "--resume") == 0
    assert final_outputs(out) == expected


class FillingFile:
    """A file that takes ``room`` more bytes, half a write at a time, then is full."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        part = bytes(data[: max(1, min(len(data) // 2, self.room))])
        self.room -= len(part)
        return self.handle.write(part)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


def test_a_full_disk_under_the_jsonl_cuts_it_back_to_whole_lines(
    tmp_path, tiny_model_files, uninterrupted, monkeypatch, caplog
):
    images, expected = uninterrupted
    out = tmp_path / "out"
    first_batches = "".join(line + "\n" for line in expected["jsonl"].splitlines()[:4])

    def filling_open(path, mode="r", **kwargs):
        return FillingFile(open(path, mode, **kwargs), len(first_batches) + 40)

    monkeypatch.setattr(run_folder, "open", filling_open, raising=False)
    with caplog.at_level(logging.ERROR):
        assert cli("predict", images, *run_flags(tiny_model_files, out)) == 2
    monkeypatch.undo()
    assert f"cannot write {out / 'predictions.jsonl'}: no space left on device" in caplog.text
    assert (out / "predictions.jsonl").read_text() == first_batches  # the cut line is gone

    assert cli("predict", images, *run_flags(tiny_model_files, out), "--resume") == 0
    assert final_outputs(out) == expected


def test_a_line_cut_short_is_scored_again(tmp_path, tiny_model_files, uninterrupted, capsys):
    images, expected = uninterrupted
    out = tmp_path / "out"
    flags = run_flags(tiny_model_files, out)
    assert cli("predict", images, *flags) == 0
    lines = expected["jsonl"].splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:4]) + lines[4][:30])
    (out / "summary.json").unlink()
    leftover = out / "overlays" / ".img_009.png.k2j4x.tmp"  # a write a kill interrupted
    leftover.write_bytes(b"half an overlay")
    assert cli("predict", images, *flags, "--resume") == 0
    assert final_outputs(out) == expected
    assert json.loads((out / "summary.json").read_text())["resumed"] == 4
    assert "4 of them scored by the run this one resumed" in capsys.readouterr().out


def test_resume_continues_a_results_file_without_an_output_folder(tmp_path, tiny_model_files):
    images = generated_images(tmp_path / "images", 6)
    results = tmp_path / "scores.jsonl"
    flags = [*model_arguments(tiny_model_files), "--output", results, "--batch-size", BATCH]
    assert cli("predict", images, *flags, "--no-progress") == 0
    whole = results.read_text()
    results.write_text("".join(whole.splitlines(keepends=True)[:2]))
    assert cli("predict", images, *flags, "--no-progress", "--resume") == 0
    assert results.read_text() == whole


def test_resume_refuses_results_made_with_other_settings(
    tmp_path, tiny_model_files, monkeypatch, caplog
):
    images = generated_images(tmp_path / "images", 3)
    out = tmp_path / "out"
    flags = run_flags(tiny_model_files, out)
    assert cli("predict", images, *flags) == 0
    before = (out / "predictions.jsonl").read_text()

    def refused(*extra: str) -> str:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert cli("predict", images, *flags, *extra) == 2
        assert (out / "predictions.jsonl").read_text() == before
        return caplog.records[-1].getMessage()

    jsonl = out / "predictions.jsonl"
    assert refused("--resume", "--threshold", "0.6") == (
        f"cannot resume {jsonl}: it was made with other settings (image_threshold 0.4 then, "
        "0.6 now); run with those, or pass --overwrite to start again"
    )
    assert 'overlays.image_format "auto" then, "jpeg" now' in refused(
        "--resume", "--overlay-format", "jpeg"
    )
    other = write_tiny_model(tmp_path / "other")  # the same settings, other prompts
    other_flags = ["--checkpoint", other[1]]
    assert "identity.checkpoint" in refused("--resume", *other_flags)
    assert "pass --resume to continue it, --overwrite to replace it" in refused()
    assert refused("--resume", "--overwrite") == (
        "--overwrite starts again and --resume continues: pass one of them"
    )
    (out / "predictions.run.json").unlink()
    assert "predictions.run.json (the settings it was made with) is missing" in refused("--resume")


class SetScorer(Predictor):
    """The tiny model as a method whose images score each other (as MuSc's do)."""

    method = "set"
    scores_sets = True

    def __init__(self, model: AnomalyCLIP) -> None:
        self.model = model
        self.calls: list[int] = []

    @property
    def preprocessor(self) -> PreProcessor:
        return self.model.preprocessor

    @property
    def postprocessor(self) -> PostProcessor:
        return self.model.postprocessor

    def settings(self) -> dict[str, Any]:
        return self.model.settings()

    def score_tensors(self, images):
        self.calls.append(len(images))
        return self.model.score_tensors(images)


def test_a_set_scoring_method_resumes_a_finished_set_and_scores_an_unfinished_one_again(
    tmp_path, tiny_model_files, caplog
):
    images = generated_images(tmp_path / "images", 5)
    out = tmp_path / "out"
    scorer = SetScorer(tiny_model_files[2])
    inspect(images, scorer, out, progress=False)
    assert scorer.calls == [5]
    whole = (out / "predictions.jsonl").read_text()

    # Every readable image has its result (the unreadable one is not an image): nothing
    # is scored again.
    (out / "summary.json").unlink()
    summary = inspect(images, scorer, out, progress=False, resume=True)
    assert scorer.calls == [5] and summary.resumed == 5 and len(summary.skipped) == 1
    assert (out / "predictions.jsonl").read_text() == whole

    # Two results missing: the set is scored again as a whole, and the log says why.
    (out / "predictions.jsonl").write_text("".join(whole.splitlines(keepends=True)[:3]))
    with caplog.at_level(logging.INFO):
        summary = inspect(images, scorer, out, progress=False, resume=True)
    assert scorer.calls == [5, 5] and summary.resumed == 0
    assert "3 of 6 are not in" in caplog.text and "the whole set is scored again" in caplog.text
    assert (out / "predictions.jsonl").read_text() == whole


def test_a_full_disk_under_save_maps_is_the_same_one_line_with_the_resume_hint(
    tmp_path, tiny_model_files, monkeypatch, caplog
):
    """numpy reports a short write as "268324 requested and 253920 written" (an OSError
    with no errno and no path); it is a full disk, said as for every other file."""
    images = generated_images(tmp_path / "images", 4)
    out, maps = tmp_path / "out", tmp_path / "maps"
    written = []
    save = np.save

    def save_until_full(handle, array, *args, **kwargs):
        if len(written) == 2:
            data = array.tobytes()
            handle.write(data[: len(data) // 2])
            raise OSError(f"{len(data)} requested and {len(data) // 2} written")
        written.append(handle)
        return save(handle, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_until_full)
    with caplog.at_level(logging.ERROR):
        code = cli("predict", images, *run_flags(tiny_model_files, out), "--save-maps", maps)
    monkeypatch.undo()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"cannot write {maps}{os.sep}"), errors[0]
    assert ".npy: no space left on device" in errors[0]
    assert errors[0].endswith("make room and run again with --resume"), errors[0]
    assert "requested and" not in errors[0] and "Traceback" not in caplog.text
    assert not list(maps.glob(".*.tmp"))  # no partial map left behind


def test_a_run_folder_inside_its_input_folder_is_never_read_as_input(tmp_path, tiny_model_files):
    """`--resume` with the output folder inside the input folder scored the run's own
    overlays and thumbnails."""
    images = generated_images(tmp_path / "images", 4)
    out = images / "results"
    flags = [*model_arguments(tiny_model_files), "--output-dir", out, "--no-progress"]
    assert cli("predict", images, *flags) == 0
    first = (out / "predictions.jsonl").read_text()
    assert cli("predict", images, *flags, "--resume") == 0
    assert (out / "predictions.jsonl").read_text() == first
    scored = [json.loads(line)["image"] for line in first.splitlines()]
    assert len(scored) == 4 and not any("results" in Path(p).parts for p in scored)
    assert cli("predict", images, *flags, "--overwrite") == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4

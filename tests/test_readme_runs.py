"""The README's commands, run as a newcomer runs them: in order, in one folder, offline.

The registered default weights (ViT-L/14@336px and the authors' ``mvtec`` prompts) are
stood in for by the original implementation's reference CLIP and prompts of
``../shared/reference/paper/`` (the same structure and settings, random weights), put in
the cache by hand as an offline user would, so every command runs with exactly the
flags the README shows. The folders the commands name hold real images of
``../shared/datasets/metal_plate``. Commands that need data sets at absolute paths, a
GPU or several processes are listed in ``NOT_RUN`` with the reason; every other README
command must run and succeed here, so a README that drifts from the CLI fails.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

import pytest

from anomalyclip import hub
from anomalyclip.cli import main
from anomalyclip.utils.hashing import file_digest
from tests.helpers import cli_arguments, readme_commands

NOT_RUN = {
    "train": "needs the MVTec AD data set at /data/mvtec and a CUDA device",
    "test visa=/data/visa": "needs VisA and MPDD at /data and a trained run",
    "torchrun": "needs several processes and CUDA devices (tests/test_distributed.py "
    "runs the same commands with 2 CPU processes)",
}

pytestmark = pytest.mark.slow


def skip_reason(command: str) -> str | None:
    arguments = cli_arguments(command)
    if shlex.split(command)[0] == "torchrun":
        return NOT_RUN["torchrun"]
    if arguments[0] == "train":
        return NOT_RUN["train"]
    if arguments[:2] == ["test", "visa=/data/visa"]:
        return NOT_RUN["test visa=/data/visa"]
    return None


def copy_images(sources: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        shutil.copy(source, folder / source.name)


def lay_out_folders(plates: Path, root: Path) -> None:
    """Every folder a README command names, with a few real metal plates in it."""
    good = sorted((plates / "test" / "good").iterdir())
    bad = sorted((plates / "test" / "defect").iterdir())
    masks = plates / "ground_truth" / "defect"
    for name, images in {
        "my_images": good[:2],
        "line3": good[2:3] + bad[:1],
        "line3/today": good[3:6] + bad[1:2],
        "good_parts": good[6:9],
        "line3_good": good[23:43],  # --false-alarm-rate 0.05 needs 19 good images
        "new_parts": good[9:10] + bad[2:3],
        "parts": good[10:13] + bad[3:4],
        "good_images": good[13:16],
        "good": good[16:19],
        "bad": bad[4:6],
        "new_images": good[19:20] + bad[6:7],
        "data/mvtec/metal_plate/test/good": good[20:23],
        "data/mvtec/metal_plate/test/defect": bad[7:10],
    }.items():
        copy_images(images, root / name)
    copy_images([masks / f"{p.stem}_mask.png" for p in bad[4:6]], root / "masks")
    copy_images(
        [masks / f"{p.stem}_mask.png" for p in bad[7:10]],
        root / "data/mvtec/metal_plate/ground_truth/defect",
    )


@pytest.fixture
def newcomer(tmp_path, monkeypatch, shared_dir):
    """A working folder with the README's folders, and the cache filled by hand."""
    reference = shared_dir / "reference" / "paper"
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "no-registry.json"))
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    clip_file = reference / "clip_openai_layout.pt"
    prompts_file = reference / "prompt_learner_checkpoint.pth"
    backbone = dataclasses.replace(
        hub.BACKBONES["ViT-L/14@336px"], sha256=file_digest(clip_file), mirrors=()
    )
    prompts_entry = hub.CHECKPOINTS["mvtec"]
    assert prompts_entry.file is not None
    prompts = dataclasses.replace(
        prompts_entry.file, git_blob=file_digest(prompts_file, "git-blob"), sha256=None
    )
    monkeypatch.setitem(hub.BACKBONES, "ViT-L/14@336px", backbone)
    monkeypatch.setitem(hub.CHECKPOINTS, "mvtec", dataclasses.replace(prompts_entry, file=prompts))
    # AnomalyDINO's default name: a small random DINOv2 put in the cache by hand, trusted
    # (its SHA-256 recorded) at first use as Meta publishes no checksum
    dino_file = shared_dir / "reference" / "anomalydino" / "dinov2_small_random.pth"
    dino = hub.DINOV2_BACKBONES["dinov2_vits14"]
    for file, made in ((backbone, clip_file), (prompts, prompts_file), (dino, dino_file)):
        file.cache_path().parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(made, file.cache_path())
    work = tmp_path / "work"
    lay_out_folders(shared_dir / "datasets" / "metal_plate", work)
    monkeypatch.chdir(work)
    return work


def test_every_readme_command_runs_in_order(newcomer, monkeypatch, caplog):
    import uvicorn

    served: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    assert main(["export", "-o", "model.onnx"]) == 0  # `serve --onnx model.onnx` needs one
    ran, skipped = [], []
    for command in readme_commands():
        reason = skip_reason(command)
        if reason is not None:
            skipped.append(command)
            continue
        caplog.clear()
        code = main(cli_arguments(command))
        assert code == 0, f"{command} exited {code}: {caplog.text[-2000:]}"
        ran.append(command)
    assert len(ran) >= 13 and len(skipped) == 4, (ran, skipped)

    # what the commands left is what the README says they leave
    folders = ("results", "line3-results", "new-results", "few-shot", "calibrated-results")
    for folder in (*folders, "dino-results"):
        summary = json.loads((newcomer / folder / "summary.json").read_text())
        assert summary["scored"] > 0 and (newcomer / folder / "report.html").is_file(), folder
    assert (newcomer / "line3.bank.pt").is_file()  # calibrate --reference wrote the bank
    assert (newcomer / "good_parts.bank.pt").is_file()  # predict --save-bank wrote one
    assert sorted(p.stem for p in (newcomer / "dino-maps").iterdir()) == sorted(
        p.stem for p in (newcomer / "line3" / "today").iterdir()
    )
    reused = json.loads((newcomer / "new-results" / "summary.json").read_text())
    assert reused["image_threshold_source"] == "calibrated"
    assert all(p.suffix == ".jpg" for p in (newcomer / "few-shot" / "overlays").iterdir())
    assert sorted(p.stem for p in (newcomer / "maps").iterdir()) == sorted(
        p.stem for p in (newcomer / "parts").iterdir()
    )
    tables = json.loads((newcomer / "musc-tables" / "mvtec" / "results.json").read_text())
    assert tables["settings"]["method"] == "musc"
    assert len(served) == 3  # every serve command built its app
    watched = json.loads((newcomer / "line3-watch" / "summary.json").read_text())
    assert watched["scored"] == 4  # 3 as the cold start's set, 1 against the bank

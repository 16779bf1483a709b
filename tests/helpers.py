"""Helpers the test modules share: tiny models and their files, images, the CLI,
requests; no test module imports another."""

from __future__ import annotations

import base64
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomalyclip.cli import main
from anomalyclip.methods.anomalyclip.checkpoint import save_checkpoint
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP, create_model
from tests.factories import tiny_clip

WORLD = 2


TORCHRUN_FLAGS = [
    *("--image-size", "32", "--features", "2", "4", "--dpam-layers", "3"),
    *("--prompt-depth", "2", "--n-ctx", "4", "--deep-prompt-length", "2"),
    "--no-progress",
    "--allow-outside-paths",  # the manifests here list shared/'s images from tmp_path
]


TORCHRUN_SECONDS = 180


def torchrun(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 -m anomalyclip ARGUMENTS``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(WORLD), "-m", "anomalyclip", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    done = subprocess.run(
        command,
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TORCHRUN_SECONDS,
    )
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return done


IMAGE_SIZE = 64


TILE = Path("datasets") / "magnetic_tile"


def tiny_config(clip_path: Path | str = "tiny", **changes) -> AnomalyCLIPConfig:
    """A configuration the 4-layer test CLIP supports, at 64 px."""
    fields = dict(
        backbone=str(clip_path),
        image_size=IMAGE_SIZE,
        features=(1, 2, 3, 4),
        dpam_layers=2,
        n_ctx=4,
        prompt_depth=2,
        deep_prompt_length=2,
    )
    fields.update(changes)
    return AnomalyCLIPConfig(**fields)


def write_tiny_model(folder: Path) -> tuple[Path, Path, AnomalyCLIP]:
    """(CLIP state-dict file, prompt checkpoint, the model): the files the CLI loads."""
    folder.mkdir(parents=True, exist_ok=True)
    clip = tiny_clip()
    clip_path = folder / "tiny_clip.pt"
    torch.save(clip.state_dict(), clip_path)
    model = AnomalyCLIP(clip, tiny_config(clip_path)).eval()
    checkpoint = save_checkpoint(folder / "prompts.pt", model)
    return clip_path, checkpoint, model


def copy_tiles(shared_dir: Path, target: Path, per_folder: dict[str, int]) -> list[Path]:
    """The first images of some magnetic_tile test folders, copied into ``target``."""
    copied = []
    for folder, count in per_folder.items():
        sources = sorted((shared_dir / TILE / "test" / folder).iterdir())[:count]
        (target / folder).mkdir(parents=True, exist_ok=True)
        for source in sources:
            copied.append(Path(shutil.copy(source, target / folder / source.name)))
    return copied


def cli(*arguments: str) -> int:

    return main([str(a) for a in arguments])


def model_arguments(files: tuple[Path, Path, AnomalyCLIP]) -> list[str]:
    clip_path, checkpoint, _ = files
    return ["--clip-weights", clip_path, "--checkpoint", checkpoint, "--image-size", IMAGE_SIZE]


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("#") or not line:
                continue
            words = shlex.split(line)
            if "anomalyclip" in words and words[0] in ("anomalyclip", "torchrun"):
                commands.append(line)
    return commands


def cli_arguments(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "torchrun":
        return words[words.index("anomalyclip") + 1 :]
    return words[1:]


MAX_UPLOAD = 300_000


MAX_PIXELS = 1_000_000


def tiny_service_model(**config_changes) -> AnomalyCLIP:
    config = AnomalyCLIPConfig(
        image_size=64,
        features=(2, 4),
        dpam_layers=3,
        n_ctx=4,
        prompt_depth=2,
        deep_prompt_length=2,
        **config_changes,
    )
    return AnomalyCLIP(tiny_clip(), config)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise_png(width: int = 96, height: int = 72, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))


def decode_png(data: str | bytes) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(raw))


def post_image(client, data: bytes, name: str = "part.png", content_type: str = "image/png", **q):
    return client.post("/v1/predict", params=q, files={"file": (name, data, content_type)})


class SlowCalls:
    """Wraps a model's predict_images: each call takes ``delay`` seconds and is counted."""

    def __init__(self, model: Any, delay: float) -> None:
        self.original = model.predict_images
        self.delay = delay
        self.calls: list[int] = []

    def __call__(self, images):
        self.calls.append(len(images))
        time.sleep(self.delay)
        return self.original(images)


TINY = dict(
    image_size=32, features=(2, 4), dpam_layers=3, prompt_depth=2, n_ctx=4, deep_prompt_length=2
)


TRAINING_FLAGS = [
    *("--image-size", "32", "--features", "2", "4", "--dpam-layers", "3"),
    *("--prompt-depth", "2", "--n-ctx", "4", "--deep-prompt-length", "2"),
    *("--batch-size", "4", "--no-progress"),
    "--allow-outside-paths",  # the manifests here list shared/'s images from tmp_path
]


def tiny_training_model(seed: int = 111, **overrides) -> AnomalyCLIP:
    return create_model(
        clip_weights=tiny_clip(), config=AnomalyCLIPConfig(**{**TINY, **overrides}), seed=seed
    )

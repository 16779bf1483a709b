"""Shared pieces of the benchmarks: random models of real shapes, memory, machine, tables.

Nothing is downloaded: the backbone has ViT-L/14@336's shapes and random weights, which
cost the same arithmetic as the real ones (accuracy is not what is measured here).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from anomalyclip.backbone.clip import CLIP, CLIPArchitecture
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.utils.atomic import atomic_write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"

VIT_L_14_336 = CLIPArchitecture(
    embed_dim=768,
    vision_width=1024,
    vision_layers=24,
    vision_patch_size=14,
    vision_grid=24,
    vision_heads=16,
    context_length=77,
    vocab_size=49408,
    text_width=768,
    text_layers=12,
    text_heads=12,
)
PAPER_CONFIG = AnomalyCLIPConfig()  # 518 px, DPAM on 19 layers, features 6/12/18/24

# --quick: the same code paths on a model small enough for a smoke test in seconds.
QUICK_ARCHITECTURE = CLIPArchitecture(
    embed_dim=32,
    vision_width=64,
    vision_layers=4,
    vision_patch_size=8,
    vision_grid=4,
    vision_heads=2,
    context_length=77,
    vocab_size=49408,
    text_width=64,
    text_layers=2,
    text_heads=2,
)
QUICK_CONFIG = AnomalyCLIPConfig(
    image_size=64, features=(2, 4), dpam_layers=3, n_ctx=4, prompt_depth=2, deep_prompt_length=2
)


def shapes(quick: bool) -> tuple[CLIPArchitecture, AnomalyCLIPConfig]:
    return (QUICK_ARCHITECTURE, QUICK_CONFIG) if quick else (VIT_L_14_336, PAPER_CONFIG)


def random_model(
    arch: CLIPArchitecture,
    config: AnomalyCLIPConfig,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> AnomalyCLIP:
    """The same random weights for a given seed, allocated once (1.7 GB for ViT-L)."""
    torch.manual_seed(seed)
    model = AnomalyCLIP(CLIP(arch), config)
    return model.to(device=device, dtype=dtype).eval()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM; ru_maxrss where no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def cpu_counters() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, of them this process's), or None
    where there is no /proc. Their difference over a timed run is what other processes
    took: a benchmark on a shared machine says how much it was disturbed."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy / ticks, (int(own[11]) + int(own[12])) / ticks


def others_cpu_share(
    before: tuple[float, float] | None, after: tuple[float, float] | None, seconds: float
) -> float | None:
    """Fraction of the machine's CPU capacity other processes used between two counters."""
    if before is None or after is None or seconds <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (seconds * (os.cpu_count() or 1)))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """What a reader needs to compare figures across machines."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any], path: str | Path | None = None) -> Path:
    """JSON under benchmarks/results/ (or ``path``), stamped with the time of the run."""
    target = Path(path) if path else RESULTS_DIR / f"{name}.json"
    atomic_write_json(target, {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **data})
    return target

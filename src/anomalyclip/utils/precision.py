"""Which arithmetic precision to score in: ``auto``, ``float32``, ``bfloat16`` or ``int8``.

Lower precision only pays where the hardware runs it natively: a CPU with AVX-512 BF16
or AMX multiplies bfloat16 matrices 2 to 4 times faster than float32 (oneDNN), one
without emulates it and is slower than float32. ``auto`` therefore asks the hardware
(the CPU's flags in ``/proc/cpuinfo``, torch's detected CPU capability, or the GPU's
bfloat16 support) and takes the fastest path the method offers there, falling back to
float32 where nothing helps. The choice is logged and recorded with every result
(:meth:`PrecisionChoice.to_dict`), so a score can be traced to the arithmetic behind it.

Imports no torch at module level: the CLI reads :data:`PRECISIONS` for its ``--help``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "BFLOAT16_FLAGS",
    "PRECISIONS",
    "PrecisionChoice",
    "cpu_flags",
    "native_bfloat16",
    "resolve_precision",
]

PRECISIONS = ("auto", "float32", "bfloat16", "int8")
# CPU flags (Linux names) whose presence means bfloat16 products run in hardware.
BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# int8 dot products in hardware (dynamic int8 linear layers are fast with them).
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class PrecisionChoice:
    """What was asked (``requested``), what runs (``precision``) and why (``reason``)."""

    requested: str
    precision: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "precision": self.precision, "reason": self.reason}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none: not
    Linux, or a sandbox hiding it; ``auto`` then keeps float32)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def _cpu_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def native_bfloat16(device: str = "cpu") -> bool:
    """Whether bfloat16 matrix products run in hardware on ``device``."""
    if device.startswith("cuda"):
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(BFLOAT16_FLAGS & cpu_flags())


def _describe_cpu(flags: frozenset[str]) -> str:
    named = sorted((BFLOAT16_FLAGS | INT8_FLAGS) & flags)
    return f"CPU capability {_cpu_capability()}, flags: {', '.join(named) or 'none of bf16/vnni'}"


def resolve_precision(
    requested: str | None, device: str = "cpu", offered: Sequence[str] = ("float32",)
) -> PrecisionChoice:
    """The precision to run: ``requested`` itself if the method ``offered`` it, else (for
    ``auto`` or None) the first of ``offered`` (fastest first) the hardware runs natively.

    bfloat16 counts as native with AVX-512 BF16 or AMX (CPU) or a GPU that supports it;
    int8 (dynamic int8 linear layers, CPU only) with VNNI or AMX-INT8. A precision asked
    for explicitly runs even where it is emulated (slower, same numbers), with a warning.
    """
    requested = requested or "auto"
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    on_cpu = not device.startswith("cuda")
    flags = cpu_flags() if on_cpu else frozenset()
    native = {
        "float32": True,
        "bfloat16": native_bfloat16(device),
        "int8": on_cpu and bool(INT8_FLAGS & flags),
    }
    where = _describe_cpu(flags) if on_cpu else device
    if requested != "auto":
        if requested not in offered:
            raise ValueError(
                f"precision {requested} is not available for this method "
                f"(it offers {', '.join(offered)})"
            )
        if not native[requested]:
            logger.warning(
                "%s is not native here (%s): expect float32 speed or worse", requested, where
            )
        return PrecisionChoice(requested, requested, "asked for")
    chosen = next((p for p in offered if native.get(p)), "float32")
    reason = f"auto on {where}"
    logger.info("precision %s (%s)", chosen, reason)
    return PrecisionChoice("auto", chosen, reason)

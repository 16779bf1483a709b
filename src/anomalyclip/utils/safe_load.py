"""``torch.load`` that runs no pickled code, and says which file it refused and why.

Prompt checkpoints and CLIP weights come from the internet and from colleagues, and
unpickling can run any code. Every pickle the package reads goes through
:func:`safe_torch_load`: ``weights_only=True`` lets through only tensors and plain
containers, and each failure becomes one :class:`SafeLoadError` naming the file, with the
objects a refused pickle would have imported rather than torch's page-long refusal.
Before that, the pickle's opcodes are measured (:mod:`anomalyclip.utils.pickle_scan`,
which executes nothing): a small file that would unpickle into billions of objects or
nest without end is refused, as ``weights_only`` would load it for hours. After it,
:func:`refuse_non_finite` rejects tensors holding NaN or infinity: a NaN prompt or weight
makes every score NaN, and a NaN compares as "normal" against any threshold.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anomalyclip.utils.pickle_scan import ZIP_MAGIC, PickleScan, scan_file

UNSAFE_ADVICE = re.compile(r"weights_only|trusted source|arbitrary code", re.IGNORECASE)


class SafeLoadError(ValueError):
    """A file :func:`safe_torch_load` would not or could not read; the message names it."""


class UnsafeFileError(SafeLoadError):
    """The file holds Python objects that could run code when unpickled."""


class UnreadableFileError(SafeLoadError):
    """The file is not a readable PyTorch file: empty, truncated, damaged or no pickle."""


class OversizedPickleError(SafeLoadError):
    """The file's pickle would cost far more to unpickle than any real checkpoint."""


class NonFiniteTensorError(SafeLoadError):
    """A loaded tensor holds NaN or infinity; the message names the file and the tensor."""


def scanned_within_bounds(path: Path, what: str) -> PickleScan:
    """The opcode scan of every pickle in ``path``, or :class:`OversizedPickleError` when it
    would build more than any real ``what`` does (the loader would hang or exhaust memory)."""
    scan = scan_file(path)
    if scan.problem is not None:
        raise OversizedPickleError(
            f"refusing to load {path}: {scan.problem}, far beyond any real {what}; "
            "the file is damaged or built to hang the loader"
        )
    return scan


def safe_torch_load(path: str | os.PathLike[str], what: str) -> Any:
    """The object in a ``torch.save`` file, on the CPU, or a :class:`SafeLoadError`.

    ``what`` names the kind of file in messages ("PyTorch checkpoint", "PyTorch file").
    """
    path = Path(path)
    scan = scanned_within_bounds(path, what)
    if scan.unreadable is not None:
        raise UnreadableFileError(f"{path} is not a readable {what}: {scan.unreadable}")
    if is_torchscript_archive(path):
        raise UnreadableFileError(
            f"{path} is not a readable {what}: it is a TorchScript archive (a compiled "
            "model), which holds no such data"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _first_line(error)
        if scan.globals or "Unsupported global" in detail:
            names = ", ".join(scan.globals) or detail
            raise UnsafeFileError(
                f"refusing to load {path}: it holds Python objects that could run code "
                f"({names}); only tensors and plain containers are accepted"
            ) from None
        raise UnreadableFileError(f"{path} is not a readable {what}: {detail}") from None
    except EOFError:
        size = path.stat().st_size if path.exists() else 0
        detail = "the file is empty" if size == 0 else f"truncated (ends after {size} bytes)"
        raise UnreadableFileError(f"{path} is not a readable {what}: {detail}") from None
    except (RuntimeError, OSError, ValueError) as error:
        detail = _first_line(error)
        raise UnreadableFileError(f"{path} is not a readable {what}: {detail}") from None


def refuse_non_finite(tensors: Mapping[str, Any], where: str) -> None:
    """Raise :class:`NonFiniteTensorError` for the first floating-point tensor of
    ``tensors`` holding NaN or infinity, named ``{where}{name}``; other values are skipped.

    A float64 sum screens each tensor (NaN and infinity survive it; no float16, bfloat16
    or float32 data can overflow it), 50x faster than ``isfinite`` on float16 weights;
    only a tensor it flags is counted element by element.
    """
    for name, value in tensors.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        if bool(torch.isfinite(value.sum(dtype=torch.float64))):
            continue
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise NonFiniteTensorError(
                f"{where}{name} holds {bad:,} non-finite values (NaN or infinity) of "
                f"{value.numel():,}; the file is damaged"
            )


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a zip holding TorchScript's ``constants.pkl`` (torch's own test)."""
    try:
        with path.open("rb") as handle:
            if handle.read(4) != ZIP_MAGIC:
                return False
        with zipfile.ZipFile(path) as archive:
            return any(n.rpartition("/")[2] == "constants.pkl" for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _first_line(error: Exception) -> str:
    """The one informative line of torch's long weights-only refusal, without any advice
    to load with ``weights_only=False`` (which would run the file's code)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        tail = text.split(marker, 1)[1].strip()
        text = tail.splitlines()[0] if tail else text
    else:
        text = text.splitlines()[0] if text else type(error).__name__
    return without_unsafe_advice(text) or type(error).__name__


def without_unsafe_advice(text: str) -> str:
    """``text`` less every sentence that mentions ``weights_only`` or trusting a source:
    torch suggests rerunning with ``weights_only=False``, which runs the file's code."""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept = [s for s in sentences if not UNSAFE_ADVICE.search(s)]
    return " ".join(kept).strip()

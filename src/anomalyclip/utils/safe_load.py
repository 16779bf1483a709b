"""``torch.load`` that runs no pickled code, and says which file it refused and why.

Prompt checkpoints and CLIP weights come from the internet and from colleagues, and
unpickling can run any code. Every pickle the package reads goes through
:func:`safe_torch_load`: ``weights_only=True`` lets through only tensors and plain
containers, and each failure becomes one :class:`SafeLoadError` naming the file, with the
objects a refused pickle would have imported (read with :mod:`pickletools`, which
executes nothing) rather than torch's page-long refusal.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

# What weights_only=True accepts anyway: naming these would not explain a refusal.
SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")


class SafeLoadError(ValueError):
    """A file :func:`safe_torch_load` would not or could not read; the message names it."""


class UnsafeFileError(SafeLoadError):
    """The file holds Python objects that could run code when unpickled."""


class UnreadableFileError(SafeLoadError):
    """The file is not a readable PyTorch file: empty, truncated, damaged or no pickle."""


def safe_torch_load(path: str | os.PathLike[str], what: str) -> Any:
    """The object in a ``torch.save`` file, on the CPU, or a :class:`SafeLoadError`.

    ``what`` names the kind of file in messages ("PyTorch checkpoint", "PyTorch file").
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _first_line(error)
        suspicious = pickled_globals(path)
        if suspicious or "Unsupported global" in detail:
            names = ", ".join(suspicious) or detail
            raise UnsafeFileError(
                f"refusing to load {path}: it holds Python objects that could run code "
                f"({names}); only tensors and plain containers are accepted"
            ) from None
        raise UnreadableFileError(f"{path} is not a readable {what}: {detail}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UnreadableFileError(f"{path} is not a readable {what}: {error}") from None


def pickled_globals(path: str | os.PathLike[str]) -> list[str]:
    """Names a pickle would import, beyond what ``weights_only`` accepts, sorted.

    Reads the pickle of a zip-format ``torch.save`` file, or the file itself, with
    :mod:`pickletools`; a file that cannot be read or parsed yields what was found so far.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(members[0]) if members else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                names.append(str(argument).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(argument, str):
                strings.append(argument)
    except Exception:  # noqa: BLE001 - a malformed stream simply ends the scan
        pass
    return sorted({n for n in names if not n.startswith(SAFE_GLOBAL_PREFIXES)})


def _first_line(error: Exception) -> str:
    """The one informative line of torch's long weights-only refusal."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        tail = text.split(marker, 1)[1].strip()
        return tail.splitlines()[0] if tail else text
    return text.splitlines()[0] if text else type(error).__name__

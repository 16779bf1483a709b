"""The tensors of a TorchScript archive, read as data: no TorchScript is loaded or run.

OpenAI publishes CLIP as ``torch.jit.save`` archives. ``torch.jit.load`` compiles the code
inside them, so a crafted archive could run anything, and it is deprecated besides. The
weights need none of that: an archive is a zip whose ``<name>/data.pkl`` pickles the
module tree, with each tensor's bytes in a ``<name>/data/<key>`` record. This module
unpickles ``data.pkl`` with an unpickler that knows only how to rebuild tensors; module
objects become :class:`ScriptObject` dictionaries of their attributes, and every other
global the pickle asks for (``os.system``, ``builtins.eval``) is refused by name after a
scan of the opcodes, before anything is unpickled; that scan
(:mod:`anomalyclip.utils.pickle_scan`) also refuses pickles built to hang the unpickler.
Which attributes are parameters and
buffers, the state dict's contents, is read from the ``__parameters__``/``__buffers__``
lines of the archive's code as text. The result is what
``torch.jit.load(path).state_dict()`` gives: the same keys in the same order, and tensors
with the same dtype, shape, strides, offsets and shared storages.
"""

from __future__ import annotations

import ast
import collections
import io
import os
import pickle
import pickletools
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anomalyclip.utils.pickle_scan import read_member
from anomalyclip.utils.safe_load import (
    SafeLoadError,
    UnreadableFileError,
    UnsafeFileError,
    scanned_within_bounds,
)

# The element types TorchScript names its storages by.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
MAX_MODULE_DEPTH = 64
CLASS_LINE = re.compile(r"class\s+(\w+)\s*\(\s*(\w*)\s*\)\s*:")
MEMBER_LINE = re.compile(r"\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$")
STORAGE_KEY = re.compile(r"[0-9A-Za-z_]{1,64}")


class ScriptObject(dict):
    """A TorchScript object as the attributes it was saved with; ``qualified_name`` says
    which class (``__torch__.torch.nn.modules.linear.Linear``). Nothing of it runs."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"{self.qualified_name} was saved with a custom __getstate__, which only "
                "TorchScript's own code can restore"
            )
        self.update(state)


@dataclass(frozen=True)
class _ClassMembers:
    """What the archive's code says of one class."""

    is_module: bool
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]


@dataclass(frozen=True)
class _Storage:
    """One ``data/<key>`` record, typed as the pickle that asked for it says."""

    untyped: torch.UntypedStorage
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.untyped.nbytes() // self.dtype.itemsize


def read_torchscript_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """``torch.jit.load(path).state_dict()``, without loading or running any TorchScript.

    Raises :class:`UnsafeFileError` naming any global beyond tensor rebuilding that the
    pickle asks for, :class:`OversizedPickleError` for a pickle past the scan's bounds,
    and :class:`UnreadableFileError` for a damaged or unexpected archive.
    """
    path = Path(path)
    scanned_within_bounds(path, "TorchScript archive")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _record_prefix(archive, path)
            data = archive.read(f"{prefix}data.pkl")
            _check_byte_order(archive, prefix, path)
            _check_globals(data, path)
            root = _ArchiveUnpickler(archive, prefix, path, data).load()
            members = _ClassReader(archive, prefix, path)
            if not isinstance(root, ScriptObject) or not members.of(root).is_module:
                raise UnreadableFileError(f"{path}: the archive's data.pkl holds no module")
            state_dict: dict[str, Tensor] = {}
            _collect(root, members, "", state_dict, 0, path)
            return state_dict
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise UnreadableFileError(f"{path} is a damaged TorchScript archive: {error}") from None
    except SafeLoadError:
        raise
    except (
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        RuntimeError,
    ) as error:
        raise UnreadableFileError(f"{path} is a damaged TorchScript archive: {error}") from None


def _record_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    """The archive's one top folder (``ViT-L-14-336px/``), which holds ``data.pkl``."""
    pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
        raise UnreadableFileError(
            f"{path}: expected one <name>/data.pkl in the TorchScript archive, found "
            f"{len(pickles)} (archives older than PyTorch 1.4 are not read)"
        )
    return pickles[0][: -len("data.pkl")]


def _check_byte_order(archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
    """Tensors are read as the bytes lie; an archive of the other byte order is refused."""
    try:
        order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
    except KeyError:
        return  # written before PyTorch recorded it, which was on little-endian machines
    if order != sys.byteorder:
        raise UnreadableFileError(
            f"{path}: its tensors are {order}-endian and this machine is {sys.byteorder}-endian"
        )


def _check_globals(data: bytes, path: Path) -> None:
    """Every global the pickle would ask for, from its opcodes, before anything is loaded.

    The unpickler refuses them again as it meets them; this scan names them all at once.
    """
    refused: set[str] = set()
    strings: list[str] = []
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name in ("GLOBAL", "INST"):
            module, _, name = str(argument).partition(" ")
            if _allowed(module, name) is None:
                refused.add(f"{module}.{name}")
        elif opcode.name == "STACK_GLOBAL":
            module, name = strings[-2:] if len(strings) >= 2 else ("?", "?")
            if _allowed(module, name) is None:
                refused.add(f"{module}.{name}")
        elif opcode.name == "OBJ" or opcode.name.startswith("EXT"):
            refused.add(f"<{opcode.name} opcode>")
        elif isinstance(argument, str):
            strings.append(argument)
    if refused:
        raise UnsafeFileError(
            f"refusing to load {path}: its data.pkl asks for {', '.join(sorted(refused))}, "
            "which could run code; a TorchScript archive's weights need only tensors"
        )


def _allowed(module: str, name: str) -> Any:
    """What the unpickler gives for a global, or None for one that is refused."""
    if module == "__torch__" or module.startswith("__torch__."):
        if module.startswith("__torch__.torch.classes"):
            return None  # C++ classes, restored by their own code
        return type(name, (ScriptObject,), {"qualified_name": f"{module}.{name}"})
    if module == "torch" and name in STORAGE_DTYPES:
        return STORAGE_DTYPES[name]
    return _REBUILDERS.get((module, name))


class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors from the archive's records and nothing else."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: Path, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages: dict[str, torch.UntypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed(module, name)
        if found is None:
            raise UnsafeFileError(
                f"refusing to load {self._path}: its data.pkl asks for {module}.{name}, "
                "which could run code"
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage reference {pid!r:.80}")
        if not isinstance(key, str) or not STORAGE_KEY.fullmatch(key):
            raise pickle.UnpicklingError(f"malformed storage key {key!r:.80}")
        untyped = self._storages.get(key)
        if untyped is None:
            untyped = self._read_record(f"{self._prefix}data/{key}", numel * dtype.itemsize)
            self._storages[key] = untyped
        if untyped.nbytes() != numel * dtype.itemsize:
            raise pickle.UnpicklingError(
                f"record data/{key} holds {untyped.nbytes()} bytes, not the "
                f"{numel * dtype.itemsize} of {numel} {dtype} elements"
            )
        return _Storage(untyped, dtype)

    def _read_record(self, name: str, needed: int) -> torch.UntypedStorage:
        """The record's bytes, its declared size checked before anything is inflated and
        the read capped at it (:func:`~anomalyclip.utils.pickle_scan.read_member`)."""
        info = self._archive.getinfo(name)
        if info.file_size > self._path.stat().st_size:
            raise pickle.UnpicklingError(
                f"record {name} claims {info.file_size} bytes, more than the whole archive"
            )
        if info.file_size != needed:
            raise pickle.UnpicklingError(
                f"record {name} holds {info.file_size:,} bytes, not the {needed:,} "
                "its tensor storage needs"
            )
        data = read_member(self._archive, info)
        return torch.UntypedStorage.from_buffer(data, dtype=torch.uint8)


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> Tensor:
    """A view of a storage, checked to lie inside it (``torch._utils._rebuild_tensor_v2``)."""
    del requires_grad, backward_hooks, metadata  # state dicts hold detached tensors
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not an archive record")
    numbers = [storage_offset, *_ints(size), *_ints(stride)]
    if not all(isinstance(n, int) and n >= 0 for n in numbers) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"malformed tensor view {size!r:.80} {stride!r:.80}")
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise pickle.UnpicklingError(
                f"a tensor of shape {tuple(size)} reaches element {last} of a storage of "
                f"{storage.numel}"
            )
    empty = torch.empty((0,), dtype=storage.dtype)
    return empty.set_(storage.untyped, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    del requires_grad, backward_hooks
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("a parameter that is not a tensor")
    return data


def _ints(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, (tuple, list)):
        raise pickle.UnpicklingError(f"a tensor shape that is not a tuple: {value!r:.80}")
    return tuple(value)


def _as_list(data: Any) -> list[Any]:
    """TorchScript's typed lists (``torch.jit._pickle.build_intlist``...) as plain lists."""
    return list(data)


def _untagged(value: Any, _type: Any = None) -> Any:
    """``torch.jit._pickle.restore_type_tag``: a container's TorchScript type, dropped."""
    return value


_REBUILDERS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{
        ("torch.jit._pickle", name): _as_list
        for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")
    },
    ("torch.jit._pickle", "restore_type_tag"): _untagged,
}


class _ClassReader:
    """Each class's ``__parameters__`` and ``__buffers__``, from the archive's code as text.

    ``__torch__.a.b.Cls`` is defined in ``code/__torch__/a/b.py``. Its lines are scanned,
    not compiled: ``class Cls(Module):`` and the two list literals after it.
    """

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._files: dict[str, dict[str, _ClassMembers]] = {}

    def of(self, obj: ScriptObject) -> _ClassMembers:
        module, _, name = obj.qualified_name.rpartition(".")
        classes = self._files.get(module)
        if classes is None:
            record = f"{self._prefix}code/{module.replace('.', '/')}.py"
            try:
                text = self._archive.read(record).decode("utf-8")
            except KeyError:
                text = ""
            classes = self._files[module] = _scan_classes(text)
        if name not in classes:
            raise UnreadableFileError(
                f"{self._path}: the archive's code does not define {obj.qualified_name}, so "
                "its parameters cannot be told from its other attributes"
            )
        return classes[name]


def _scan_classes(text: str) -> dict[str, _ClassMembers]:
    classes: dict[str, _ClassMembers] = {}
    current: tuple[str, bool] | None = None
    members: dict[str, tuple[str, ...]] = {}

    def close() -> None:
        if current is not None:
            classes[current[0]] = _ClassMembers(
                current[1], members.get("__parameters__", ()), members.get("__buffers__", ())
            )

    for line in text.splitlines():
        match = CLASS_LINE.match(line)
        if match:
            close()
            current, members = (match[1], match[2] == "Module"), {}
            continue
        member = MEMBER_LINE.match(line)
        if current is not None and member:
            names = ast.literal_eval(member[2])
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                members[member[1]] = tuple(names)
    close()
    return classes


def _collect(
    module: ScriptObject,
    members: _ClassReader,
    prefix: str,
    out: dict[str, Tensor],
    depth: int,
    path: Path,
) -> None:
    """``nn.Module.state_dict``'s order: parameters, buffers, then each submodule's."""
    if depth > MAX_MODULE_DEPTH:
        raise UnreadableFileError(
            f"{path}: modules nested over {MAX_MODULE_DEPTH} deep (or in a cycle)"
        )
    own = members.of(module)
    for names in (own.parameters, own.buffers):
        for name, value in module.items():
            if name in names and isinstance(value, Tensor):
                out[prefix + name] = value
    for name, value in module.items():
        if isinstance(value, ScriptObject) and members.of(value).is_module:
            _collect(value, members, f"{prefix}{name}.", out, depth + 1, path)

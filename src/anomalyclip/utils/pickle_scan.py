"""What a pickle would build, read from its opcodes with :mod:`pickletools` (nothing runs).

``torch.load(weights_only=True)`` refuses code but not cost: a thousand bytes of tuples
that refer to each other through the memo (``a = (a, a)`` sixty times) unpickle into a
tree of 2**60 nodes, and hashing one as a dict key would run for centuries. This module replays
the opcodes on a stack of *node ids* instead of objects, so it sees the graph the pickle
would build (who contains whom, shared references included) at the cost of a few list
operations per opcode, and measures it before anything is unpickled:

- opcodes: each makes at most one object; the scan stops early past the limit;
- nesting depth: the longest containment path (deep nesting crashes recursive code);
- expanded size: the objects there would be if every shared reference were a copy, which
  is what hashing, ``str``, ``json.dumps`` and ``dataclasses.asdict`` walk;
- the pickle's size against the file's, for a compressed ``data.pkl`` (a zip bomb);
- every other record of a zip, from its central directory, before anything is inflated:
  a tensor record (``data/<key>``) may not declare more bytes than the storage the pickle
  gives it needs (its element count times its element size); a stored record's sizes
  must agree and fit the file; compressed records (``torch.save`` stores its own
  uncompressed) may not inflate past ``MAX_INFLATED_TO_FILE`` times the file in all.
  Both readers then hold a record to the size declared there: zipfile's reader stops at
  it, torch's extracts into a buffer of it, and :func:`read_member` reads with that cap
  and refuses a record that differs.

The limits are far above anything ``torch.save`` writes for a model: the reference CLIP
(398 tensors) is 13,693 opcodes and 9,223 objects, 6 levels deep, scanned in about 20 ms;
a training checkpoint with its optimiser state is 10 levels deep.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MAX_OPCODES = 4_000_000  # torch.save writes about 30 per tensor
MAX_DEPTH = 100
MAX_OBJECTS = 10_000_000  # shared references expanded
MAX_PICKLE_TO_FILE = 4  # a data.pkl inflating past 4x the whole file is a zip bomb
MAX_INFLATED_TO_FILE = 16  # compressed records together, against the whole file
LEGACY_PICKLES = 5  # torch's legacy format: magic, protocol, sys info, object, storage keys
ZIP_MAGIC = b"PK\x03\x04"

# What weights_only=True accepts anyway: naming these would not explain a refusal.
SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")

# Opcodes that push an immutable scalar: they share one node, as they contain nothing.
SCALAR_KINDS = frozenset(
    {"int", "int_or_bool", "bytes_or_str", "bytes", "bytearray", "None", "bool", "str", "float"}
)
# Opcodes that add their arguments to the object beneath them instead of making one.
MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
MARK = -1
LEAF = 0

# Bytes per element of each storage type a pickle names (torch's typed storages, and the
# dtypes TorchScript names); one not listed counts as the widest, 16.
ELEMENT_BYTES = {
    **dict.fromkeys(("ByteStorage", "CharStorage", "BoolStorage", "UntypedStorage"), 1),
    **dict.fromkeys(("QUInt8Storage", "QInt8Storage", "QUInt4x2Storage", "QUInt2x4Storage"), 1),
    **dict.fromkeys(("ShortStorage", "HalfStorage", "BFloat16Storage"), 2),
    **dict.fromkeys(("IntStorage", "FloatStorage", "QInt32Storage"), 4),
    **dict.fromkeys(("LongStorage", "DoubleStorage", "ComplexFloatStorage"), 8),
    "ComplexDoubleStorage": 16,
    **dict.fromkeys(("uint8", "int8", "bool", "float8_e4m3fn", "float8_e5m2"), 1),
    **dict.fromkeys(("int16", "float16", "half", "bfloat16"), 2),
    **dict.fromkeys(("int32", "float32", "float"), 4),
    **dict.fromkeys(("int64", "float64", "double", "long", "complex64"), 8),
    "complex128": 16,
}
WIDEST_ELEMENT = 16


@dataclass
class PickleScan:
    """What the pickles of one file would build; ``problem`` names the first bound passed."""

    opcodes: int = 0
    depth: int = 0
    objects: int = 0
    globals: list[str] = field(default_factory=list)
    problem: str | None = None
    unreadable: str | None = None  # why the file could not be scanned, where torch would try


def scan_file(path: str | os.PathLike[str]) -> PickleScan:
    """Scan every pickle ``torch.load`` would read from ``path``: the zip's ``data.pkl``
    members, or the leading pickles of a legacy (or plain) pickle file.

    A stream that stops parsing is measured as far as it parsed (the unpickler would have
    run that far too); an unreadable file gives an empty scan and ``torch.load`` reports.
    """
    path = Path(path)
    graph = _Graph()
    try:
        with path.open("rb") as handle:
            is_zip = handle.read(4) == ZIP_MAGIC  # torch's own test, not zipfile.is_zipfile
            handle.seek(0)
            if not is_zip:
                for _ in range(LEGACY_PICKLES):
                    if not graph.replay(handle) or not handle.peek(1):
                        break
        if is_zip:
            _scan_zip(path, graph)
    except OSError:
        pass
    except zipfile.BadZipFile as error:  # torch would read it; its pickle is then unchecked
        graph.unreadable = f"a damaged zip archive ({error})"
    return graph.result()


def _scan_zip(path: Path, graph: _Graph) -> None:
    """Every ``data.pkl`` member, within a budget of unpacked bytes for them all, then
    every record's declared size against what the pickles say it holds."""
    file_size = path.stat().st_size
    budget = MAX_PICKLE_TO_FILE * file_size
    with zipfile.ZipFile(path) as archive:
        graph.problem = record_size_problem(archive.infolist(), file_size)
        if graph.problem:
            return
        declared: dict[str, int] = {}
        for info in archive.infolist():
            if not info.filename.endswith("data.pkl"):
                continue
            if info.file_size > budget:
                graph.problem = (
                    f"its {info.filename} unpacks to {info.file_size:,} bytes, more than "
                    f"{MAX_PICKLE_TO_FILE}x the file's {file_size:,}"
                )
                return
            with archive.open(info) as member:
                data = member.read(budget + 1)
            if len(data) > budget:
                graph.problem = f"its {info.filename} unpacks to more than {budget:,} bytes"
                return
            budget -= len(data)
            graph.replay(data)
            if graph.problem:
                return
            records = info.filename[: -len("data.pkl")] + "data/"
            for key, size in declared_storages(data).items():
                declared[records + key] = max(size, declared.get(records + key, 0))
        graph.problem = tensor_record_problem(archive.infolist(), declared)


def record_size_problem(infos: list[zipfile.ZipInfo], file_size: int) -> str | None:
    """What is wrong with the sizes a zip's central directory declares, if anything."""
    inflated = 0
    for info in infos:
        if info.compress_size > file_size:
            return (
                f"its record {info.filename} claims {info.compress_size:,} bytes, more than "
                "the whole file"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                return (
                    f"its stored record {info.filename} declares {info.file_size:,} bytes "
                    f"but holds {info.compress_size:,}"
                )
            continue
        if info.filename.endswith("data.pkl"):
            continue  # the pickles have their own budget, read with a cap
        inflated += info.file_size
        if inflated > MAX_INFLATED_TO_FILE * file_size:
            return (
                f"its compressed records inflate to more than {inflated:,} bytes "
                f"({info.filename} alone {info.file_size:,} from {info.compress_size:,}), over "
                f"{MAX_INFLATED_TO_FILE}x the file's {file_size:,}"
            )
    return None


def tensor_record_problem(infos: list[zipfile.ZipInfo], declared: dict[str, int]) -> str | None:
    """A tensor record declaring more bytes than its storage needs."""
    for info in infos:
        parent, _, key = info.filename.rpartition("/")
        if not key or not (parent == "data" or parent.endswith("/data")):
            continue
        needed = declared.get(info.filename)
        if needed is None:
            continue  # not read by torch (what it might be is bounded by the sizes above)
        if info.file_size > needed:
            return (
                f"its record {info.filename} declares {info.file_size:,} bytes, but the tensor "
                f"storage it holds needs {needed:,}"
            )
    return None


def declared_storages(data: bytes) -> dict[str, int]:
    """Bytes each storage key of a torch pickle needs (element count x element size),
    from its persistent ids ``('storage', type, key, location, numel)``; nothing runs.

    Only the values a persistent id is built from are followed (strings, integers,
    globals, tuples, the memo); anything else is a placeholder.
    """
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    found: dict[str, int] = {}
    mark = object()
    try:
        for opcode, argument, _ in pickletools.genops(data):
            name = opcode.name
            if name == "MARK":
                stack.append(mark)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[argument] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(argument))
            elif name == "GLOBAL":
                stack.append(_Global(str(argument)))
            elif name == "STACK_GLOBAL":
                attribute, module = stack.pop(), stack.pop()
                stack.append(_Global(f"{module} {attribute}"))
            elif name == "TUPLE":
                items: list[Any] = []
                while stack[-1] is not mark:
                    items.append(stack.pop())
                stack.pop()
                stack.append(tuple(reversed(items)))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                items = stack[-count:]
                del stack[-count:]
                stack.append(tuple(items))
            elif name == "BINPERSID":
                _note_storage(stack.pop(), found)
                stack.append(None)
            elif name == "STOP":
                break
            elif opcode.arg is not None and not opcode.stack_before and opcode.stack_after:
                stack.append(argument)  # a literal: its value
            else:
                _apply(opcode, stack, mark)
    except (ValueError, IndexError, KeyError, EOFError, TypeError):
        pass  # a malformed pickle: torch refuses it as well
    return found


class _Global(str):
    """A global's ``module name``, as a pickle names it."""


def _note_storage(pid: Any, found: dict[str, int]) -> None:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        return
    _, kind, key, _location, numel = pid
    if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool):
        return
    element = WIDEST_ELEMENT
    if isinstance(kind, _Global):
        element = ELEMENT_BYTES.get(kind.rpartition(" ")[2], WIDEST_ELEMENT)
    found[key] = max(found.get(key, 0), max(numel, 0) * element)


def _apply(opcode: pickletools.OpcodeInfo, stack: list[Any], mark: object) -> None:
    """Any other opcode: pop what it consumes, push a placeholder for what it makes."""
    before = opcode.stack_before
    fixed = len(before)
    if pickletools.markobject in before:
        fixed = before.index(pickletools.markobject)
        while stack[-1] is not mark:
            stack.pop()
        stack.pop()
    for _ in range(fixed):
        stack.pop()
    stack.extend([None] * len(opcode.stack_after))


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A record's bytes, read with the cap of its declared size: a deflate stream that
    would inflate further is cut there and refused, never inflated whole."""
    with archive.open(info) as member:
        data = member.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise zipfile.BadZipFile(
            f"record {info.filename} holds other than the {info.file_size:,} bytes it declares"
        )
    return data


class _Graph:
    """The objects the scanned pickles would build, as ids with their children's ids."""

    def __init__(self) -> None:
        self.children: list[list[int]] = [[]]  # node 0: every scalar
        self.opcodes = 0
        self.globals: set[str] = set()
        self.problem: str | None = None
        self.unreadable: str | None = None

    def replay(self, source: bytes | IO[bytes]) -> bool:
        """Follow one pickle up to STOP; False when it is malformed or ends early."""
        stack: list[int] = []
        memo: dict[Any, int] = {}
        strings: list[str] = []
        try:
            for opcode, argument, _ in pickletools.genops(source):
                self.opcodes += 1
                if self.opcodes > MAX_OPCODES:
                    self.problem = f"its pickle has more than {MAX_OPCODES:,} opcodes"
                    return False
                self._note_global(opcode.name, argument, strings)
                if self._step(opcode, argument, stack, memo):
                    return True
        except (ValueError, IndexError, KeyError, EOFError):
            return False
        return False

    def _note_global(self, name: str, argument: Any, strings: list[str]) -> None:
        if name == "GLOBAL":
            self.globals.add(str(argument).replace(" ", "."))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            self.globals.add(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(argument, str):
            strings.append(argument)

    def _step(
        self, opcode: pickletools.OpcodeInfo, argument: Any, stack: list[int], memo: dict
    ) -> bool:
        """Apply one opcode to the stack of node ids; True at STOP."""
        name = opcode.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[argument] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[argument])
        elif name == "POP":
            stack.pop()
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "MARK":
            stack.append(MARK)
        elif name == "STOP":
            stack.pop()
            return True
        elif opcode.stack_before or opcode.stack_after:
            popped = _pop(stack, opcode.stack_before)
            if name in MUTATORS:
                target = popped.pop()
                if target != LEAF:
                    self.children[target].extend(popped)
                stack.append(target)
            elif opcode.stack_after:
                stack.append(self._node(opcode, popped))
        return False

    def _node(self, opcode: pickletools.OpcodeInfo, popped: list[int]) -> int:
        if not popped and opcode.stack_after[0].name in SCALAR_KINDS:
            return LEAF
        self.children.append(popped)
        return len(self.children) - 1

    def result(self) -> PickleScan:
        depth, objects = 0, 0
        if self.problem is None:
            depth, objects, self.problem = _measure(self.children)
        globals_ = sorted(n for n in self.globals if not n.startswith(SAFE_GLOBAL_PREFIXES))
        return PickleScan(self.opcodes, depth, objects, globals_, self.problem, self.unreadable)


def _pop(stack: list[int], before: list[pickletools.StackObject]) -> list[int]:
    """The ids an opcode consumes, top first; a slice runs down to its MARK."""
    popped: list[int] = []
    fixed = len(before)
    if pickletools.markobject in before:
        fixed = before.index(pickletools.markobject)
        while stack[-1] != MARK:
            popped.append(stack.pop())
        stack.pop()
    for _ in range(fixed):
        item = stack.pop()
        if item == MARK:
            raise ValueError("MARK where an object was expected")
        popped.append(item)
    return popped


def _measure(children: list[list[int]]) -> tuple[int, int, str | None]:
    """(deepest nesting, largest expanded size, the first bound passed or None), over
    every node: a dict key hashed and dropped costs as much as one that stays."""
    size = [0] * len(children)
    depth = [0] * len(children)
    for root in range(len(children)):
        for node, problem in _post_order(children, root, size):
            size[node] = min(1 + sum(size[c] for c in children[node]), MAX_OBJECTS + 1)
            depth[node] = 1 + max((depth[c] for c in children[node]), default=0)
            if problem is None and depth[node] > MAX_DEPTH:
                problem = f"its pickle nests more than {MAX_DEPTH} levels deep"
            if problem is None and size[node] > MAX_OBJECTS:
                problem = (
                    f"its pickle would build more than {MAX_OBJECTS:,} objects once its "
                    "shared references are followed"
                )
            if problem is not None:
                return depth[node], size[node], problem
    return max(depth, default=0), max(size, default=0), None


def _post_order(
    children: list[list[int]], root: int, size: list[int]
) -> Iterator[tuple[int, str | None]]:
    """Nodes under ``root`` not yet measured, children first; a cycle is reported."""
    if size[root]:
        return
    on_path = {root}
    stack = [(root, iter(children[root]))]
    while stack:
        node, pending = stack[-1]
        child = next((c for c in pending if not size[c]), None)
        if child is None:
            stack.pop()
            on_path.discard(node)
            yield node, None
        elif child in on_path:
            yield node, "its pickle holds an object that contains itself"
            return
        else:
            on_path.add(child)
            stack.append((child, iter(children[child])))

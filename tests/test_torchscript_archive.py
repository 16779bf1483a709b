"""TorchScript archives read as data give what ``torch.jit.load(...).state_dict()`` gives,
and a crafted one is refused, naming what it asked for, before anything in it runs.

Archives are made here with ``torch.jit.script`` and ``torch.jit.trace``: small modules
with nested submodules, parameters and buffers, fp16 and fp32, tied weights and views,
and a small CLIP traced as OpenAI traced theirs.
"""

from __future__ import annotations

import copy
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from anomalyclip.backbone import torchscript_archive
from anomalyclip.backbone.loading import UntrustedFileError, WeightsError, load_clip
from anomalyclip.backbone.torchscript_archive import read_torchscript_state_dict
from anomalyclip.utils.safe_load import UnreadableFileError, UnsafeFileError
from tests.factories import tiny_clip


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        grid = torch.randn(5, 7)
        self.register_buffer("grid", grid)
        self.register_buffer("window", grid[1:, 2:])  # a view with an offset into grid
        self.register_buffer("transposed", torch.randn(3, 4).t())  # non-contiguous
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("mask", torch.rand(4) > 0.5)
        self.register_buffer("absent", None)
        self.plain = torch.ones(2)  # an attribute, in no state dict

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.linear(x))
        return y + self.plain.sum() + self.window.sum() + self.transposed.sum()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = Block()
        self.second = Block()
        self.second.linear.weight = self.first.linear.weight  # tied
        self.layers = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2))
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.first(x) + self.second(x)) * self.scale + self.frozen


def net(dtype: torch.dtype) -> Net:
    """``Net`` in ``dtype``, its views made again (``.to`` copies each buffer alone)."""
    model = Net().to(dtype)
    for block in (model.first, model.second):
        block.window = block.grid[1:, 2:]
    return model


def save(module: nn.Module, how: str, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's notices
        if how == "script":
            compiled = torch.jit.script(module)
        else:
            compiled = torch.jit.trace(module, torch.randn(3, 4).to(next(module.parameters())))
        torch.jit.save(compiled, str(path))
    return path


def jit_state_dict(path: Path) -> dict[str, Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.load's deprecation notice
        return dict(torch.jit.load(str(path)).state_dict())


def assert_identical(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Same keys in the same order; each tensor bit for bit, with the same view of the
    same bytes; and the same tensors sharing storage."""
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        mine = got[key]
        assert (mine.dtype, mine.shape, mine.stride(), mine.storage_offset()) == (
            tensor.dtype,
            tensor.shape,
            tensor.stride(),
            tensor.storage_offset(),
        ), key
        assert bytes(mine.untyped_storage()) == bytes(tensor.untyped_storage()), key
        assert torch.equal(mine, tensor), key

    def sharing(state: dict[str, Tensor]) -> list[list[str]]:
        groups: dict[int, list[str]] = {}
        for key, tensor in state.items():
            groups.setdefault(tensor.untyped_storage().data_ptr(), []).append(key)
        return sorted(groups.values())

    assert sharing(got) == sharing(expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_small_modules_read_as_jit_load_reads_them(tmp_path, how, dtype):
    torch.manual_seed(0)
    path = save(net(dtype), how, tmp_path / f"{how}.pt")
    expected = jit_state_dict(path)
    got = read_torchscript_state_dict(path)
    assert_identical(got, expected)
    assert "second.linear.weight" in got and "first.plain" not in got
    assert got["first.window"].storage_offset() == 9 and not got["first.transposed"].is_contiguous()
    assert got["first.grid"].untyped_storage().data_ptr() == (
        got["first.window"].untyped_storage().data_ptr()
    )
    assert {got["scale"].dtype, got["first.steps"].dtype, got["first.mask"].dtype} == {
        dtype,
        torch.int64,
        torch.bool,
    }


@pytest.fixture(scope="module")
def clip_archives(tmp_path_factory) -> tuple[nn.Module, dict[torch.dtype, Path]]:
    """A small CLIP traced once and saved in fp32 and fp16, as OpenAI traced theirs (with
    their extra buffers)."""
    folder = tmp_path_factory.mktemp("clip")
    source = tiny_clip(3, vision_layers=1, text_layers=1, context_length=16, vocab_size=500)
    scripted = copy.deepcopy(source)
    for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 500)):
        scripted.register_buffer(name, torch.tensor(value))
    paths = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(scripted, {"encode_image": torch.randn(1, 3, 32, 32)})
        for dtype in (torch.float32, torch.float16):
            paths[dtype] = folder / f"clip_{str(dtype)[6:]}.pt"
            torch.jit.save(traced.to(dtype), str(paths[dtype]))
    return source, paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_clip_archive_reads_as_jit_load_reads_it_and_loads_without_jit(
    clip_archives, monkeypatch, dtype
):
    source, paths = clip_archives
    expected = jit_state_dict(paths[dtype])
    got = read_torchscript_state_dict(paths[dtype])
    assert_identical(got, expected)
    assert got["visual.proj"].dtype == dtype and got["input_resolution"].item() == 32

    def no_jit(*_args, **_kwargs):
        raise AssertionError("torch.jit was asked to load the archive")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    loaded = load_clip(paths[dtype]).state_dict()
    for key, tensor in source.state_dict().items():
        assert torch.equal(loaded[key], tensor.to(dtype).float()), key


# -- crafted archives ------------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls ``function(argument)``: proof that the pickle ran code."""

    def __init__(self, function, argument: str) -> None:
        self.function = function
        self.argument = argument

    def __reduce__(self):
        return (self.function, (self.argument,))


def with_records(source: Path, target: Path, **replaced: bytes) -> Path:
    """A copy of an archive with some records (``data_pkl``, ``byteorder``...) replaced."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        prefix = next(n for n in old.namelist() if n.endswith("/data.pkl"))[: -len("data.pkl")]
        names = {prefix + key.replace("_", "."): value for key, value in replaced.items()}
        for info in old.infolist():
            new.writestr(info, names.get(info.filename, old.read(info)))
    return target


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save(Net(), "script", tmp_path_factory.mktemp("archive") / "net.pt")


@pytest.mark.parametrize(
    ("function", "named"), [(os.mkdir, "posix.mkdir"), (eval, "__builtin__.eval")]
)
def test_archive_asking_for_other_globals_is_refused_before_anything_runs(
    archive, tmp_path, function, named
):
    marker = tmp_path / "ran"
    argument = str(marker) if function is os.mkdir else f"__import__('os').mkdir({str(marker)!r})"
    payload = pickle.dumps({"weight": RunsCode(function, argument)}, protocol=2)
    evil = with_records(archive, tmp_path / "evil.pt", data_pkl=payload)
    with pytest.raises(UnsafeFileError, match="could run code") as refusal:
        read_torchscript_state_dict(evil)
    assert named in str(refusal.value) and str(evil) in str(refusal.value)
    with pytest.raises(UntrustedFileError, match=named):
        load_clip(evil)
    assert not marker.exists()


def test_global_hidden_from_the_scan_is_still_refused_by_the_unpickler(archive, tmp_path):
    """STACK_GLOBAL from memoised strings names something else than the last literals."""
    marker = tmp_path / "ran"

    def text(value: str) -> bytes:
        data = value.encode()
        return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE

    payload = (
        b"\x80\x04"
        + text("posix") + b"\x94"  # MEMOIZE 0
        + text("mkdir") + b"\x94"  # MEMOIZE 1
        + text("torch") + b"0" + text("FloatStorage") + b"0"  # pushed and popped
        + b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL
        + text(str(marker)) + b"\x85R."  # TUPLE1, REDUCE, STOP
    )  # fmt: skip
    evil = with_records(archive, tmp_path / "evil.pt", data_pkl=payload)
    with pytest.raises(UnsafeFileError, match="posix.mkdir"):
        read_torchscript_state_dict(evil)
    assert not marker.exists()


def test_pickle_built_to_hang_the_unpickler_is_refused_unread(archive, tmp_path):
    """Tuples of tuples through the memo (2**60 nodes) as a dict key: hours of hashing."""
    levels = 60
    payload = bytearray(b"\x80\x02)q\x00")  # EMPTY_TUPLE, BINPUT 0
    for level in range(levels):
        payload += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86q" + bytes([level + 1])
    payload += b"}h" + bytes([levels]) + b"Ns."  # EMPTY_DICT, key, None, SETITEM, STOP
    evil = with_records(archive, tmp_path / "evil.pt", data_pkl=bytes(payload))
    with pytest.raises(WeightsError, match="refusing to load .*evil.pt.*objects"):
        load_clip(evil)


def test_damaged_archives_say_what_is_wrong(archive, tmp_path):
    with zipfile.ZipFile(archive) as source:
        record = next(n for n in source.namelist() if n.endswith("/data/0"))
        short = source.read(record)[:-2]
    prefix = record[: -len("data/0")]
    truncated = tmp_path / "truncated.pt"
    with zipfile.ZipFile(archive) as old, zipfile.ZipFile(truncated, "w") as new:
        for info in old.infolist():
            new.writestr(info, short if info.filename == record else old.read(info))
    with pytest.raises(UnreadableFileError, match=r"truncated.pt is a damaged .*data/0 holds"):
        read_torchscript_state_dict(truncated)

    big_endian = with_records(archive, tmp_path / "big.pt", byteorder=b"big")
    with pytest.raises(UnreadableFileError, match="big.pt: its tensors are big-endian"):
        read_torchscript_state_dict(big_endian)

    no_pickle = tmp_path / "no_pickle.pt"
    with zipfile.ZipFile(no_pickle, "w") as new:
        new.writestr(f"{prefix}code/__torch__.py", "")
    with pytest.raises(UnreadableFileError, match="expected one <name>/data.pkl"):
        read_torchscript_state_dict(no_pickle)


def test_tensor_views_must_lie_inside_their_storage():
    """A view past its storage's end would read memory that is not the archive's."""
    storage = torchscript_archive._Storage(torch.UntypedStorage(4 * 10), torch.float32)
    view = torchscript_archive._rebuild_tensor(storage, 2, (2, 4), (4, 1))
    assert (view.shape, view.storage_offset()) == ((2, 4), 2)
    for offset, size, stride in ((3, (2, 4), (4, 1)), (0, (11,), (1,)), (0, (2,), (-1,))):
        with pytest.raises(pickle.UnpicklingError):
            torchscript_archive._rebuild_tensor(storage, offset, size, stride)

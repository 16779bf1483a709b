"""Hostile and damaged checkpoints (issue 15, items 2, 5 and 14), each from a payload made
here: pickles built to hang the loader, NaN prompts, weights and thresholds, and
malformed structures, through the Python loaders and ``anomalyclip predict``."""

from __future__ import annotations

import copy
import io
import logging
import random
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip import NonFiniteScoreError
from anomalyclip.backbone.loading import load_clip
from anomalyclip.cli import main as cli
from anomalyclip.methods.anomalyclip.checkpoint import read_checkpoint, save_checkpoint
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.few_shot import ReferenceBank
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP, create_model
from anomalyclip.methods.musc import few_shot as musc_few_shot
from anomalyclip.methods.tiled import TiledPredictor, Tiling
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import AnomalyPrediction, Predictor
from anomalyclip.preprocess import PreProcessor
from anomalyclip.utils import pickle_scan
from anomalyclip.utils.pickle_scan import scan_file
from anomalyclip.utils.safe_load import (
    OversizedPickleError,
    UnreadableFileError,
    safe_torch_load,
)
from tests.factories import tiny_clip

SMALL = dict(
    image_size=32, features=(2, 4), dpam_layers=3, n_ctx=5, prompt_depth=3, deep_prompt_length=2
)
PROTO2, STOP = b"\x80\x02", b"."


# ---------------------------------------------------------------- item 5: pickle bombs


def tuple_bomb(depth: int = 60, stop: bytes = STOP) -> bytes:
    """``{a: 1}`` with ``a = (a, a)`` ``depth`` times through the memo: 2**depth nodes to
    hash from ~6 bytes per level (the attack's 1,087-byte file ran for hours)."""
    levels = b"".join(b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) for i in range(depth))
    return PROTO2 + b"}" + b")q\x00" + levels + b"K\x01s" + stop


def as_torch_zip(pickle_bytes: bytes, path: Path, compression: int = zipfile.ZIP_STORED) -> Path:
    """A ``torch.save`` zip archive whose ``data.pkl`` is ``pickle_bytes``."""
    buffer = io.BytesIO()
    torch.save({"k": 1}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", compression) as target:
        for info in source.infolist():
            is_data = info.filename.endswith("data.pkl")
            target.writestr(info.filename, pickle_bytes if is_data else source.read(info))
    return path


def refused_quickly(path: Path, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(OversizedPickleError, match=message) as caught:
        safe_torch_load(path, "PyTorch checkpoint")
    assert time.perf_counter() - started < 1.0
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_exponential_tuple_keys_are_refused_before_unpickling(tmp_path):
    """Bug: torch.load(weights_only=True) hashed 2**60 nested tuples for hours."""
    bomb = as_torch_zip(tuple_bomb(), tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 1100
    refused_quickly(bomb, "would build more than 10,000,000 objects")
    legacy = tmp_path / "bomb_legacy.pth"  # a raw pickle: torch unpickles it first
    legacy.write_bytes(tuple_bomb())
    refused_quickly(legacy, "would build more than 10,000,000 objects")
    disguised = tmp_path / "disguised.pth"  # a zip end record makes zipfile.is_zipfile say yes
    disguised.write_bytes(tuple_bomb() + b"PK\x05\x06" + bytes(18))
    assert zipfile.is_zipfile(disguised)
    refused_quickly(disguised, "would build more than 10,000,000 objects")
    with pytest.raises(ValueError, match="refusing to load"):
        read_checkpoint(bomb)
    with pytest.raises(ValueError, match="refusing to load"):
        load_clip(legacy)


def test_a_zip_that_cannot_be_checked_is_not_loaded(tmp_path):
    path = tmp_path / "damaged.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(UnreadableFileError, match="damaged.pt is not a readable x: a damaged zip"):
        safe_torch_load(path, "x")


def test_a_bomb_followed_by_garbage_is_still_refused(tmp_path):
    """The unpickler would hash the key before it reached the broken end."""
    refused_quickly(as_torch_zip(tuple_bomb(stop=b"\xff\xff"), tmp_path / "cut.pt"), "objects")


def test_deep_nesting_and_self_reference_are_refused(tmp_path):
    depth = 5000  # lists in lists: recursive code (hash, json, asdict) would overflow
    deep = PROTO2 + b"]" * depth + b"a" * (depth - 1) + STOP
    refused_quickly(as_torch_zip(deep, tmp_path / "deep.pt"), "nests more than 100 levels")
    itself = PROTO2 + b"]q\x00h\x00a" + STOP  # a list that contains itself
    refused_quickly(as_torch_zip(itself, tmp_path / "loop.pt"), "contains itself")


def test_a_compressed_data_pkl_inflating_past_the_file_is_refused(tmp_path):
    padded = PROTO2 + b"}" + STOP + bytes(20_000_000)  # zeros after STOP deflate to ~20 KB
    bomb = as_torch_zip(padded, tmp_path / "zipbomb.pt", zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 100_000
    refused_quickly(bomb, "unpacks to 20,000,004 bytes, more than 4x the file's")


def test_opcode_count_is_bounded(tmp_path, monkeypatch):
    path = tmp_path / "many.pt"
    torch.save({f"w{i}": torch.zeros(1) for i in range(20)}, path)
    monkeypatch.setattr(pickle_scan, "MAX_OPCODES", 100)
    refused_quickly(path, "more than 100 opcodes")


def test_real_checkpoints_scan_cheaply_and_load(reference_dir, tmp_path):
    """The bounds are far above what torch.save writes: the reference CLIP (398 tensors),
    the authors' prompts, and a training checkpoint of ours with its optimiser state."""
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**SMALL))
    optimizer = torch.optim.Adam(model.prompt_learner.parameters())
    sum(p.sum() for p in model.prompt_learner.parameters()).backward()
    optimizer.step()
    history = [{"epoch": e, "loss": 0.1} for e in range(100)]
    extra = {"optimizer": optimizer.state_dict(), "history": history}
    ours = save_checkpoint(tmp_path / "train.pt", model, extra=extra)
    legacy = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    paths = [
        reference_dir / "clip_openai_layout.pt",
        reference_dir / "prompt_learner_checkpoint.pth",
        ours,
        legacy,
    ]
    for path in paths:
        started = time.perf_counter()
        scan = scan_file(path)
        assert time.perf_counter() - started < 2.0
        assert scan.problem is None and scan.depth <= 12, (path, scan)
        assert scan.objects < 20_000 and scan.opcodes < 20_000, (path, scan)
        safe_torch_load(path, "PyTorch file")


# ------------------------------------------------------- item 2: NaN fails closed


def saved(tmp_path: Path, change, layout: str = "anomalyclip") -> Path:
    """A valid checkpoint, changed by ``change(data)`` and written again."""
    model = AnomalyCLIP(tiny_clip(), AnomalyCLIPConfig(**SMALL))
    good = save_checkpoint(tmp_path / "good.pt", model, layout=layout)  # type: ignore[arg-type]
    data = torch.load(good, weights_only=True)
    change(data)
    target = tmp_path / "changed.pt"
    torch.save(data, target)
    return target


@pytest.mark.parametrize("layout", ["anomalyclip", "authors"])
@pytest.mark.parametrize(
    ("name", "value"), [("ctx_neg", float("nan")), ("compound_prompts_text.1", float("inf"))]
)
def test_non_finite_prompts_are_refused_in_every_layout(tmp_path, layout, name, value):
    def poison(data):
        data["prompt_learner"][name].view(-1)[3] = value

    path = saved(tmp_path, poison, layout)
    expected = rf"changed.pt: prompt_learner\.{name} holds 1 non-finite values"
    with pytest.raises(ValueError, match=expected):
        read_checkpoint(path)
    with pytest.raises(ValueError, match=expected):
        create_model(path, tiny_clip())


@pytest.mark.parametrize(
    ("field", "value"), [("image_threshold", float("nan")), ("pixel_threshold", float("inf"))]
)
def test_non_finite_stored_thresholds_are_refused(tmp_path, field, value):
    """A NaN threshold answered "normal" for every image."""
    path = saved(tmp_path, lambda data: data["config"].update({field: value}))
    with pytest.raises(ValueError, match=f"changed.pt: .*{field} must be finite, got {value}"):
        read_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_non_finite_clip_weights_are_refused_naming_the_tensor(tmp_path, suffix):
    from safetensors.torch import save_file

    state = tiny_clip().state_dict()
    state["visual.conv1.weight"].view(-1)[:2] = float("nan")
    path = tmp_path / f"clip{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    expected = rf"clip{suffix}: visual\.conv1\.weight holds 2 non-finite values"
    with pytest.raises(ValueError, match=expected):
        load_clip(path)
    with pytest.raises(ValueError, match=expected):
        create_model(None, path, config=AnomalyCLIPConfig(**SMALL))


def test_predict_with_nan_prompts_is_one_error_and_no_results(tmp_path, caplog, capsys):
    """Bug: predict wrote "score": NaN (invalid JSON) for a NaN checkpoint."""
    clip_path = tmp_path / "clip.pt"
    torch.save(tiny_clip().state_dict(), clip_path)
    path = saved(tmp_path, lambda d: d["prompt_learner"]["ctx_pos"].fill_(float("nan")))
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 40)).save(image)
    out = tmp_path / "out.jsonl"
    arguments = ["--checkpoint", path, "--clip-weights", clip_path, "--output", out]
    code, line = cli_errors(caplog, capsys, "predict", image, *arguments)
    assert code == 2 and "changed.pt: prompt_learner.ctx_pos holds 320 non-finite" in line
    assert not out.exists()


def test_a_nan_score_is_an_error_never_a_verdict():
    post = PostProcessor(image_threshold=0.5, pixel_threshold=0.5)
    for processor in (post, PostProcessor()):
        with pytest.raises(NonFiniteScoreError):
            processor.verdict(float("nan"))
    with pytest.raises(NonFiniteScoreError):
        post.mask(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="image_threshold is NaN"):
        PostProcessor(image_threshold=float("nan"))
    with pytest.raises(NonFiniteScoreError, match="x.png"):
        AnomalyPrediction("x.png", float("nan"), np.zeros((4, 4), np.float32), (4, 4))
    with pytest.raises(NonFiniteScoreError):
        AnomalyPrediction("x.png", 0.5, np.full((4, 4), np.inf, np.float32), (4, 4))
    assert issubclass(NonFiniteScoreError, ValueError)


class NaNMethod(Predictor):
    """A method whose weights are damaged: every output NaN."""

    method = "nan"

    @property
    def preprocessor(self) -> PreProcessor:
        return PreProcessor(16)

    @property
    def postprocessor(self) -> PostProcessor:
        return PostProcessor(image_threshold=0.5)

    def settings(self) -> dict[str, Any]:
        return {}

    def score_tensors(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        count = len(images)
        return np.full(count, np.nan, np.float32), np.full((count, 16, 16), np.nan, np.float32)


def test_scoring_loops_refuse_non_finite_outputs():
    image = Image.new("RGB", (40, 20))
    for predictor in (NaNMethod(), TiledPredictor(NaNMethod(), Tiling(16))):
        with pytest.raises(NonFiniteScoreError, match="nan produced a non-finite score"):
            predictor.predict([image])


def test_reference_banks_with_nan_are_refused(tmp_path):
    patches = torch.randn(8, 4)
    patches[2, 1] = float("nan")
    bank = ReferenceBank({2: patches}, (2, 2), 2, 1.0, {}, ["a.png", "b.png"])
    with pytest.raises(ValueError, match=r"bank.pt: patches\.2 holds 1 non-finite"):
        ReferenceBank.load(bank.save(tmp_path / "bank.pt"))
    record = {
        "format": musc_few_shot.BANK_FORMAT,
        "vectors": {"1,2": torch.full((2, 4, 8), float("inf"))},
        "identity": {},
        "sources": ["a.png"],
    }
    torch.save(record, tmp_path / "musc.pt")
    with pytest.raises(ValueError, match=r"musc.pt: vectors\.1,2 holds 64 non-finite"):
        musc_few_shot.MuScWithReferences.load(None, tmp_path / "musc.pt")  # type: ignore[arg-type]


# ------------------------------------------- item 14: malformed files, one line each


def cli_errors(caplog, capsys, *arguments) -> tuple[int, str]:
    """Run the CLI; its exit code and its one error line (asserting there is one, and no
    traceback anywhere)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = cli([str(a) for a in arguments])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
    return code, message


MALFORMED = [
    (lambda d: d.update(format_version="2"), "format_version must be an integer, got '2'"),
    (lambda d: d.update(format_version=torch.ones(2, 2)), "format_version must be an integer"),
    (lambda d: d.pop("prompt_learner"), "'prompt_learner' must be a dictionary, it is missing"),
    (lambda d: d.update(config="garbage"), "'config' must be a dictionary, it is a str"),
    (lambda d: d["config"].update(image_size="huge"), "'image_size' must be an integer"),
    (lambda d: d["config"].update(image_size=10**9), "image_size must be 1 to 2048"),
    (lambda d: d["config"].update(sigma=1e9), "sigma must be 0 to 256"),
    (lambda d: d["config"].update(normal_template="{0.__class__}"), "normal_template may"),
    (lambda d: d["config"].update(n_ctx=10**6), "n_ctx 1000000 in config, 5 in the tensors"),
    (lambda d: d["config"].update(mean=torch.zeros(3)), "'mean' must be a list of numbers"),
    (lambda d: d["prompt_learner"].update(ctx_pos="x"), r"prompt_learner\.ctx_pos is a str"),
    (lambda d: d["prompt_learner"].update({7: torch.zeros(1)}), "prompt_learner has a key 7"),
    (lambda d: d.update(prompt_learner={}), "prompt_learner is empty"),
    (lambda d: d["backbone"].update(sha256=5), "backbone.sha256 must be a string, got 5"),
    (
        lambda d: d["backbone"]["architecture"].update(vision_layers=torch.ones(3)),
        "backbone.architecture.vision_layers must be a number or a name",
    ),
    (
        lambda d: d["prompt_learner"].update({"compound_prompts_text.1": torch.zeros(2, 9)}),
        r"wrong shape: compound_prompts_text\.1 \(2, 9\) \(expected \(2, 64\)\)",
    ),
]


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory) -> list[str]:
    """An image and the tiny CLIP's weights: what ``predict`` needs besides a checkpoint."""
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (40, 40)).save(folder / "image.png")
    torch.save(tiny_clip().state_dict(), folder / "clip.pt")
    return [str(folder / "image.png"), "--clip-weights", str(folder / "clip.pt")]


@pytest.mark.parametrize(("change", "message"), MALFORMED)
def test_malformed_checkpoints_are_one_line_in_python_and_the_cli(
    tmp_path, caplog, capsys, monkeypatch, cli_inputs, change, message
):
    """Bug: these gave tracebacks (or multi-line tensor reprs)."""
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    path = saved(tmp_path, change)
    with pytest.raises(ValueError, match=message) as caught:
        create_model(path, tiny_clip())
    assert "\n" not in str(caught.value) and "changed.pt" in str(caught.value)
    out = tmp_path / "out.jsonl"
    code, line = cli_errors(
        caplog, capsys, "predict", *cli_inputs, "--checkpoint", path, "--output", out
    )
    assert code == 2 and line == str(caught.value)
    assert not out.exists()


REPLACEMENTS = [
    "garbage",
    -1,
    10**12,
    float("nan"),
    float("inf"),
    None,
    [1, "a"],
    {},
    {3: 4},
    True,
    (1, 2),
    b"bytes",
    torch.zeros(0),
    torch.ones(3, dtype=torch.int64),
    torch.full((1, 1, 5, 64), float("nan")),
    torch.zeros(2, 2),
    torch.tensor(1.0),
]


def keys_of(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path of keys into nested dictionaries."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            found.append((*prefix, key))
            found += keys_of(value, (*prefix, key))
    return found


def test_fuzzed_checkpoint_structures_give_only_documented_errors(tmp_path):
    """Seeded: drop keys and swap values anywhere in both layouts; create_model answers
    a model or a one-line ValueError, nothing else."""
    clip = tiny_clip()
    model = AnomalyCLIP(clip, AnomalyCLIPConfig(**SMALL))
    layouts = [
        torch.load(save_checkpoint(tmp_path / f"{layout}.pt", model, layout=layout))
        for layout in ("anomalyclip", "authors")
    ]
    rng = random.Random(15)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(120):
        data = copy.deepcopy(rng.choice(layouts))
        for _ in range(rng.randint(1, 3)):
            paths = keys_of(data)
            if not paths:
                break
            path = rng.choice(paths)
            parent = data
            for key in path[:-1]:
                parent = parent[key]
            if rng.random() < 0.3:
                del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(rng.choice(REPLACEMENTS))
        target = tmp_path / "fuzzed.pt"
        torch.save(data, target)
        try:
            create_model(target, clip)
            outcomes["loaded"] += 1
        except ValueError as error:
            assert "\n" not in str(error), str(error)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 80, outcomes


# ------------------------------------------- issue 20 item 4: compressed tensor records


def deflate_bomb(inflated: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``inflated`` zero bytes (a multiple of 1 MiB) and its CRC,
    built from one flushed block repeated: 2 GiB in about 2 MB, made in milliseconds."""
    block_size = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressor.compress(bytes(block_size))
    block = compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    zeros = bytes(block_size)
    for _ in range(inflated // block_size):
        crc = zlib.crc32(zeros, crc)
    return block * (inflated // block_size) + b"\x03\x00", crc


def with_bomb_record(
    source: Path, target: Path, inflated: int, declared: int | None = None
) -> Path:
    """``source`` (a torch zip) with its first tensor record replaced by a deflate stream
    inflating to ``inflated`` bytes; the central directory declares ``declared`` (default:
    the truth)."""
    with zipfile.ZipFile(source) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    out, central = bytearray(), bytearray()
    for info, data in members:
        method, crc, size = zipfile.ZIP_STORED, zlib.crc32(data), len(data)
        if info.filename.endswith("/data/0"):
            data, crc = deflate_bomb(inflated)
            method, size = zipfile.ZIP_DEFLATED, inflated if declared is None else declared
        name = info.filename.encode()
        fields = (20, 0, method, 0, 0x21, crc, len(data), size, len(name))
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, 0, 0, 0, 0, len(out)
        )
        central += name
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + name + data
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0
    )
    target.write_bytes(bytes(out + central + end))
    return target


def peak_of_cli(*arguments: Any) -> tuple[int, str, float]:
    """Run ``anomalyclip`` in a fresh child: exit status, stderr, the child's peak RSS (MB)."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run([sys.executable, '-m', 'anomalyclip', *sys.argv[1:]],"
        " capture_output=True, text=True)\n"
        "sys.stderr.write(done.stderr)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *map(str, arguments)], capture_output=True, text=True
    )
    code, peak_kb = done.stdout.split()
    return int(code), done.stderr, int(peak_kb) / 1024


@pytest.mark.parametrize("where", ["checkpoint", "clip-weights", "checkpoint-lying"])
def test_a_compressed_tensor_record_cannot_inflate_the_loader(tmp_path, cli_inputs, where):
    """A 2 MB zip whose data/0 deflates to 2 GiB (its pickle wants 16 bytes there): refused
    from the central directory before anything is inflated (before: 2.3-2.5 GB resident
    and then a refusal), one line naming the file; a central directory that understates
    the record is held to what it says."""
    image, _, clip = cli_inputs
    checkpoint = saved(tmp_path, lambda data: None)
    declared = 64 if where.endswith("lying") else None
    victim = clip if where == "clip-weights" else checkpoint
    bomb = with_bomb_record(Path(victim), tmp_path / "bomb.pt", 2 << 30, declared)
    assert bomb.stat().st_size < Path(victim).stat().st_size + 3_000_000
    given = {"checkpoint": checkpoint, "clip-weights": clip}
    given["clip-weights" if where == "clip-weights" else "checkpoint"] = bomb
    out = tmp_path / "out.jsonl"
    code, errors, peak_mb = peak_of_cli(
        "predict",
        image,
        "--checkpoint",
        given["checkpoint"],
        "--clip-weights",
        given["clip-weights"],
        "--output",
        out,
    )
    lines = [line for line in errors.splitlines() if line.strip()]
    assert code == 2, errors
    assert len(lines) == 1 and "Traceback" not in errors, errors
    assert "bomb.pt" in lines[0], lines[0]
    assert peak_mb < 500, (peak_mb, lines[0])
    assert not out.exists()


# ------------------------------------ issue 20 item 5: what prompt checkpoint errors say


def test_quoted_values_are_cut_with_their_length():
    from anomalyclip.utils.quoting import quoted

    assert quoted("object") == "'object'"
    long = quoted("x" * 1_000_000)
    assert len(long) < 120 and long.endswith("... (1,000,000 characters)")
    assert "\n" not in quoted("a\nb" * 100)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["config"].update(object_name="x" * 1_000_000, prompt_mode="aware"),
            r"object_name must be at most 1000 characters .* \(1,000,000 characters\)",
        ),
        (  # short enough in characters, too long in tokens: refused at read, naming the file
            lambda d: d["config"].update(object_name="word " * 150, prompt_mode="aware"),
            r"is 1\d\d tokens long, more than the context length 77",
        ),
        (
            lambda d: d["config"].update(abnormal_template="{} " + "y" * 5000),
            r"abnormal_template must be at most 1000 characters .* \(5,003 characters\)",
        ),
        (
            lambda d: d["config"].update(temperature=1e-30),
            "temperature must be 0.001 to 10, got 1e-30",
        ),
        (lambda d: d["config"].update(temperature=1e6), "temperature must be 0.001 to 10, got 1e"),
    ],
    ids=[
        "huge-object-name",
        "object-name-tokens",
        "huge-template",
        "tiny-temperature",
        "huge-temperature",
    ],
)
def test_prompt_checkpoint_errors_are_short_and_name_the_file(
    tmp_path, caplog, capsys, cli_inputs, change, message
):
    path = saved(tmp_path, change)
    with pytest.raises(ValueError, match=message) as refusal:
        read_checkpoint(path)
    assert str(refusal.value).startswith(f"{path}: ") and len(str(refusal.value)) < 400
    code, line = cli_errors(caplog, capsys, "predict", *cli_inputs, "--checkpoint", path)
    assert code == 2 and "changed.pt" in line and len(line) < 400, line[:500]


def test_a_torchscript_file_as_checkpoint_never_suggests_weights_only_false(
    tmp_path, caplog, capsys, cli_inputs
):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(UnreadableFileError, match="it is a TorchScript archive") as refusal:
        read_checkpoint(path)
    assert "weights_only" not in str(refusal.value)
    code, line = cli_errors(caplog, capsys, "predict", *cli_inputs, "--checkpoint", path)
    assert code == 2 and "scripted.pt" in line
    assert "weights_only" not in line and "trusted" not in line
    assert "weights_only" not in capsys.readouterr().err


def test_torch_advice_to_disable_weights_only_is_removed_from_any_message():
    from anomalyclip.utils.safe_load import without_unsafe_advice

    advice = (
        "Cannot use weights_only=True with this file. Re-running `torch.load` with "
        "`weights_only` set to `False` will likely succeed, but it can result in arbitrary "
        "code execution. Do it only if you got the file from a trusted source."
    )
    assert without_unsafe_advice("The file is damaged. " + advice) == "The file is damaged."

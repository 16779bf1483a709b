"""Files that matter are complete or absent: an interrupted write never leaves half a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from anomalyclip.utils.atomic import atomic_open, atomic_torch_save, atomic_write_json


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write('{"version": 2, "trunc')
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_torch_save_round_trip(tmp_path):
    target = tmp_path / "deep" / "folder" / "ckpt.pt"
    atomic_torch_save({"w": torch.arange(3)}, target)
    assert torch.load(target, weights_only=True)["w"].tolist() == [0, 1, 2]


WRITER = """
import sys, time
from anomalyclip.utils.atomic import atomic_open
with atomic_open(sys.argv[1], "wb") as handle:
    for _ in range(10_000):
        handle.write(b"x" * 65536)
        handle.flush()
        print("writing", flush=True)
        time.sleep(0.01)
"""


def test_killed_writer_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "checkpoint.bin"
    target.write_bytes(b"complete old checkpoint")
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    for _ in range(5):
        assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    time.sleep(0.05)
    assert target.read_bytes() == b"complete old checkpoint"
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert all(p.name.startswith(".checkpoint.bin.") for p in leftovers)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """Bug: every written file was 0600 whatever the umask."""
    import os

    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic_write_json(tmp_path / "atomic.json", {})
        atomic_torch_save({}, tmp_path / "atomic.pt")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert plain.stat().st_mode & 0o777 == expected
    assert (tmp_path / "atomic.json").stat().st_mode & 0o777 == expected
    assert (tmp_path / "atomic.pt").stat().st_mode & 0o777 == expected


def test_replacing_a_file_keeps_its_mode(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_json(target, {"new": True})
    assert target.stat().st_mode & 0o777 == 0o640
    assert json.loads(target.read_text()) == {"new": True}


def test_a_full_disk_is_named_with_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from anomalyclip.utils.atomic import WriteFailedError, atomic_torch_save

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "model.pt"
    expected = r"cannot write .*model\.pt: no space left"
    with pytest.raises(WriteFailedError, match=expected) as caught:
        atomic_torch_save({"x": 1}, target)
    assert caught.value.disk_full and caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_torch_writer_stopping_short_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    import torch

    from anomalyclip.utils.atomic import WriteFailedError, atomic_torch_save

    def short(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", short)
    with pytest.raises(WriteFailedError, match="no space left on device") as caught:
        atomic_torch_save({"x": 1}, tmp_path / "c.pt")
    assert caught.value.disk_full


def test_json_results_refuse_nan(tmp_path):
    from anomalyclip.utils.atomic import atomic_write_json

    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic_write_json(tmp_path / "s.json", {"score": float("nan")})
    assert not (tmp_path / "s.json").exists()


def test_a_write_failure_survives_pickling_between_processes(tmp_path):
    import pickle

    from anomalyclip.utils.atomic import WriteFailedError

    error = WriteFailedError(tmp_path / "c.pt", "no space left on device", 28)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.filename, copy.disk_full) == (str(error), error.filename, True)

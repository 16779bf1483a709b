"""Named weights against a local HTTP server standing in for the hosts; no test touches the
network."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip import hub
from anomalyclip.backbone.loading import load_clip
from anomalyclip.cli import main
from anomalyclip.hub import cache, entries, transfer
from anomalyclip.methods.anomalyclip.checkpoint import read_checkpoint, save_checkpoint
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.utils import hashing
from anomalyclip.utils.hashing import file_digest
from tests.factories import tiny_clip

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 12345\n"
)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
PAYLOAD_BLOB = hashlib.sha1(b"blob %d\0" % len(PAYLOAD) + PAYLOAD).hexdigest()

Request = namedtuple("Request", "path range")


class Host(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` with Range support; ``plan`` scripts one misbehaviour per request."""

    files: dict[str, bytes] = {}
    plan: list[str] = []
    requests: list[Request] = []
    delay_s = 0.0

    def do_GET(self):  # noqa: N802 - http.server's naming
        behaviour = self.plan.pop(0) if self.plan else "ok"
        self.requests.append(Request(self.path, self.headers.get("Range")))
        time.sleep(self.delay_s)
        body = self.files.get(self.path)
        if body is None or behaviour == "missing":
            self.send_error(404)
            return
        if behaviour == "busy":
            self.send_error(503)
            return
        start = 0
        if self.headers.get("Range") and behaviour != "ignore-range":
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        data = {"corrupt": b"\0" * len(body), "lfs": LFS_POINTER}.get(behaviour, body)[start:]
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if behaviour == "truncate":
            self.wfile.write(data[: len(data) // 3])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hangs up early (as some tests make it) is no server error."""


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.delenv("ANOMALYCLIP_OFFLINE", raising=False)
    monkeypatch.setattr(transfer, "RETRY_DELAY_S", 0.0)
    Host.files = {"/demo.bin": PAYLOAD, "/epoch_15.pth": PAYLOAD}
    Host.plan, Host.requests, Host.delay_s = [], [], 0.0
    server = QuietServer(("127.0.0.1", 0), Host)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port_url(path: str) -> str:
    """An address on this machine where nothing listens: a connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


def sha256_entry(base: str, name: str = "demo") -> hub.RemoteFile:
    return hub.RemoteFile(name, f"{base}/demo.bin", "demo.bin", sha256=PAYLOAD_SHA256)


def blob_entry(base: str) -> hub.RemoteFile:
    return hub.RemoteFile("prompts", f"{base}/epoch_15.pth", "epoch_15.pth", git_blob=PAYLOAD_BLOB)


# -- fetch, verify, cache ------------------------------------------------------------------


@pytest.mark.parametrize("make", [sha256_entry, blob_entry])
def test_fetch_verifies_caches_and_reuses(host, make):
    entry = make(host)
    path = hub.fetch(entry, progress=False)
    assert path == entry.cache_path()
    assert path.read_bytes() == PAYLOAD
    assert Host.requests == [Request(f"/{path.name}", None)]
    assert json.loads(Path(f"{path}.verified").read_text())["checksum"] == entry.checksum
    assert not list(path.parent.glob("*.part"))
    assert hub.fetch(entry, progress=False) == path
    assert len(Host.requests) == 1


def test_cache_hit_reads_the_recorded_verification_instead_of_hashing(host, monkeypatch):
    entry = sha256_entry(host)
    path = hub.fetch(entry, progress=False)

    def no_hashing(*_):
        raise AssertionError("a verified cached file was hashed again")

    monkeypatch.setattr(entries, "file_digest", no_hashing)
    assert hub.fetch(entry, progress=False) == path
    assert hub.resolve_backbone(path) == path
    assert len(Host.requests) == 1


def test_same_size_tampering_with_restored_mtime_is_still_detected(host):
    entry = sha256_entry(host)
    path = hub.fetch(entry, progress=False)
    before = path.stat()
    path.write_bytes(b"\1" * len(PAYLOAD))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not hub.is_verified(entry, path)
    assert hub.fetch(entry, progress=False).read_bytes() == PAYLOAD
    assert len(Host.requests) == 2


def tiny_torchscript(seed: int) -> bytes:
    """A small TorchScript archive, as bytes: a format that could run code when loaded."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buffer)
    return buffer.getvalue()


def forge(entry: hub.RemoteFile, content: bytes) -> Path:
    """What an attacker with write access to the cache does: new bytes, and a marker
    vouching for them exactly as the package would have written it."""
    path = entry.cache_path()
    path.write_bytes(content)
    cache.remember_verified(entry, path)
    return path


def test_code_capable_cached_file_is_hashed_at_every_load_whatever_its_marker(
    host, monkeypatch, capsys
):
    archive = tiny_torchscript(0)
    Host.files["/clip.pt"] = archive
    entry = hub.RemoteFile(
        "scripted", f"{host}/clip.pt", "clip.pt", sha256=hashlib.sha256(archive).hexdigest()
    )
    monkeypatch.setitem(hub.BACKBONES, "scripted", entry)
    path = hub.fetch(entry, progress=False)
    hashed = []
    monkeypatch.setattr(entries, "file_digest", lambda *a: hashed.append(a) or file_digest(*a))
    assert hub.fetch(entry, progress=False) == path and len(hashed) == 1

    forge(entry, tiny_torchscript(1))
    assert not hub.is_verified(entry, path)
    assert not Path(f"{path}.verified").exists()
    forge(entry, tiny_torchscript(1))
    assert main(["info"]) == 0
    assert "| scripted | backbone | mismatch |" in capsys.readouterr().out

    forge(entry, tiny_torchscript(1))
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    with pytest.raises(hub.OfflineError, match="does not match its checksum"):
        load_clip("scripted")
    monkeypatch.delenv("ANOMALYCLIP_OFFLINE")
    assert hub.fetch(entry, progress=False).read_bytes() == archive  # fetched again
    assert len(Host.requests) == 2


def test_forged_data_only_file_is_reported_by_info_verify(host, monkeypatch, capsys, caplog):
    entry = sha256_entry(host)
    monkeypatch.setitem(hub.BACKBONES, "demo", entry)
    path = hub.fetch(entry, progress=False)
    marker = json.loads(Path(f"{path}.verified").read_text())
    stat = path.stat()
    assert (marker["inode"], marker["device"], marker["size"]) == (
        stat.st_ino,
        stat.st_dev,
        stat.st_size,
    )
    assert main(["info", "--verify"]) == 0
    assert "| demo | backbone | ok |" in capsys.readouterr().out

    forge(entry, b"\1" * len(PAYLOAD))
    assert main(["info", "--verify", "--json"]) == 1
    files = {f["name"]: f for f in json.loads(capsys.readouterr().out)["files"]}
    assert files["demo"]["status"] == "mismatch"
    assert "do not match their checksums: demo" in caplog.text
    assert hub.fetch(entry, progress=False).read_bytes() == PAYLOAD  # the lie is forgotten
    assert len(Host.requests) == 2


def test_git_blob_id_is_gits(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello\n")
    # `printf 'hello\n' | git hash-object --stdin`
    assert file_digest(path, "git-blob") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert file_digest(path) == hashlib.sha256(b"hello\n").hexdigest()
    assert file_digest(path, "sha1") == hashlib.sha1(b"hello\n").hexdigest()
    with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
        file_digest(path, "md5")


def test_file_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"one")
    reads: list[Path] = []
    read = hashing._hash_file
    monkeypatch.setattr(hashing, "_hash_file", lambda *args: reads.append(args[0]) or read(*args))
    assert file_digest(path) == file_digest(tmp_path / "." / "weights.bin")
    assert len(reads) == 1
    path.write_bytes(b"three")
    assert file_digest(path) == hashlib.sha256(b"three").hexdigest()
    stat = path.stat()
    replacement = tmp_path / "replacement.bin"
    replacement.write_bytes(b"THREE")  # same size, same mtime: only the inode tells
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, path)
    assert file_digest(path) == hashlib.sha256(b"THREE").hexdigest()
    assert len(reads) == 3


def test_file_addresses_work_too(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "share" / "demo.bin"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    entry = hub.RemoteFile("demo", source.as_uri(), "demo.bin", sha256=PAYLOAD_SHA256)
    assert hub.fetch(entry, progress=False).read_bytes() == PAYLOAD


# -- broken downloads -----------------------------------------------------------------------


def test_corrupted_download_is_refused_then_retried(host, caplog):
    Host.plan = ["corrupt"]
    with caplog.at_level(logging.WARNING):
        path = hub.fetch(sha256_entry(host), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(Host.requests) == 2
    assert f"does not match sha256:{PAYLOAD_SHA256}" in caplog.text


def test_always_corrupt_download_fails_clearly_and_leaves_nothing(host):
    Host.plan = ["corrupt"] * hub.ATTEMPTS
    entry = sha256_entry(host)
    with pytest.raises(
        hub.DownloadError, match=f"could not download demo .sha256:{PAYLOAD_SHA256}"
    ):
        hub.fetch(entry, progress=False)
    assert len(Host.requests) == hub.ATTEMPTS
    assert not entry.cache_path().exists()
    assert not list(entry.cache_path().parent.glob("*.part"))


def test_truncated_download_resumes_with_range(host):
    Host.plan = ["truncate"]
    path = hub.fetch(sha256_entry(host), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert Host.requests == [
        Request("/demo.bin", None),
        Request("/demo.bin", f"bytes={len(PAYLOAD) // 3}-"),
    ]


def test_partial_file_from_an_earlier_run_is_resumed(host):
    entry = sha256_entry(host)
    entry.cache_path().parent.mkdir(parents=True)
    Path(f"{entry.cache_path()}.part").write_bytes(PAYLOAD[:1000])
    assert hub.fetch(entry, progress=False).read_bytes() == PAYLOAD
    assert Host.requests == [Request("/demo.bin", "bytes=1000-")]


def test_complete_partial_file_is_verified_when_the_range_is_past_the_end(host):
    entry = sha256_entry(host)
    entry.cache_path().parent.mkdir(parents=True)
    Path(f"{entry.cache_path()}.part").write_bytes(PAYLOAD)  # interrupted before the rename
    assert hub.fetch(entry, progress=False).read_bytes() == PAYLOAD
    assert Host.requests == [Request("/demo.bin", f"bytes={len(PAYLOAD)}-")]


def test_server_ignoring_range_restarts_from_zero(host):
    Host.plan = ["truncate", "ignore-range"]
    assert hub.fetch(sha256_entry(host), progress=False).read_bytes() == PAYLOAD
    assert Host.requests[1].range is not None


def test_passing_server_error_is_retried(host):
    Host.plan = ["busy"]
    assert hub.fetch(sha256_entry(host), progress=False).read_bytes() == PAYLOAD
    assert len(Host.requests) == 2


def test_missing_file_is_not_retried(host):
    entry = hub.RemoteFile("gone", f"{host}/gone.bin", "gone.bin", sha256=PAYLOAD_SHA256)
    with pytest.raises(hub.DownloadError, match=f"{host}/gone.bin: HTTP 404"):
        hub.fetch(entry, progress=False)
    assert len(Host.requests) == 1


def test_mirror_is_used_when_the_first_address_fails(host):
    entry = hub.RemoteFile(
        "demo", f"{host}/gone.bin", "demo.bin", sha256=PAYLOAD_SHA256, mirrors=(f"{host}/demo.bin",)
    )
    assert hub.fetch(entry, progress=False).read_bytes() == PAYLOAD
    assert [r.path for r in Host.requests] == ["/gone.bin", "/demo.bin"]


def test_git_lfs_pointer_is_recognised(host):
    Host.plan = ["lfs"] * hub.ATTEMPTS
    with pytest.raises(hub.DownloadError, match="sent a Git LFS pointer instead of the file"):
        hub.fetch(blob_entry(host), progress=False)


def test_not_enough_disk_space_is_said_before_downloading(host, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(hub.DownloadError, match=r"needs 1 MB, 0 MB are free"):
        hub.fetch(sha256_entry(host), progress=False)


def test_concurrent_fetches_of_one_file_download_it_once(host):
    Host.delay_s = 0.3
    entry = sha256_entry(host)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(hub.fetch(entry, progress=False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [entry.cache_path()] * 3
    assert len(Host.requests) == 1


# -- offline ------------------------------------------------------------------------------


def test_offline_message_names_address_cache_path_and_command(host, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    entry = sha256_entry(host)
    with pytest.raises(hub.OfflineError) as error:
        hub.fetch(entry, progress=False)
    message = str(error.value)
    assert "ANOMALYCLIP_OFFLINE is set" in message
    assert f"  demo: {entry.url}\n" in message
    assert f"    put it at {entry.cache_path()}\n" in message
    assert f"checksum sha256:{PAYLOAD_SHA256}" in message
    assert "`anomalyclip download demo`" in message
    assert isinstance(error.value, RuntimeError) and error.value.files == [entry]
    assert not Host.requests


def test_unreachable_host_is_an_offline_error_with_every_address(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path))
    monkeypatch.delenv("ANOMALYCLIP_OFFLINE", raising=False)
    first, mirror = closed_port_url("x.pt"), closed_port_url("mirror/x.pt")
    entry = hub.RemoteFile("x", first, "x.pt", sha256="0" * 64, mirrors=(mirror,))
    with pytest.raises(hub.OfflineError, match="no connection") as error:
        hub.fetch(entry, progress=False)
    assert f"x: {first}\n    or {mirror}\n" in str(error.value)
    assert "Connection refused" in str(error.value)


def test_offline_checkpoint_message_includes_its_missing_backbone(host, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    backbone = hub.BACKBONES["ViT-L/14@336px"]
    with pytest.raises(hub.OfflineError) as error:
        hub.resolve_checkpoint("mvtec")
    message = str(error.value)
    assert error.value.files == [hub.CHECKPOINTS["mvtec"].file, backbone]
    assert "`anomalyclip download mvtec ViT-L/14@336px`" in message
    assert f"{hub.AUTHORS_RAW}/checkpoints/9_12_4_multiscale_visa/epoch_15.pth" in message
    assert str(hub.CHECKPOINTS["mvtec"].file.cache_path()) in message
    assert backbone.url in message and str(backbone.cache_path()) in message


# -- the registry ---------------------------------------------------------------------------


def test_registry_holds_the_published_files_and_settings():
    backbone = hub.BACKBONES["ViT-L/14@336px"]
    assert backbone.url == (
        "https://openaipublic.azureedge.net/clip/models/"
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt"
    )
    for entry in hub.BACKBONES.values():
        assert all(f"/{entry.sha256}/{entry.filename}" in url for url in entry.urls)
    mvtec, visa = hub.CHECKPOINTS["mvtec"], hub.CHECKPOINTS["visa"]
    assert mvtec.file.git_blob == "72adc786e031b49ea288ba5f815f0d38cf158708"
    assert visa.file.git_blob == "c90f1d9d92d158b436a8fc193f984d4cec8b1fc8"
    assert mvtec.file.url.endswith(
        f"{hub.AUTHORS_COMMIT}/checkpoints/9_12_4_multiscale_visa/epoch_15.pth"
    )
    assert visa.file.url.endswith(
        f"{hub.AUTHORS_COMMIT}/checkpoints/9_12_4_multiscale/epoch_15.pth"
    )
    for info in (mvtec, visa):
        config = AnomalyCLIPConfig.from_dict({**AnomalyCLIPConfig().to_dict(), **info.config})
        assert (config.backbone, config.image_size, config.features) == (
            "ViT-L/14@336px",
            518,
            (24,),
        )
        assert (config.n_ctx, config.prompt_depth, config.deep_prompt_length) == (12, 9, 4)
        assert (config.dpam_layers, config.sigma) == (19, 4.0)


def test_backbone_aliases():
    vit_l_336 = hub.BACKBONES["ViT-L/14@336px"]
    for name in (
        "ViT-L/14@336px",
        "ViT-L-14-336",
        "ViT-L-14-336px",
        "vit_l_14_336",
        "ViT-L-14-336px.pt",
    ):
        assert hub.lookup_backbone(name) is vit_l_336
    assert hub.lookup_backbone("ViT-L-14") is hub.BACKBONES["ViT-L/14"]
    assert hub.lookup_backbone("ViT-B-16") is hub.BACKBONES["ViT-B/16"]
    assert hub.lookup_backbone("ViT-H-14") is None


def test_bad_registry_entries_are_refused():
    with pytest.raises(ValueError, match="exactly one checksum"):
        hub.RemoteFile("x", "https://h/x", "x")
    with pytest.raises(ValueError, match="is not a sha256"):
        hub.RemoteFile("x", "https://h/x", "x", sha256="abc")
    with pytest.raises(ValueError, match="must be a plain name"):
        hub.RemoteFile("x", "https://h/x", "../x", sha256="0" * 64)
    with pytest.raises(ValueError, match="not an http"):
        hub.RemoteFile("x", "ftp://h/x", "x", sha256="0" * 64)


def write_registry(tmp_path: Path, entries: dict) -> None:
    (tmp_path / "registry.json").write_text(json.dumps(entries))


def test_user_registry_shares_names(host, tmp_path):
    (tmp_path / "team.pth").write_bytes(b"prompts")
    write_registry(
        tmp_path,
        {
            "line-3": {"path": "team.pth", "config": {"image_size": 336}, "note": "line 3"},
            "remote": {"url": f"{host}/epoch_15.pth", "git_blob": PAYLOAD_BLOB},
            "mvtec": {
                "url": f"{host}/gone.pth",
                "mirrors": [f"{host}/epoch_15.pth"],
                "git_blob": PAYLOAD_BLOB,
            },
        },
    )
    path, info = hub.resolve_checkpoint("line-3")
    assert path == tmp_path / "team.pth"
    assert (info.config, info.note, info.backbone) == (
        {"image_size": 336},
        "line 3",
        "ViT-L/14@336px",
    )
    path, info = hub.resolve_checkpoint("remote")
    assert path.read_bytes() == PAYLOAD and path.name == "epoch_15.pth"
    assert hub.resolve_checkpoint("mvtec")[1].file.mirrors == (
        f"{host}/epoch_15.pth",
    )  # an in-house copy


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"url": "http://x/y.pth"}, "needs a sha256 or git_blob"),
        ({"path": "a.pth", "sha265": "0"}, "unknown keys sha265"),
        ({"note": "x"}, "needs a 'path' or a 'url'"),
        (
            {"kind": "backbone", "url": "http://x/y.pt", "git_blob": "0" * 40},
            "needs a 'url' and a 'sha256'",
        ),
    ],
)
def test_user_registry_mistakes_are_named(host, tmp_path, entry, problem):
    write_registry(tmp_path, {"bad": entry})
    with pytest.raises(ValueError, match=f"registry file .*registry.json.*{problem}"):
        hub.known_checkpoints()


def test_registry_config_mistakes_are_named_by_the_method(host, tmp_path):
    """The hub knows no method's configuration; AnomalyCLIP checks the names when it
    builds from the entry, before reading any file, naming the registry file."""
    from anomalyclip.methods.anomalyclip.model import create_model

    write_registry(tmp_path, {"bad": {"path": "a.pth", "config": {"image_sise": 1}}})
    hub.known_checkpoints()  # reading the registry is fine
    with pytest.raises(
        ValueError, match="registry file .*registry.json.*unknown config keys image_sise"
    ):
        create_model("bad")


def test_user_registry_in_toml(host, tmp_path, monkeypatch):
    pytest.importorskip("tomllib")
    registry = tmp_path / "registry.toml"
    registry.write_text(f'[remote]\nurl = "{host}/epoch_15.pth"\ngit_blob = "{PAYLOAD_BLOB}"\n')
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(registry))
    assert hub.download("remote", progress=False).read_bytes() == PAYLOAD


def test_user_backbone_is_trusted_by_checksum(host, tmp_path, monkeypatch):
    write_registry(
        tmp_path,
        {"team-clip": {"kind": "backbone", "url": f"{host}/demo.bin", "sha256": PAYLOAD_SHA256}},
    )
    path = hub.resolve_backbone("team-clip")
    assert path.read_bytes() == PAYLOAD
    assert hub.registered_sha256_for(path) == "team-clip"
    copy = tmp_path / "copy.pt"
    shutil.copy(path, copy)
    assert hub.is_registered_file(copy)
    assert hub.backbone_sha256("team-clip") == PAYLOAD_SHA256
    copy.write_bytes(b"something else")
    assert not hub.is_registered_file(copy)
    assert hub.backbone_sha256(copy) == hashlib.sha256(b"something else").hexdigest()


def test_unknown_names_say_what_is_known(host):
    with pytest.raises(
        FileNotFoundError, match=r"not a registered name \(mvtec, visa; add your own"
    ):
        hub.resolve_checkpoint("nope")
    with pytest.raises(FileNotFoundError, match=r"not a registered backbone \(ViT-B/32, "):
        hub.resolve_backbone("ViT-H-14")


# -- the command line -----------------------------------------------------------------------


def test_download_and_info_commands(host, monkeypatch, capsys):
    entry = sha256_entry(host)
    monkeypatch.setitem(hub.BACKBONES, "demo", entry)
    assert main(["download", "demo", "--no-progress"]) == 0
    assert capsys.readouterr().out == f"demo\t{entry.cache_path()}\n"
    assert main(["info"]) == 0
    output = capsys.readouterr().out
    assert f"| demo | backbone | ok | 1.0 MB | {entry.cache_path()} |" in output
    missing = hub.BACKBONES["ViT-L/14@336px"].cache_path()
    assert f"| ViT-L/14@336px | backbone | missing | - | {missing} |" in output
    assert (
        "mvtec: trained on MVTec AD; backbone ViT-L/14@336px; image_size=518, features=[24]"
        in output
    )

    entry.cache_path().write_bytes(b"tampered")
    assert main(["info", "--json"]) == 0
    files = {f["name"]: f for f in json.loads(capsys.readouterr().out)["files"]}
    assert files["demo"]["status"] == "mismatch" and files["mvtec"]["status"] == "missing"


def test_download_command_reports_failures_and_unknown_names(host, monkeypatch, caplog):
    monkeypatch.setitem(hub.BACKBONES, "demo", sha256_entry(host))
    monkeypatch.setitem(
        hub.BACKBONES, "gone", hub.RemoteFile("gone", f"{host}/gone.pt", "gone.pt", sha256="1" * 64)
    )
    assert main(["download", "no-such-model"]) == 2
    assert "unknown name(s) 'no-such-model'" in caplog.text
    assert main(["download", "gone", "demo", "--no-progress"]) == 2
    assert "not downloaded: gone" in caplog.text
    assert hub.BACKBONES["demo"].cache_path().is_file()


def test_download_with_no_names_fetches_the_default_backbone_and_mvtec(host, monkeypatch, capsys):
    Host.files["/clip.pt"] = b"clip weights"
    backbone = hub.RemoteFile(
        "ViT-L/14@336px",
        f"{host}/clip.pt",
        "ViT-L-14-336px.pt",
        sha256=hashlib.sha256(b"clip weights").hexdigest(),
    )
    monkeypatch.setitem(hub.BACKBONES, "ViT-L/14@336px", backbone)
    monkeypatch.setitem(
        hub.CHECKPOINTS, "mvtec", hub.CheckpointInfo("mvtec", blob_entry(host), "ViT-L/14@336px")
    )
    assert main(["download", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"ViT-L/14@336px\t{backbone.cache_path()}",
        f"mvtec\t{blob_entry(host).cache_path()}",
    ]


# -- the main job with no set-up --------------------------------------------------------------


def register_tiny_defaults(tmp_path: Path, monkeypatch) -> tuple[hub.RemoteFile, hub.RemoteFile]:
    """A tiny CLIP and prompts registered under the default names, as the authors' files are."""
    clip = tiny_clip()
    clip_file = tmp_path / "made" / "clip.pt"
    clip_file.parent.mkdir()
    torch.save(clip.state_dict(), clip_file)
    settings = dict(
        backbone="ViT-L/14@336px",
        image_size=64,
        features=[2, 4],
        dpam_layers=2,
        n_ctx=4,
        prompt_depth=2,
        deep_prompt_length=2,
    )
    model = AnomalyCLIP(clip, AnomalyCLIPConfig(**settings)).eval()
    prompts_file = save_checkpoint(tmp_path / "made" / "epoch_15.pth", model, layout="authors")
    assert read_checkpoint(prompts_file).config is None  # the authors' layout has no config
    nowhere = closed_port_url("")
    backbone = hub.RemoteFile(
        "ViT-L/14@336px",
        nowhere + "clip.pt",
        "ViT-L-14-336px.pt",
        sha256=file_digest(clip_file),
    )
    prompts = hub.RemoteFile(
        "mvtec",
        nowhere + "epoch_15.pth",
        "epoch_15.pth",
        git_blob=file_digest(prompts_file, "git-blob"),
    )
    monkeypatch.setitem(hub.BACKBONES, "ViT-L/14@336px", backbone)
    info = hub.CheckpointInfo("mvtec", prompts, "ViT-L/14@336px", settings, "tiny")
    monkeypatch.setitem(hub.CHECKPOINTS, "mvtec", info)
    return backbone, prompts


def write_images(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"part_{index}.png")


def test_predict_with_no_flags_uses_files_placed_in_the_cache_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    backbone, prompts = register_tiny_defaults(tmp_path, monkeypatch)
    for file, made in ((backbone, "clip.pt"), (prompts, "epoch_15.pth")):
        file.cache_path().parent.mkdir(parents=True)
        shutil.copy(tmp_path / "made" / made, file.cache_path())
    write_images(tmp_path / "images")
    out = tmp_path / "out"
    assert (
        main(["predict", str(tmp_path / "images"), "--output-dir", str(out), "--no-progress"]) == 0
    )
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == ["part_0.png", "part_1.png"]
    assert all(0.0 <= r["score"] <= 1.0 for r in records)


def test_predict_offline_with_an_empty_cache_says_what_to_fetch(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.delenv("ANOMALYCLIP_OFFLINE", raising=False)
    backbone, prompts = register_tiny_defaults(tmp_path, monkeypatch)
    write_images(tmp_path / "images")
    assert main(["predict", str(tmp_path / "images"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "no connection" in caplog.text
    for file in (backbone, prompts):
        assert file.url in caplog.text and str(file.cache_path()) in caplog.text
    assert "`anomalyclip download mvtec ViT-L/14@336px`" in caplog.text

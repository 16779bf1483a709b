"""Downloads against a local HTTP server standing in for the hosts; no test touches the network."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest

from anomalyclip import hub
from anomalyclip.cli import main

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Host(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; ``plan`` scripts misbehaviour per request."""

    plan: list[str] = []
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        behaviour = self.plan.pop(0) if self.plan else "ok"
        self.requests.append((self.path, self.headers.get("Range")))
        if behaviour == "missing":
            self.send_error(404)
            return
        body = PAYLOAD
        start = 0
        if self.headers.get("Range") and behaviour != "ignore-range":
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        data = body[start:]
        if behaviour == "corrupt":
            data = b"\0" * len(data)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if behaviour == "truncate":
            self.wfile.write(data[: len(data) // 3])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.delenv("ANOMALYCLIP_OFFLINE", raising=False)
    Host.plan, Host.requests = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Host)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def sha256_entry(base: str) -> hub.RemoteFile:
    return hub.RemoteFile(
        "demo", f"{base}/demo.bin", "demo.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest()
    )


def blob_entry(base: str) -> hub.RemoteFile:
    blob = hashlib.sha1(b"blob %d\0" % len(PAYLOAD) + PAYLOAD).hexdigest()
    return hub.RemoteFile("prompts", f"{base}/epoch_15.pth", "epoch_15.pth", git_blob=blob)


@pytest.mark.parametrize("make", [sha256_entry, blob_entry])
def test_fetch_verifies_caches_and_reuses(host, make):
    entry = make(host)
    path = hub.fetch(entry, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert path == entry.cache_path()
    assert len(Host.requests) == 1
    assert hub.fetch(entry, progress=False) == path
    assert len(Host.requests) == 1


def test_git_blob_id_matches_git(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello\n")
    assert hub.git_blob_sha1_file(path) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_corrupted_download_is_refused_then_retried(host):
    Host.plan = ["corrupt"]
    path = hub.fetch(sha256_entry(host), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(Host.requests) == 2


def test_always_corrupt_download_fails_clearly_and_leaves_nothing(host):
    Host.plan = ["corrupt"] * 3
    entry = sha256_entry(host)
    with pytest.raises(hub.DownloadError, match="does not match sha256"):
        hub.fetch(entry, progress=False)
    assert not entry.cache_path().exists()
    assert not list(entry.cache_path().parent.glob("*.part"))


def test_truncated_download_resumes_with_range(host):
    Host.plan = ["truncate"]
    path = hub.fetch(sha256_entry(host), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert Host.requests[0][1] is None
    assert Host.requests[1][1] == f"bytes={len(PAYLOAD) // 3}-"


def test_server_ignoring_range_restarts(host):
    Host.plan = ["truncate", "ignore-range"]
    assert hub.fetch(sha256_entry(host), progress=False).read_bytes() == PAYLOAD


def test_tampered_cache_is_fetched_again(host):
    entry = sha256_entry(host)
    path = hub.fetch(entry, progress=False)
    path.write_bytes(b"tampered")
    assert hub.fetch(entry, progress=False).read_bytes() == PAYLOAD
    assert len(Host.requests) == 2


def test_offline_message_names_address_and_cache_path(host, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    entry = sha256_entry(host)
    with pytest.raises(hub.OfflineError) as error:
        hub.fetch(entry, progress=False)
    message = str(error.value)
    assert entry.url in message and str(entry.cache_path()) in message
    assert "anomalyclip download demo" in message
    assert not Host.requests


def test_unreachable_host_is_an_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path))
    entry = hub.RemoteFile("x", "http://127.0.0.1:9/x.pt", "x.pt", sha256="0" * 64)
    with pytest.raises(hub.OfflineError, match=r"no connection.*http://127.0.0.1:9/x.pt"):
        hub.fetch(entry, progress=False)


def test_registered_names_resolve_through_the_cache(host, monkeypatch):
    entry = blob_entry(host)
    info = hub.CheckpointInfo("mvtec", entry, hub.DEFAULT_BACKBONE, hub.PAPER_SETTINGS)
    monkeypatch.setitem(hub.CHECKPOINTS, "mvtec", info)
    path, found = hub.resolve_checkpoint("mvtec")
    assert path.read_bytes() == PAYLOAD and found is info
    local = path.parent / "mine.pth"
    local.write_bytes(b"x")
    assert hub.resolve_checkpoint(local) == (local, None)
    with pytest.raises(FileNotFoundError, match="not a registered name"):
        hub.resolve_checkpoint("nope")


def test_backbone_aliases():
    for name in ("ViT-L/14@336px", "ViT-L-14-336px", "vit-l-14-336", "ViT-L-14-336px.pt"):
        assert hub._lookup_backbone(name) is hub.BACKBONES["ViT-L/14@336px"]
    assert hub._lookup_backbone("ViT-L/14") is hub.BACKBONES["ViT-L/14"]
    assert hub.BACKBONES["ViT-L/14@336px"].sha256 in hub.BACKBONES["ViT-L/14@336px"].url


def test_user_registry_shares_names(host, tmp_path):
    (tmp_path / "team.pth").write_bytes(b"prompts")
    blob = hashlib.sha1(b"blob %d\0" % len(PAYLOAD) + PAYLOAD).hexdigest()
    (tmp_path / "registry.json").write_text(
        json.dumps(
            {
                "line-3": {"path": "team.pth", "config": {"image_size": 336}},
                "remote": {"url": f"{host}/r.pth", "git_blob": blob},
            }
        )
    )
    path, info = hub.resolve_checkpoint("line-3")
    assert path == tmp_path / "team.pth" and info.config == {"image_size": 336}
    assert hub.resolve_checkpoint("remote")[0].read_bytes() == PAYLOAD
    (tmp_path / "registry.json").write_text(json.dumps({"bad": {"url": "http://x/y"}}))
    with pytest.raises(ValueError, match="needs a sha256 or git_blob"):
        hub.resolve_checkpoint("bad")


def test_download_and_info_commands(host, monkeypatch, capsys):
    entry = sha256_entry(host)
    monkeypatch.setitem(hub.BACKBONES, "demo", entry)
    assert main(["download", "demo"]) == 0
    assert entry.cache_path().read_bytes() == PAYLOAD
    assert main(["info"]) == 0
    output = capsys.readouterr().out
    assert "| demo | backbone | ok |" in output
    assert "| ViT-L/14@336px | backbone | missing |" in output
    assert main(["download", "no-such-model"]) == 2


def test_predict_with_no_flags_from_a_hand_filled_cache(tmp_path, monkeypatch):
    """The README's main job, offline, with the default files put in the cache by hand."""
    import torch
    from PIL import Image

    from anomalyclip.checkpoint import save_checkpoint
    from anomalyclip.config import AnomalyCLIPConfig
    from anomalyclip.model import AnomalyCLIP
    from tests.factories import tiny_clip

    monkeypatch.setenv("ANOMALYCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANOMALYCLIP_OFFLINE", "1")
    monkeypatch.setenv("ANOMALYCLIP_REGISTRY", str(tmp_path / "none.json"))
    clip = tiny_clip()
    model = AnomalyCLIP(
        clip,
        AnomalyCLIPConfig(
            image_size=32,
            features=(2, 4),
            dpam_layers=3,
            n_ctx=4,
            prompt_depth=3,
            deep_prompt_length=2,
        ),
    )
    clip_file = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), clip_file)
    prompts_file = save_checkpoint(tmp_path / "epoch_15.pth", model, layout="authors")

    backbone = hub.RemoteFile(
        hub.DEFAULT_BACKBONE,
        "http://127.0.0.1:9/b.pt",
        "ViT-L-14-336px.pt",
        sha256=hub.sha256_file(clip_file),
    )
    prompts = hub.RemoteFile(
        "mvtec",
        "http://127.0.0.1:9/e.pth",
        "epoch_15.pth",
        git_blob=hub.git_blob_sha1_file(prompts_file),
    )
    settings = {**hub.PAPER_SETTINGS, "image_size": 32, "features": [2, 4], "dpam_layers": 3}
    monkeypatch.setitem(hub.BACKBONES, hub.DEFAULT_BACKBONE, backbone)
    monkeypatch.setitem(
        hub.CHECKPOINTS,
        "mvtec",
        hub.CheckpointInfo("mvtec", prompts, hub.DEFAULT_BACKBONE, settings),
    )
    for file, source in ((backbone, clip_file), (prompts, prompts_file)):
        file.cache_path().parent.mkdir(parents=True, exist_ok=True)
        file.cache_path().write_bytes(source.read_bytes())

    image = tmp_path / "part.png"
    Image.new("RGB", (40, 30), (120, 10, 10)).save(image)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(image)]) == 0
    record = json.loads((tmp_path / "predictions.jsonl").read_text())
    with torch.no_grad():
        expected = model.predict([image])[0].score
    assert record["image"] == str(image)
    assert abs(record["score"] - expected) < 1e-5

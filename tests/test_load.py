"""The running service under concurrent load on 127.0.0.1: no failures, bounded memory,
clear 4xx answers to malformed requests. ``benchmarks/load_test.py`` does the work; run it
by hand with ``--duration`` for a soak.
"""

from __future__ import annotations

import json
import random
import sys

import httpx
import pytest

from benchmarks.load_test import (
    GOOD_WEIGHTS,
    ServerProcess,
    free_port,
    main,
    random_server_command,
    report_lines,
    request_kinds,
    rss_bytes,
    run_load,
    send,
    synthetic_images,
)

MEMORY_GROWTH_LIMIT_MB = 64


@pytest.fixture(scope="module")
def service():
    port = free_port()
    with ServerProcess(random_server_command(port), f"http://127.0.0.1:{port}") as server:
        yield server


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads memory from /proc")
def test_eight_clients_fifty_six_requests_no_errors_bounded_memory(service):
    report = run_load(
        service.url,
        requests=56,
        concurrency=8,
        malformed_share=0.0,
        images=synthetic_images(max_side=256),
        server_pid=service.pid,
    )
    assert report["requests"] == 56
    assert report["errors"] == 0, report["error_examples"]
    assert sum(stats["count"] for stats in report["by_kind"].values()) == 56
    assert set(report["by_kind"]) <= set(GOOD_WEIGHTS)
    assert all(stats["statuses"] == {"200": stats["count"]} for stats in report["by_kind"].values())
    memory = report["memory"]
    assert memory["rss_start_mb"] > 50
    assert memory["growth_mb"] < MEMORY_GROWTH_LIMIT_MB, memory
    assert memory["rss_peak_mb"] < memory["rss_start_mb"] + 2 * MEMORY_GROWTH_LIMIT_MB, memory
    assert report_lines(report)[0].endswith(": 0 errors")


def test_malformed_requests_get_clear_4xx_answers(service):
    limits = httpx.get(f"{service.url}/v1/model").json()["limits"]
    builders = request_kinds(synthetic_images(2), limits)
    expected = {
        "oversized": (413, "exceeds the limit of"),
        "too_many_pixels": (413, "over the limit of 40,000,000"),
        "not_an_image": (415, "notes.txt was sent as text/plain"),
        "garbage_bytes": (415, "x.png is not an image"),
        "truncated": (422, "cut.png: corrupt or truncated image"),
        "not_multipart": (415, "send images as multipart/form-data"),
    }
    rng = random.Random(0)
    with httpx.Client(base_url=service.url, timeout=60) as client:
        for kind, (status, message) in expected.items():
            request = builders[kind](rng)
            response = client.request(request.method, request.path, **request.options)
            assert response.status_code == status == request.expected, kind
            assert response.headers["content-type"] == "application/json"
            assert message in response.json()["detail"], kind
            assert send(client, request).ok
        # the service is still healthy and answering after the bad requests
        assert client.get("/healthz").json()["pending"] == 0


def test_concurrent_malformed_and_good_requests_mixed(service):
    report = run_load(
        service.url,
        requests=24,
        concurrency=8,
        malformed_share=0.5,
        images=synthetic_images(max_side=128),
        warmup=0,
    )
    assert report["requests"] == 24
    assert report["errors"] == 0, report["error_examples"]
    assert 0 < report["malformed"] < 24


def test_script_writes_a_json_report(service, tmp_path, capsys):
    target = tmp_path / "report.json"
    code = main(
        ["--url", service.url, "--server-pid", str(service.pid), "--requests", "8"]
        + ["--concurrency", "4", "--warmup", "0", "--json", str(target)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "8 requests" in printed and "server memory (RSS): start" in printed
    report = json.loads(target.read_text())
    assert report["requests"] == 8 and report["errors"] == 0
    assert report["memory"]["server_pid"] == service.pid
    assert report["memory"]["rss_end_mb"] == pytest.approx(rss_bytes(service.pid) / 2**20, rel=0.2)

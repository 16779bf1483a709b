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

from benchmarks.hostile_clients import HOSTILE
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
    assert report_lines(report)[0].endswith(": 0 errors, 0 busy (503/504), 0 other 5xx")
    assert report["healthy_after"]["predict_status"] == 200


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
        "wrong_method": (405, "Method Not Allowed"),
        "inf_threshold": (422, "Input should be a finite number"),
        "corrupt_image": (422, "bad.png: corrupt or truncated image"),
        "thousand_parts": (413, "refused at part 17 without reading the rest"),
    }
    rng = random.Random(0)
    with httpx.Client(base_url=service.url, timeout=60) as client:
        for kind, (status, message) in expected.items():
            request = builders[kind](rng)
            response = client.request(request.method, request.path, **request.options)
            assert response.status_code == status == request.expected, (kind, response.text)
            assert response.headers["content-type"] == "application/json"
            assert message in response.json()["detail"], kind
            assert send(client, request).ok
        heavy = send(client, builders["heavy_batch"](rng))
        assert heavy.ok and heavy.status == 200
        # the service is still healthy and answering after the bad requests
        assert client.get("/healthz").json()["pending"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads memory from /proc")
def test_a_short_soak_with_hostile_clients_leaves_the_service_healthy():
    """The soak's bounded form: every hostile kind, a burst over the connection cap, a few
    seconds, with the server's timeouts shortened to 1 s (3 s for a whole body)."""
    port = free_port()
    command = random_server_command(port, "--short-timeouts")
    with ServerProcess(command, f"http://127.0.0.1:{port}") as server:
        report = run_load(
            server.url,
            requests=None,
            duration_s=4,
            concurrency=4,
            malformed_share=0.5,
            images=synthetic_images(max_side=96),
            server_pid=server.pid,
            warmup=0,
            hostile=5,
            flood_every_s=1.5,
            flood_size=300,
        )
        log = server.log_summary()
    assert report["errors"] == 0, report["error_examples"]
    assert report["server_errors"] == 0
    kinds = set(report["by_kind"])
    assert {"idle_flood", "predict"} <= kinds
    assert len(kinds & set(HOSTILE)) >= 3, kinds  # five threads, random kinds, a few seconds
    # each flooding socket answered 408 (timed out) or 503 (over the cap of 256 sockets,
    # when the burst opens faster than the 1 s timeout closes them)
    assert set(report["by_kind"]["idle_flood"]["statuses"]) <= {"408", "503"}
    assert report["healthy_after"]["predict_status"] == 200
    assert report["healthy_after"]["healthz"]["pending"] == 0
    assert report["memory"]["growth_mb"] < MEMORY_GROWTH_LIMIT_MB
    assert log["tracebacks"] == 0, log


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

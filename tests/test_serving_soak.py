"""Clients that hold the service without using it, against a real server process: answers
never read (their memory bounded: answers are streamed) and bodies sent a byte at a time,
beside ordinary clients who must all be answered (issue 20, items 1-2 and the soak)."""

from __future__ import annotations

import sys
import threading
import time

import httpx
import pytest

from benchmarks.hostile_clients import Siege, noise_jpeg
from benchmarks.load_test import (
    MemoryWatch,
    ServerProcess,
    free_port,
    random_server_command,
    run_load,
    synthetic_images,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads memory from /proc"),
]

NON_READERS = 12
IMAGES_EACH = 6  # 1024 px noise: each answer 23 MB of JSON
# RSS while the twelve answers are parked (measured on 2 shared cores): about 16 MB a
# client now (one image's JSON waiting, the uploads, the allocator's share); 27 MB before,
# when each answer was held whole. After the write timeout drops them: within 60 MB of
# the start (before: the memory stayed with glibc, and the clients were never told)
HELD_PER_CLIENT_MB = 22
LEFT_AFTER_MB = 80


def batch_files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"n{index}.jpg", data, "image/jpeg")) for index, data in enumerate(images)]


def test_clients_that_never_read_large_answers_hold_little_memory():
    """Twelve clients each ask for six large overlays and never read: the server holds
    one image's answer and the uploads for each (the answer is streamed, each image
    rendered in its turn), a reading client is answered meanwhile, and the write timeout
    resets them, the memory going back to the system."""
    port = free_port()
    command = random_server_command(port, "--write-timeout", "15")
    images = [noise_jpeg(1024, seed) for seed in range(IMAGES_EACH)]
    with ServerProcess(command, f"http://127.0.0.1:{port}") as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            warm = client.post("/v1/predict/batch", files=batch_files(images))
        assert warm.status_code == 200 and warm.json()["succeeded"] == IMAGES_EACH
        answer_mb = len(warm.content) / 2**20
        watch = MemoryWatch(server.pid, interval_s=0.2)
        start = watch.sample()
        assert start is not None
        stop = threading.Event()
        siege = Siege(server.url, 0, NON_READERS, images, reopen_s=3600.0)
        attacking = threading.Thread(target=siege.run, args=(stop,), daemon=True)
        with watch:
            attacking.start()
            time.sleep(2.0)
            with httpx.Client(base_url=server.url, timeout=120) as client:
                good = client.post("/v1/predict/batch", files=batch_files(images[:2]))
                deadline = time.monotonic() + 120
                while client.get("/healthz").json()["pending"] and time.monotonic() < deadline:
                    time.sleep(0.5)
            time.sleep(3.0)  # every answer is now parked on its unread connection
            parked = len(siege.held)
            deadline = time.monotonic() + 60
            while sum(siege.closed.values()) < NON_READERS and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(3.0)
            stop.set()
            attacking.join()
        peak = max(value for _, value in watch.samples)
        end = watch.sample()
    assert end is not None
    growth_mb, left_mb = (peak - start) / 2**20, (end - start) / 2**20
    assert answer_mb > 20, answer_mb
    assert good.status_code == 200 and good.json()["succeeded"] == 2
    assert parked == NON_READERS, siege.summary()
    assert growth_mb < NON_READERS * HELD_PER_CLIENT_MB, (growth_mb, answer_mb)
    assert siege.closed == {"non_reader 200": NON_READERS}, siege.summary()
    assert left_mb < LEFT_AFTER_MB, (left_mb, growth_mb)


def test_a_short_soak_with_slow_bodies_and_non_readers_answers_every_good_request():
    """The acceptance soak's short form: slow bodies (a byte every 3 s) and clients that
    never read their multi-image answers, from another address, throughout; every good
    request is answered 200 (no 503 or 504), /healthz stays quick, and the attackers are
    each closed by the service's timeouts."""
    port = free_port()
    command = random_server_command(port, "--write-timeout", "5")
    with ServerProcess(command, f"http://127.0.0.1:{port}") as server:
        siege = Siege(server.url, 12, 10, [noise_jpeg(1024, seed) for seed in range(3)])
        report = run_load(
            server.url,
            requests=None,
            duration_s=25,
            concurrency=3,
            malformed_share=0.2,
            images=synthetic_images(max_side=256),
            server_pid=server.pid,
            warmup=2,
            siege=siege,
        )
        log = server.log_summary()
    assert report["errors"] == 0, report["error_examples"]
    assert report["good_busy"] == 0 and report["server_errors"] == 0, report["by_kind"]
    assert report["good_answered"] == report["good_sent"] > 10
    assert report["healthz"]["statuses"] == {"200": report["healthz"]["probes"]}
    assert report["healthz"]["p99_ms"] < 250, report["healthz"]
    closed = report["siege"]["closed_by_server"]
    assert closed.get("slow_body 408", 0) >= 12, closed  # each cut at the rate's grace, 10 s
    assert sum(n for kind, n in closed.items() if kind.startswith("non_reader")) >= 10, closed
    assert report["healthy_after"]["predict_status"] == 200
    assert log["tracebacks"] == 0, log

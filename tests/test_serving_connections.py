"""Slow and idle clients against a real uvicorn server on 127.0.0.1, with real sockets:
header and body timeouts, the connection and request caps, and cancelled work."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from anomalyclip.serving import ServiceSettings, create_app
from anomalyclip.serving.connections import server_options
from tests.helpers import SlowCalls, noise_png, tiny_service_model

FAST = {"header_timeout_s": 0.5, "body_timeout_s": 0.5, "body_deadline_s": 1.5}


@contextmanager
def running(model: Any, settings: ServiceSettings) -> Iterator[str]:
    """The service on a free port of 127.0.0.1, in a thread, for the block's duration."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(model, settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", **server_options(settings)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_all(sock: socket.socket, limit_s: float = 5.0) -> tuple[bytes, float]:
    """Everything until the server closes, and how long that took."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not piece:
            break
        data += piece
    return data, time.monotonic() - started


def head(path: str, length: int, boundary: str = "b0undary") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {length}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()


@pytest.fixture(scope="module")
def model():
    return tiny_service_model()


def healthy(url: str) -> bool:
    response = httpx.get(f"{url}/healthz", timeout=5)
    return response.status_code == 200 and response.json()["pending"] == 0


def test_idle_and_slow_header_clients_get_408_and_are_closed(model):
    with running(model, ServiceSettings(**FAST)) as url:
        idle, partial = connect(url), connect(url)
        partial.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: test\r\n")  # and no more
        for sock in (idle, partial):
            answer, waited = read_all(sock)
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
            assert b"did not arrive within 0.5 s" in answer
            assert waited < 2.0
            sock.close()
        assert healthy(url)


def test_a_body_that_stops_or_never_ends_gets_408_within_the_timeouts(model):
    with running(model, ServiceSettings(**FAST)) as url:
        stalled = connect(url)
        stalled.sendall(head("/v1/predict", 100_000) + b"--b0undary\r\n")
        answer, waited = read_all(stalled)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"did not arrive in time (12 bytes in" in answer
        assert waited < 1.5
        # a trickle that never stalls long enough is cut at the body deadline instead
        trickle = connect(url)
        trickle.sendall(
            head("/v1/predict", 100_000)
            + b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.png"'
            + b"\r\nContent-Type: image/png\r\n\r\n"
        )
        started = time.monotonic()
        try:
            while time.monotonic() - started < 4:
                trickle.sendall(b"x")
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, _ = read_all(trickle)
        assert b" 408 " in answer.split(b"\r\n")[0], answer
        assert time.monotonic() - started < 3.0
        stalled.close(), trickle.close()
        assert healthy(url)


def test_connections_and_requests_beyond_the_caps_get_503(model):
    settings = ServiceSettings(max_connections=6, max_body_reads=2, **FAST)
    with running(model, settings) as url:
        held = [connect(url) for _ in range(2)]
        for sock in held:  # two bodies arriving: they are slow
            sock.sendall(head("/v1/predict", 1000))
        time.sleep(0.1)
        third = httpx.post(f"{url}/v1/predict", files={"file": ("a.png", noise_png(32, 32))})
        assert third.status_code == 503
        assert third.json()["detail"].startswith("the service is busy (2 uploads arriving)")
        assert third.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200  # never capped
        idle = [connect(url) for _ in range(4)]  # with the two: the cap of 6 sockets
        time.sleep(0.1)
        # a seventh takes the place of the oldest socket that has sent nothing
        newcomer = connect(url)
        evicted, waited = read_all(idle[0])
        assert evicted.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), evicted
        assert b"no request sent on this connection" in evicted and waited < 1.0
        newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer, _ = read_all(newcomer)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        # when every socket has sent something, a connection beyond the cap is refused
        begun = idle[1:] + [connect(url)]
        for sock in begun:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # a head begun, not finished
        time.sleep(0.1)
        refused = connect(url)
        answer, waited = read_all(refused)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert b"too many connections (over 6)" in answer and waited < 1.0
        for sock in held + idle + begun + [newcomer, refused]:
            sock.close()
        time.sleep(0.2)
        assert healthy(url)


def test_a_client_that_leaves_has_its_batch_cancelled(monkeypatch):
    slow_model = tiny_service_model()
    slow = SlowCalls(slow_model, 0.2)
    monkeypatch.setattr(slow_model, "predict_images", slow)
    with running(slow_model, ServiceSettings(max_group_images=1, **FAST)) as url:
        files = [("files", (f"{i}.png", noise_png(32, 32, seed=i), "image/png")) for i in range(12)]
        request = httpx.Request("POST", f"{url}/v1/predict/batch", files=files)
        body = request.read()
        sock = connect(url)
        sock.sendall(
            f"POST /v1/predict/batch HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.5)  # two or three images in
        sock.close()
        calls_when_left = len(slow.calls)
        time.sleep(1.0)  # five more images' time
        calls_after = len(slow.calls)
        response = httpx.post(f"{url}/v1/predict", files={"file": ("a.png", noise_png(32, 32))})
        assert response.status_code == 200
    assert 1 <= calls_when_left < 12
    assert calls_after - calls_when_left <= 2, (calls_when_left, slow.calls)


def test_a_refused_body_is_drained_for_the_answer_but_not_for_ever(model):
    with running(model, ServiceSettings(max_upload_bytes=10_000, **FAST)) as url:
        sock = connect(url)
        sock.sendall(head("/v1/predict", 10**9))
        started = time.monotonic()
        sent = 0
        try:
            while time.monotonic() - started < 4:
                sock.sendall(b"x" * 1000)  # an honest client still sending its body
                sent += 1000
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        closed_after = time.monotonic() - started
        answer, _ = read_all(sock, 1.0)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"request body of 1,000,000,000 bytes exceeds the limit of" in answer
        assert closed_after < 2.0, closed_after  # the header timeout (0.5 s) plus slack
        assert healthy(url)


def test_slow_bodies_cannot_hold_the_request_slots_nor_healthz(model):
    """A trickle of a byte at a time never stalls long enough for the body timeout; it is
    cut by the minimum rate after its grace, and while it lasts it holds body slots only:
    /healthz and a complete upload are served (before: 503 for everyone)."""
    settings = ServiceSettings(
        max_concurrent_requests=2,
        max_body_reads=6,
        min_body_rate=1000,
        body_rate_grace_s=1.0,
        header_timeout_s=0.5,
        body_timeout_s=0.5,
        body_deadline_s=30,
    )
    with running(model, settings) as url:
        slow = [connect(url) for _ in range(4)]
        for sock in slow:
            sock.sendall(head("/v1/predict", 100_000) + b"--b0undary\r\n")
        started = time.monotonic()

        def trickle() -> None:
            while time.monotonic() - started < 5:
                for sock in slow:
                    with suppress(OSError):
                        sock.sendall(b"x")
                time.sleep(0.2)

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        time.sleep(0.3)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        files = {"file": ("a.png", noise_png(32, 32))}
        assert httpx.post(f"{url}/v1/predict", files=files, timeout=10).status_code == 200
        for sock in slow:
            answer, _ = read_all(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"arrived too slowly" in answer and b"1000 bytes/s" in answer
            sock.close()
        assert time.monotonic() - started < 3.0  # the grace (1 s) and slack, not 30 s
        sender.join(6)
        assert healthy(url)


@pytest.mark.parametrize(
    "limits",
    [{"write_timeout_s": 0.5}, {"write_timeout_s": 60.0, "max_write_buffer_bytes": 1}],
    ids=["write-timeout", "buffer-cap"],
)
def test_a_client_that_never_reads_its_responses_is_dropped(model, limits):
    """Pipelined requests whose responses are never read fill the socket; the server gives
    up after the write timeout (or at once, over the per-connection output cap) and
    aborts, freeing what it buffered (before: it waited for the reader for ever, the
    responses held in memory)."""
    settings = ServiceSettings(**limits, **FAST)
    with running(model, settings) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        request = b"GET /openapi.json HTTP/1.1\r\nHost: test\r\n\r\n"
        sock.sendall(request * 2000)  # about 40 MB of answers, none read
        time.sleep(3.0)
        sock.settimeout(3.0)
        received, closed = 0, False
        started = time.monotonic()
        while time.monotonic() - started < 10:
            try:
                piece = sock.recv(1 << 20)
            except ConnectionResetError:
                closed = True
                break
            except TimeoutError:
                break
            if not piece:
                closed = True
                break
            received += len(piece)
        sock.close()
        assert closed, f"still open after {received:,} bytes read"
        assert received < 20 * 1024 * 1024
        assert healthy(url)


def test_a_complete_head_over_the_header_limit_is_refused(model):
    """The header cap held only while the head was incomplete: 100 KB of headers in one
    write were served. Now 431 and closed, however the head arrives."""
    with running(model, ServiceSettings(max_header_bytes=64 * 1024, **FAST)) as url:
        for pieces in (1, 3):
            head_bytes = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 100_000
            head_bytes += b"\r\n\r\n"
            sock = connect(url)
            step = len(head_bytes) // pieces + 1
            for start in range(0, len(head_bytes), step):
                sock.sendall(head_bytes[start : start + step])
            answer, _ = read_all(sock)
            sock.close()
            assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), answer[:200]
            assert b"exceed the limit of 65,536" in answer
            assert b'"status":"ok"' not in answer and b"connection: close" in answer.lower()
        assert healthy(url)


def test_content_length_with_transfer_encoding_is_refused_and_nothing_after_it_served(model):
    with running(model, ServiceSettings(**FAST)) as url:
        sock = connect(url)
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
        )
        answer, waited = read_all(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
        assert b"both Content-Length and Transfer-Encoding" in answer
        assert answer.count(b"HTTP/1.1 ") == 1, answer  # the smuggled request not served
        assert waited < 1.0
        assert healthy(url)


def leave_after(url: str, path: str, images: list[bytes], worked: list[float]) -> float:
    """Send a whole multipart request, close the socket once its work has begun (a piece
    of it is in ``worked``) and gone on for half a second; when it left."""
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    request = httpx.Request("POST", f"{url}{path}", files=files)
    body = request.read()
    sock = connect(url)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        + body
    )
    deadline = time.monotonic() + 120
    while not worked and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    sock.close()
    return time.monotonic()


def assert_released(url: str, worked: list[float], left: float) -> None:
    """The work had begun when the client left, no piece of it started 2 s after, and the
    worker serves the next request."""
    time.sleep(3.0)
    assert worked and min(worked) < left, "the work had not begun when the client left"
    assert max(worked) - left < 2.0, [round(t - left, 2) for t in worked]
    answer = httpx.post(
        f"{url}/v1/predict", files={"file": ("a.png", noise_png(32, 32))}, timeout=60
    )
    assert answer.status_code == 200


def test_an_abandoned_reference_bank_build_releases_the_worker(monkeypatch):
    """64 noise PNGs to /v1/references kept the worker ~390 s after the client left:
    the bank's encoding stops between batches."""
    model = tiny_service_model()
    encoded = model.encode_image(torch.zeros(8, 3, 64, 64))
    worked: list[float] = []

    def slow_encode(images):
        worked.append(time.monotonic())
        time.sleep(0.15 * len(images))  # 1.2 s a batch of 8
        return encoded

    monkeypatch.setattr(model, "encode_image", slow_encode)
    images = [noise_png(32, 32, seed=i) for i in range(64)]  # about 9.6 s of encoding
    with running(model, ServiceSettings(**FAST)) as url:
        left = leave_after(url, "/v1/references", images, worked)
        monkeypatch.undo()
        assert_released(url, worked, left)


def test_an_abandoned_set_releases_the_worker(monkeypatch):
    """A MuSc set abandoned by its client kept the worker ~11 minutes: the mutual
    scoring stops between the set's images."""
    from anomalyclip.methods.musc import model as musc_model
    from anomalyclip.methods.musc.factory import create_musc
    from anomalyclip.preprocess import load_image
    from tests.factories import tiny_clip

    worked: list[float] = []

    def slow_scores(vectors, *args, advance=None, **kwargs):
        for _ in range(len(vectors)):
            worked.append(time.monotonic())
            time.sleep(0.05)
            if advance is not None:
                advance(1)
        return torch.zeros(vectors.shape[:2], dtype=torch.float64)

    musc = create_musc(tiny_clip(), overrides={"image_size": 32, "features": (2, 4)})
    images = [noise_png(32, 32, seed=i) for i in range(24)]  # 6 (layer, degree) x 1.2 s
    decoded = torch.stack([musc.preprocessor.tensor(load_image(data)) for data in images])
    features = musc.features(decoded)  # computed here: only the scoring is slow
    monkeypatch.setattr(musc, "features", lambda batch, shard=False: features)
    monkeypatch.setattr(musc_model, "mutual_scores", slow_scores)
    predictors = {"anomalyclip": tiny_service_model(), "musc": musc}
    with running(predictors, ServiceSettings(**FAST)) as url:
        left = leave_after(url, "/v1/predict/set?method=musc", images, worked)
        assert_released(url, worked, left)


def test_one_client_filling_the_request_cap_does_not_keep_another_out(monkeypatch):
    """Issue 20's soak: sixty clients of one address that never read their answers held
    every request slot until the write timeout, and good clients of another address got
    503. A client alone still has the whole cap; another is let in over it."""
    slow_model = tiny_service_model()
    monkeypatch.setattr(slow_model, "predict_images", SlowCalls(slow_model, 1.0))
    settings = ServiceSettings(max_concurrent_requests=2, **FAST)
    files = {"file": ("a.png", noise_png(32, 32))}
    with running(slow_model, settings) as url:
        answers: list[int] = []

        def predict_from(address: str) -> None:
            transport = httpx.HTTPTransport(local_address=address)
            with httpx.Client(transport=transport, timeout=30) as client:
                answers.append(client.post(f"{url}/v1/predict", files=files).status_code)

        first = [threading.Thread(target=predict_from, args=("127.0.0.1",)) for _ in range(2)]
        for thread in first:
            thread.start()
        time.sleep(0.5)  # both of the first client's requests in progress: the cap
        same = httpx.post(f"{url}/v1/predict", files=files)
        assert same.status_code == 503 and "2 requests in progress" in same.json()["detail"]
        other = threading.Thread(target=predict_from, args=("127.0.0.2",))
        other.start()
        for thread in [*first, other]:
            thread.join()
    assert answers == [200, 200, 200]

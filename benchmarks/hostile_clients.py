"""Clients that misbehave at the socket level, for the soak test (``load_test.py``).

Each one opens its own connection to the service, misbehaves in one way, and returns the
status the service answered (None when the server closed without one) and an error when
the answer was not one of the documented ones. The service's limits (``/v1/model``'s
``limits``) say how long each should take at most.
"""

from __future__ import annotations

import contextlib
import io
import random
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

BOUNDARY = "hostileboundary"
SLACK_S = 3.0  # scheduling on a loaded machine, beyond the service's own timeouts


@dataclass
class Answer:
    status: int | None
    seconds: float
    error: str | None = None


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    return host, int(port)


def read_status(sock: socket.socket, limit_s: float) -> int | None:
    """The status line's code of whatever the server sends before closing or ``limit_s``."""
    sock.settimeout(limit_s)
    data = b""
    deadline = time.monotonic() + limit_s
    while b"\r\n" not in data and time.monotonic() < deadline:
        try:
            piece = sock.recv(4096)
        except (ConnectionResetError, TimeoutError, OSError):
            break
        if not piece:
            break
        data += piece
    line = data.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None


def multipart_head(path: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: soak\r\n{size}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
    ).encode()


def part_head(name: str = "a.png") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def png(side: int = 48, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    image = Image.frombytes(
        "RGB", (side, side), bytes(rng.randrange(256) for _ in range(3 * side**2))
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def judged(status: int | None, started: float, allowed: set[int | None], within_s: float) -> Answer:
    seconds = time.monotonic() - started
    error = None
    if status not in allowed:
        error = f"answered {status}, expected one of {sorted(allowed, key=str)}"
    elif seconds > within_s:
        error = f"took {seconds:.1f} s, over the {within_s:.1f} s the limits allow"
    return Answer(status, seconds, error)


def idle_socket(url: str, limits: dict[str, Any]) -> Answer:
    """Connects and sends nothing: 408 after the header timeout (503 over the cap)."""
    started = time.monotonic()
    within = limits["header_timeout_s"] + SLACK_S
    with socket.create_connection(address(url), timeout=5) as sock:
        status = read_status(sock, within)
    return judged(status, started, {408, 503}, within)


def slow_headers(url: str, limits: dict[str, Any]) -> Answer:
    """Sends the request line and one header a byte at a time, then stops."""
    started = time.monotonic()
    within = limits["header_timeout_s"] + SLACK_S
    with socket.create_connection(address(url), timeout=5) as sock:
        try:
            for byte in b"POST /v1/predict HTTP/1.1\r\nHost: so":
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass
        status = read_status(sock, within)
    return judged(status, started, {408, 503}, within)


def stalled_body(url: str, limits: dict[str, Any]) -> Answer:
    """Declares a body, sends its first part's header, and stops: 408 after the body timeout."""
    started = time.monotonic()
    within = limits["header_timeout_s"] + limits["body_timeout_s"] + SLACK_S
    with socket.create_connection(address(url), timeout=5) as sock:
        with contextlib.suppress(OSError):  # refused at connect: its 503 is read below
            sock.sendall(multipart_head("/v1/predict", 200_000) + part_head())
        status = read_status(sock, within)
    return judged(status, started, {408, 503}, within)


def endless_body(url: str, limits: dict[str, Any]) -> Answer:
    """A chunked body that never ends, each piece in time: cut at the body deadline."""
    started = time.monotonic()
    within = limits["header_timeout_s"] + limits["body_deadline_s"] + SLACK_S
    pause = min(1.0, limits["body_timeout_s"] / 3)
    with socket.create_connection(address(url), timeout=5) as sock:
        first = part_head()
        with contextlib.suppress(OSError):  # refused at connect: its 503 is read below
            sock.sendall(
                multipart_head("/v1/predict", None) + b"%x\r\n%s\r\n" % (len(first), first)
            )
        sock.setblocking(False)
        while time.monotonic() - started < within:
            try:
                sock.sendall(b"1\r\nx\r\n")
            except (BlockingIOError, OSError):
                break
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # an answer came
            except BlockingIOError:
                pass
            except OSError:
                break
            time.sleep(pause)
        sock.setblocking(True)
        status = read_status(sock, 5)
    return judged(status, started, {408, 503}, within)


def slow_upload(url: str, limits: dict[str, Any]) -> Answer:
    """A valid image sent slowly but within every timeout: scored (200), or refused at
    connect when a flood holds every connection (503, then the socket is closed)."""
    started = time.monotonic()
    body = part_head("slow.png") + png() + f"\r\n--{BOUNDARY}--\r\n".encode()
    pause = min(0.5, limits["body_timeout_s"] / 4)
    step = len(body) // 4 + 1
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    within = len(pieces) * pause + limits["request_timeout_s"] + SLACK_S
    with socket.create_connection(address(url), timeout=5) as sock:
        try:
            sock.sendall(multipart_head("/v1/predict", len(body)))
            for piece in pieces:
                time.sleep(pause)
                sock.sendall(piece)
        except OSError:
            pass  # refused while sending: what it answered is read below
        status = read_status(sock, within)
    return judged(status, started, {200, 503}, within)


HOSTILE: dict[str, Callable[[str, dict[str, Any]], Answer]] = {
    "idle_socket": idle_socket,
    "slow_headers": slow_headers,
    "stalled_body": stalled_body,
    "endless_body": endless_body,
    "slow_upload": slow_upload,
}


def flood(url: str, limits: dict[str, Any], count: int) -> list[Answer]:
    """``count`` idle sockets at once: each is refused (503) over the cap or timed out (408).

    Answers are read on all sockets together, so the flood lasts about one header timeout.
    """
    started = time.monotonic()
    within = limits["header_timeout_s"] + SLACK_S
    sockets: list[socket.socket] = []
    answers: list[Answer] = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection(address(url), timeout=5))
        except OSError as error:
            answers.append(Answer(None, time.monotonic() - started, f"connect failed: {error}"))
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    pending = len(sockets)
    while pending and time.monotonic() - started < within + SLACK_S:
        for key, _ in selector.select(timeout=0.5):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                data = ready.recv(4096)
            except OSError:
                data = b""
            line = data.split(b"\r\n", 1)[0].split()
            status = int(line[1]) if len(line) >= 2 and line[1].isdigit() else None
            answers.append(judged(status, started, {408, 503, None}, within))
            selector.unregister(ready)
            ready.close()
            pending -= 1
    for key in list(selector.get_map().values()):
        answers.append(Answer(None, time.monotonic() - started, "no answer and not closed"))
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()
    return answers

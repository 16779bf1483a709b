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
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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


def noise_jpeg(side: int = 1024, seed: int = 0) -> bytes:
    """Noise as a JPEG: a modest upload whose overlay PNG is large (noise compresses badly)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
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

    Answers are read on all sockets together, so the flood lasts about one header timeout;
    each is timed from its own connection (opening hundreds takes seconds on a busy host).
    """
    started = time.monotonic()
    within = limits["header_timeout_s"] + SLACK_S
    sockets: list[socket.socket] = []
    answers: list[Answer] = []
    connected: dict[int, float] = {}
    for _ in range(count):
        try:
            sockets.append(socket.create_connection(address(url), timeout=5))
            connected[sockets[-1].fileno()] = time.monotonic()
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
            since = connected[ready.fileno()]
            answers.append(judged(status, since, {408, 503, None}, within))
            selector.unregister(ready)
            ready.close()
            pending -= 1
    for key in list(selector.get_map().values()):
        answers.append(Answer(None, time.monotonic() - started, "no answer and not closed"))
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()
    return answers


# attackers held open throughout a soak -------------------------------------------------

TCP_ESTABLISHED = 1  # tcpi_state, the first byte of Linux's TCP_INFO


def still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor reset the connection, read without
    taking any data off the socket (Linux's TCP_INFO; elsewhere: a pending error)."""
    if hasattr(socket, "TCP_INFO"):
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return False
        return state == TCP_ESTABLISHED
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def peeked_status(sock: socket.socket) -> int | None:
    """The status code at the front of the unread answer, left in place (None: none yet)."""
    try:
        data = sock.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    line = data.split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None


def batch_request(images: list[bytes]) -> bytes:
    """A whole /v1/predict/batch request of these PNGs, as raw bytes."""
    body = b"".join(
        part_head(f"n{index}.png").replace(b'name="file"', b'name="files"') + image + b"\r\n"
        for index, image in enumerate(images)
    )
    body += f"--{BOUNDARY}--\r\n".encode()
    return multipart_head("/v1/predict/batch", len(body)) + body


@dataclass
class Held:
    """One attacker's socket: what it is, when it opened, when it next sends a byte."""

    kind: str
    sock: socket.socket
    opened: float
    next_byte: float
    status: int | None = None


@dataclass
class Siege:
    """Attackers kept open for a whole soak, each reopened as soon as the server closes it.

    ``slow_bodies`` sockets each declare a ``body_bytes`` upload and send one byte every
    ``trickle_s`` (the issue's 70 x 100 kB at a byte per 3 s); ``non_readers`` sockets
    each send a whole batch request of ``images`` and never read the answer (their
    receive buffers kept small, so the server's side fills). :meth:`run` keeps them open
    until ``stop`` is set, each reopened ``reopen_s`` after the server ends it; ``closed``
    counts by kind and status (peeked, never read) the connections the server ended,
    ``lifetimes`` how long each was held. They connect from ``source`` (another loopback
    address: another host, as far as the service can tell).
    """

    url: str
    slow_bodies: int
    non_readers: int
    images: list[bytes]
    body_bytes: int = 100_000
    trickle_s: float = 3.0
    tick_s: float = 0.25
    reopen_s: float = 1.0
    source: str = "127.0.0.2"
    held: list[Held] = field(default_factory=list)
    due: list[tuple[float, str]] = field(default_factory=list)
    closed: Counter[str] = field(default_factory=Counter)
    lifetimes: dict[str, list[float]] = field(default_factory=dict)
    connect_errors: int = 0

    def open(self, kind: str) -> None:
        now = time.monotonic()
        try:
            sock = socket.socket()
            if kind == "non_reader":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(5)
            sock.bind((self.source, 0))
            sock.connect(address(self.url))
            if kind == "non_reader":
                sock.sendall(batch_request(self.images))
            else:
                sock.sendall(multipart_head("/v1/predict", self.body_bytes) + part_head())
            sock.setblocking(False)
        except OSError:
            self.connect_errors += 1
            sock.close()
            self.due.append((now + self.reopen_s, kind))
            return
        self.held.append(Held(kind, sock, now, now + self.trickle_s))

    def tick(self) -> None:
        now = time.monotonic()
        kept: list[Held] = []
        for item in self.held:
            if item.status is None:
                item.status = peeked_status(item.sock)
            if item.kind == "slow_body" and now >= item.next_byte:
                item.next_byte = now + self.trickle_s
                with contextlib.suppress(OSError):
                    item.sock.send(b"x")
            if still_open(item.sock):
                kept.append(item)
                continue
            if item.status is None:
                item.status = peeked_status(item.sock)
            self.closed[f"{item.kind} {item.status}"] += 1
            self.lifetimes.setdefault(item.kind, []).append(now - item.opened)
            item.sock.close()
            self.due.append((now + self.reopen_s, item.kind))
        self.held = kept
        opening = [kind for when, kind in self.due if when <= now]
        self.due = [(when, kind) for when, kind in self.due if when > now]
        for kind in opening:
            self.open(kind)

    def run(self, stop: threading.Event) -> None:
        self.due = [(0.0, "slow_body")] * self.slow_bodies + [
            (0.0, "non_reader")
        ] * self.non_readers
        while not stop.is_set():
            self.tick()
            stop.wait(self.tick_s)
        for item in self.held:
            item.sock.close()
        self.held = []

    def summary(self) -> dict[str, Any]:
        return {
            "slow_bodies": self.slow_bodies,
            "non_readers": self.non_readers,
            "closed_by_server": dict(sorted(self.closed.items())),
            "held_s_p50": {
                kind: round(sorted(values)[len(values) // 2], 1)
                for kind, values in self.lifetimes.items()
            },
            "connect_errors": self.connect_errors,
        }

"""Sockets under control: uvicorn with header timeouts, a connection cap and a quiet log.

uvicorn times out idle keep-alive connections but not a client that connects and never
finishes its headers, and it accepts every connection it can: about a thousand idle
sockets exhaust the usual ``ulimit -n 1024``, and asyncio then logs "socket.accept() out
of system resource" with a traceback thousands of times a second. Here:

- :class:`GuardedH11Protocol` gives each request ``header_timeout_s`` to send its request
  line and headers (then 408 and close), and keeps at most ``max_connections`` open: a
  connection beyond it takes the place of the oldest one that has sent nothing yet
  (closed with 503), else it is answered 503 and closed at once. Idle sockets (a flood
  of them from the same address as good clients) thus cannot keep a client that sends
  its request at once from being served, and sockets stay bounded;
- a response the client does not read (the transport pauses writing: asyncio's flow
  control) must be flushed within ``write_timeout_s``, and a connection may hold at most
  ``max_write_buffer_bytes`` of unsent output; beyond either the connection is aborted,
  which frees what it buffered (uvicorn would wait for the reader for ever);
- a request's complete head (request line and headers) is held to ``max_header_bytes``
  (431, closed) however it arrives: h11's own limit applies only while the head is
  incomplete, so 100 KB of headers in one write passed; a request with both
  ``Content-Length`` and ``Transfer-Encoding`` is refused (400, closed), so that a
  request smuggled after it is never read (:class:`CheckedConnection`);
- the accept backlog is bounded too (asyncio accepts up to ``backlog`` sockets at a time
  before any can be refused);
- :class:`RepeatedErrorFilter` lets one "too many open files" record through per interval,
  with the count of those it held back, and drops their tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.utils.memory import limit_arenas, release_free_memory

logger = logging.getLogger(__name__)

FD_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
FD_ERROR_TEXT = ("Too many open files", "out of system resource")
LOGGERS_FILTERED = ("asyncio", "uvicorn.error")
SPARE_DESCRIPTORS = 128  # model files, threads' pipes, the log: what is not a socket


def raw_response(status: str, detail: str) -> bytes:
    body = ('{"detail": "' + detail + '"}').encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if status.startswith("503"):
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


def head_size(event: h11.Request) -> int:
    """Bytes of a request's line and headers as sent (to within line-ending spaces)."""
    line = len(event.method) + len(event.target) + len(b"  HTTP/1.1\r\n")
    fields = sum(len(name) + len(value) + 4 for name, value in event.headers.raw_items())
    return line + fields + 2


class CheckedConnection(h11.Connection):
    """h11's server connection, refusing a complete request head it should not serve.

    The refusal (status line, detail) is kept in :attr:`refusal` and raised as h11's
    protocol error, which uvicorn answers through ``send_400_response``.
    """

    def __init__(self, max_header_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes = max_header_bytes
        self.refusal: tuple[str, str] | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as error:
            if error.error_status_hint == 431:  # still incomplete, and already too long
                self.refusal = (
                    "431 Request Header Fields Too Large",
                    f"the request headers exceed the limit of {self.max_header_bytes:,} bytes",
                )
            raise
        if isinstance(event, h11.Request):
            names = {name.lower() for name, _ in event.headers.raw_items()}
            size = head_size(event)
            if size > self.max_header_bytes:
                self.refusal = (
                    "431 Request Header Fields Too Large",
                    f"the request headers ({size:,} bytes) exceed the limit of "
                    f"{self.max_header_bytes:,}",
                )
            elif b"content-length" in names and b"transfer-encoding" in names:
                self.refusal = (
                    "400 Bad Request",
                    "a request may not carry both Content-Length and Transfer-Encoding",
                )
            if self.refusal is not None:
                raise h11.RemoteProtocolError(self.refusal[1])
        return event


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a cap on open connections.

    The two limits are class attributes, set by :func:`guarded_protocol` for a service.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 256
    max_header_bytes: int = 64 * 1024
    write_timeout_s: float = 30.0
    max_write_buffer_bytes: int = 256 * 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._waiting_cycle: object = None
        self.conn = CheckedConnection(self.max_header_bytes)
        self.silent_since: float | None = None  # connected, nothing received yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_silent():
            refused.note(self.max_connections)
            detail = f"too many connections (over {self.max_connections}); retry shortly"
            transport.write(raw_response("503 Service Unavailable", detail))
            transport.close()
            return
        self.silent_since = self.loop.time()
        self._arm_header_timer()

    def _evict_silent(self) -> bool:
        """Close the oldest open connection that has sent nothing, to make room for this
        one; False when every connection has sent something (none is only holding a
        socket)."""
        silent = [
            other
            for other in self.connections
            if isinstance(other, GuardedH11Protocol)
            and other.silent_since is not None
            and not other.transport.is_closing()
        ]
        if not silent:
            return False
        oldest = min(silent, key=lambda other: other.silent_since or 0.0)
        detail = (
            f"no request sent on this connection while the service was at its cap of "
            f"{self.max_connections} connections"
        )
        oldest.transport.write(raw_response("503 Service Unavailable", detail))
        oldest.transport.close()
        oldest.silent_since = None
        return True

    def data_received(self, data: bytes) -> None:
        self.silent_since = None
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the next request on a kept-alive connection
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._waiting_cycle:
            self._disarm_header_timer()  # its headers are in: the body has its own timeout

    def send_400_response(self, msg: str) -> None:
        refusal = getattr(self.conn, "refusal", None)
        if refusal is None:
            super().send_400_response(msg)
            return
        self.transport.write(raw_response(*refusal))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._disarm_write_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client is not reading fast enough: it has ``write_timeout_s`` to catch up."""
        super().pause_writing()
        buffered = self.transport.get_write_buffer_size()
        if buffered > self.max_write_buffer_bytes:
            self._drop(
                f"{buffered:,} bytes of output unread, over the limit of "
                f"{self.max_write_buffer_bytes:,}"
            )
            return
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._disarm_write_timer()
        super().resume_writing()

    def _disarm_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        buffered = self.transport.get_write_buffer_size()
        self._drop(
            f"the response was not read within {self.write_timeout_s:g} s "
            f"({buffered:,} bytes unsent)"
        )

    def _drop(self, reason: str) -> None:
        """Abort the connection: its unsent output is discarded, not kept for the reader.

        With a zero linger the kernel resets the connection at once and drops what it
        still buffered too; a plain close would queue a FIN behind that data, which a
        client that never reads never receives (the socket left half-closed, its client
        never told).
        """
        if self.transport.is_closing() and not self.transport.get_write_buffer_size():
            return
        logger.info("dropped a connection from %s: %s", self.client, reason)
        self._disarm_write_timer()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
        release_free_memory()

    def _arm_header_timer(self) -> None:
        self._waiting_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        """Close; with a 408 unless this cycle was already answered (a client still
        sending the body of a refused request, which uvicorn would otherwise keep)."""
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE:
            detail = f"the request headers did not arrive within {self.header_timeout_s:g} s"
            self.transport.write(raw_response("408 Request Timeout", detail))
        self.transport.close()


class RefusalCount:
    """Connections refused over the cap, logged at most once per interval."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.count = 0
        self.last = 0.0

    def note(self, limit: int) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            logger.warning(
                "refused %d connection(s) over the limit of %d open since the last such "
                "message (one per %g s at most)",
                self.count,
                limit,
                self.interval_s,
            )
            self.count, self.last = 0, now


refused = RefusalCount()


def guarded_protocol(settings: ServiceSettings) -> type[GuardedH11Protocol]:
    """The protocol class with this service's limits."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_connections": settings.max_connections,
            "max_header_bytes": settings.max_header_bytes,
            "write_timeout_s": settings.write_timeout_s,
            "max_write_buffer_bytes": settings.max_write_buffer_bytes,
        },
    )


class RepeatedErrorFilter(logging.Filter):
    """One "out of file descriptors" record per ``interval_s``, without its traceback.

    The record let through says how many were held back since the last one, so the log
    still shows how often it happened; other records pass untouched.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.suppressed = 0
        self.last = float("-inf")

    @staticmethod
    def is_fd_error(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError) and error.errno in FD_ERRORS:
            return True
        message = record.getMessage()
        return any(text in message for text in FD_ERROR_TEXT)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.is_fd_error(record):
            return True
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        cause = f" ({error})" if error is not None else ""
        record.msg = (
            f"{record.getMessage()}{cause}; {self.suppressed} more like it in the last "
            f"{self.interval_s:g} s were not logged: the process is out of file descriptors "
            "(raise `ulimit -n` or lower --max-connections)"
        )
        record.args = None
        record.exc_info = None
        record.exc_text = None
        self.suppressed, self.last = 0, now
        return True


def install_log_filter(interval_s: float = 10.0) -> RepeatedErrorFilter:
    """Put one shared :class:`RepeatedErrorFilter` on the loggers that repeat the error."""
    shared = RepeatedErrorFilter(interval_s)
    for name in LOGGERS_FILTERED:
        target = logging.getLogger(name)
        for existing in [f for f in target.filters if isinstance(f, RepeatedErrorFilter)]:
            target.removeFilter(existing)
        target.addFilter(shared)
    return shared


def descriptors_needed(settings: ServiceSettings) -> int:
    """Descriptors the service may hold: capped connections, the accept burst, the rest."""
    return settings.max_connections + backlog(settings) + SPARE_DESCRIPTORS


def backlog(settings: ServiceSettings) -> int:
    return min(128, settings.max_connections)


def check_descriptor_limit(settings: ServiceSettings) -> None:
    """Warn when ``ulimit -n`` is too low for the connection limit (Unix only)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to check
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = descriptors_needed(settings)
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning(
            "ulimit -n is %d, below the %d descriptors that --max-connections %d may take; "
            "lower --max-connections or raise the limit",
            soft,
            needed,
            settings.max_connections,
        )


def server_options(settings: ServiceSettings) -> dict[str, Any]:
    """uvicorn's options (``uvicorn.run``, ``uvicorn.Config``) for the connection limits."""
    return {
        "http": guarded_protocol(settings),
        "timeout_keep_alive": max(1, round(settings.keep_alive_s)),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "backlog": backlog(settings),
    }


def run_server(
    app: Any, settings: ServiceSettings, host: str, port: int, log_level: str = "info"
) -> None:
    """Serve ``app`` until interrupted, within the limits above."""
    install_log_filter()
    check_descriptor_limit(settings)
    limit_arenas()  # memory freed by one thread (rendering, parsing) reused by the others
    uvicorn.run(app, host=host, port=port, log_level=log_level, **server_options(settings))

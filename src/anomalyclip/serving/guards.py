"""What a request may take before a route sees it: time, sockets' share, bytes and parts.

A pure ASGI middleware, so it works the same under any server and in-process tests:

- at most ``max_concurrent_requests`` are handled at once; beyond, 503 with Retry-After.
  A request with a body counts only once its body is complete: bodies still arriving
  hold one of ``max_body_reads`` other slots (:class:`Admission`), so slow uploads cannot
  keep finished requests out; ``/healthz`` is under neither cap. One client (address)
  may fill a cap on its own, but not keep others out: a client holding less than half
  a cap is let in over it, up to one and a half times the cap, so sixty clients of one
  address that never read their answers (each holding its slot until the write
  timeout) leave room for everyone else;
- a declared Content-Length over the route's limit is 413 before a byte is read, and one
  that does not fit the bytes all requests may hold together (``max_inflight_bytes``) is
  503; a chunked body is counted against both as it arrives;
- the body of an upload is parsed *as it streams* only to count: part ``N + 1`` of a route
  that takes ``N`` files is refused there (413), as is a part over the per-file limit,
  without reading the rest;
- a body that stops arriving for ``body_timeout_s``, or is not complete after
  ``body_deadline_s``, or averages less than ``min_body_rate`` bytes a second once
  ``body_rate_grace_s`` is over, is answered 408 and the connection closed.

A refusal made with the body unread (413, 503) lets the server read and drop the rest,
so that an ordinary client, still sending, gets the answer rather than a reset socket;
:class:`~anomalyclip.serving.connections.GuardedH11Protocol` bounds that drain by the
header timeout. A body that is too slow is answered with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.serving.uploads import display_name

logger = logging.getLogger(__name__)

SMALL_BODY_LIMIT = 64 * 1024  # any other request: nothing the service reads is larger
CLOSE = {"Connection": "close"}
RETRY = {"Retry-After": "1"}
UNGUARDED_PATHS = frozenset({"/healthz"})  # answers at once, reads nothing: never queued


def has_body(scope: Scope) -> bool:
    """Whether the request declares a body (a non-zero Content-Length, or chunked)."""
    headers = Headers(scope=scope)
    if "transfer-encoding" in headers:
        return True
    return headers.get("content-length", "0").strip() not in ("", "0")


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


@dataclass(frozen=True)
class UploadRoute:
    """The most a route's body may hold: bytes in all, and files (parts)."""

    max_bytes: int
    max_parts: int


class ByteBudget:
    """Upload bytes held by all requests together, from arrival to response.

    A request holding nothing is let in whatever its size when nobody else holds any, so
    a single request within its route's limit is always served.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def take(self, size: int, already: int = 0) -> bool:
        with self._lock:
            if self.in_use - already > 0 and self.in_use + size > self.limit:
                return False
            self.in_use += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.in_use -= size


class TooManyParts(Exception):
    """Raised from the streaming parser's callbacks: the body breaks a part limit."""


class PartCounter:
    """Counts a multipart body's parts and their sizes as it streams, holding nothing.

    Multipart delimits parts by a boundary that cannot occur inside them, so counting is
    exact; a body that is not valid multipart is left for the form parser to refuse.
    """

    def __init__(self, boundary: bytes, route: UploadRoute, max_file_bytes: int) -> None:
        self.route = route
        self.max_file_bytes = max_file_bytes
        self.parts = 0
        self.part_bytes = 0
        self.header_name = b""
        self.header_value = b""
        self.filename = "upload"
        self.broken = False
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self.on_part_begin,
                "on_part_data": self.on_part_data,
                "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value,
                "on_header_end": self.on_header_end,
            },
        )

    def on_part_begin(self) -> None:
        self.parts += 1
        self.part_bytes = 0
        self.filename = "upload"
        if self.parts > self.route.max_parts:
            raise TooManyParts(
                f"{self.parts} or more files in one request; the limit is "
                f"{self.route.max_parts} (refused at part {self.parts} without reading the rest)"
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.part_bytes += end - start
        if self.part_bytes > self.max_file_bytes:
            raise TooManyParts(
                f"{self.filename} is larger than the upload limit of {self.max_file_bytes:,} bytes"
            )

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            _, options = parse_options_header(self.header_value)
            name = options.get(b"filename")
            if name is not None:
                self.filename = display_name(name.decode("utf-8", "replace"))
        self.header_name = self.header_value = b""

    def feed(self, chunk: bytes) -> None:
        if self.broken:
            return
        try:
            self.parser.write(chunk)
        except FormParserError:
            self.broken = True  # not multipart after all: the form parser says so


def boundary_of(content_type: str) -> bytes | None:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    return boundary or None


class Admission:
    """One request's slot: among the bodies arriving, then among the requests in progress.

    A request without a body takes a request slot at once; one with a body takes a body
    slot, and trades it for a request slot when its body is complete
    (:meth:`body_complete`), so a slot in ``max_concurrent_requests`` is never held by a
    client that is still sending.
    """

    def __init__(self, guard: RequestGuard, client: str = "") -> None:
        self.guard = guard
        self.client = client
        self.reading = False
        self.active = False

    def enter(self, with_body: bool) -> str | None:
        """Take the first slot; the reason for a 503 when there is none."""
        guard, settings = self.guard, self.guard.settings
        if with_body:
            if not guard.reading.room(self.client, settings.max_body_reads):
                arriving = guard.reading.total
                return f"the service is busy ({arriving} uploads arriving); retry shortly"
            guard.reading.take(self.client)
            self.reading = True
            return None
        return self.activate()

    def activate(self) -> str | None:
        guard = self.guard
        if not guard.active.room(self.client, guard.settings.max_concurrent_requests):
            detail = f"the service is busy ({guard.active.total} requests in progress)"
            return f"{detail}; retry shortly"
        guard.active.take(self.client)
        self.active = True
        return None

    def body_complete(self) -> None:
        """The body is in: from a body slot to a request slot (503 when none is free)."""
        if not self.reading:
            return
        self.guard.reading.give_back(self.client)
        self.reading = False
        refusal = self.activate()
        if refusal is not None:
            raise HTTPException(503, refusal, headers=RETRY)

    def leave(self) -> None:
        if self.reading:
            self.guard.reading.give_back(self.client)
        if self.active:
            self.guard.active.give_back(self.client)
        self.reading = self.active = False


class SharedSlots:
    """Slots counted in all and per client, for a cap that one client cannot hold
    against the others: a client below half the cap is let in over it, up to one and a
    half times the cap (see the module's docstring); alone, a client still has the whole
    cap."""

    def __init__(self) -> None:
        self.total = 0
        self.by_client: Counter[str] = Counter()

    def room(self, client: str, cap: int) -> bool:
        share = max(1, cap // 2)
        if self.total < cap:
            return True
        return self.by_client[client] < share and self.total < cap + share

    def take(self, client: str) -> None:
        self.total += 1
        self.by_client[client] += 1

    def give_back(self, client: str) -> None:
        self.total -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]


class RequestGuard:
    """The limits above, around the whole application (see the module's docstring)."""

    def __init__(
        self, app: ASGIApp, settings: ServiceSettings, routes: dict[str, UploadRoute]
    ) -> None:
        self.app = app
        self.settings = settings
        self.routes = routes
        self.budget = ByteBudget(settings.max_inflight_bytes)
        self.active = SharedSlots()  # requests in progress (their bodies complete)
        self.reading = SharedSlots()  # requests whose bodies are still arriving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        admission = Admission(self, client[0] if client else "")
        refusal = admission.enter(has_body(scope))
        if refusal is not None:
            await error_response(503, refusal, RETRY)(scope, receive, send)
            return
        try:
            await self.guarded(scope, receive, send, admission)
        finally:
            admission.leave()

    async def guarded(
        self, scope: Scope, receive: Receive, send: Send, admission: Admission | None = None
    ) -> None:
        route = self.routes.get(scope["path"])
        if route is not None and scope["method"] != "POST":
            await self.app(scope, receive, send)  # 405 from the router, the body unread
            return
        headers = Headers(scope=scope)
        limit = route.max_bytes if route is not None else SMALL_BODY_LIMIT
        declared_text = headers.get("content-length")
        declared = 0
        if declared_text is not None:
            if not declared_text.isdigit():
                await error_response(400, "invalid Content-Length header", CLOSE)(
                    scope, receive, send
                )
                return
            declared = int(declared_text)
            if declared > limit:
                detail = f"request body of {declared:,} bytes exceeds the limit of {limit:,}"
                await error_response(413, detail)(scope, receive, send)
                return
        counter = None
        if route is not None:
            content_type = headers.get("content-type", "")
            if not content_type.lower().startswith("multipart/form-data"):
                got = content_type or "no content type"
                detail = f"send images as multipart/form-data (got {got})"
                await error_response(415, detail)(scope, receive, send)
                return
            boundary = boundary_of(content_type)
            if boundary is None:
                detail = "multipart/form-data without a boundary parameter"
                await error_response(400, detail)(scope, receive, send)
                return
            counter = PartCounter(boundary, route, self.settings.max_upload_bytes)
        if not self.budget.take(declared):
            await error_response(503, self.busy_detail(), RETRY)(scope, receive, send)
            return
        body = BodyReader(self, receive, limit, declared, counter, admission)
        try:
            await self.app(scope, body.receive, send)
        finally:
            self.budget.give_back(body.held)

    def busy_detail(self) -> str:
        return (
            f"the service holds {self.budget.in_use:,} bytes of uploads, near its limit of "
            f"{self.settings.max_inflight_bytes:,}; retry shortly"
        )


class BodyReader:
    """One request's ``receive``: timed, counted against the limits, parts counted."""

    def __init__(
        self,
        guard: RequestGuard,
        receive: Receive,
        limit: int,
        declared: int,
        counter: PartCounter | None,
        admission: Admission | None = None,
    ) -> None:
        self.guard = guard
        self.upstream = receive
        self.limit = limit
        self.held = declared  # budget taken: the declared length, or what has arrived
        self.received = 0
        self.counter = counter
        self.complete = False
        self.admission = admission
        self.started = time.monotonic()
        self.deadline = self.started + guard.settings.body_deadline_s

    def rate_due(self) -> float:
        """When the body falls below the minimum rate unless more arrives (inf: no minimum)."""
        settings = self.guard.settings
        if settings.min_body_rate <= 0:
            return float("inf")
        needed_s = max(settings.body_rate_grace_s, self.received / settings.min_body_rate)
        return self.started + needed_s

    def too_slow(self) -> HTTPException:
        settings = self.guard.settings
        elapsed = time.monotonic() - self.started
        logger.info("request body too slow: %d bytes in %.1f s", self.received, elapsed)
        return HTTPException(
            408,
            f"the request body arrived too slowly ({self.received:,} bytes in {elapsed:.1f} s; "
            f"the service needs {settings.min_body_rate:g} bytes/s on average after "
            f"{settings.body_rate_grace_s:g} s)",
            headers=CLOSE,
        )

    async def receive(self) -> Message:
        if self.complete:  # after the body only a disconnect can come: not timed
            return await self.upstream()
        settings = self.guard.settings
        now = time.monotonic()
        rate_due = self.rate_due()
        wait = min(settings.body_timeout_s, self.deadline - now, rate_due - now)
        try:
            message = await asyncio.wait_for(self.upstream(), max(wait, 0.0))
        except asyncio.TimeoutError:
            if time.monotonic() >= rate_due and time.monotonic() < self.deadline:
                raise self.too_slow() from None
            logger.info("request body not received in time after %d bytes", self.received)
            raise HTTPException(
                408,
                f"the request body did not arrive in time ({self.received:,} bytes in; the "
                f"service waits {settings.body_timeout_s:g} s for each piece and "
                f"{settings.body_deadline_s:g} s for all)",
                headers=CLOSE,
            ) from None
        if message["type"] != "http.request":
            self.complete = True
            return message
        chunk = message.get("body", b"")
        self.received += len(chunk)
        self.complete = not message.get("more_body", False)
        if self.received > self.limit:
            raise HTTPException(413, f"request body exceeds the limit of {self.limit:,} bytes")
        if not self.complete and time.monotonic() > self.rate_due():
            raise self.too_slow()
        if self.received > self.held:
            extra = self.received - self.held
            if not self.guard.budget.take(extra, already=self.held):
                raise HTTPException(503, self.guard.busy_detail(), headers=RETRY)
            self.held += extra
        if self.counter is not None:
            try:
                self.counter.feed(chunk)
            except TooManyParts as error:
                raise HTTPException(413, str(error)) from None
        if self.complete and self.admission is not None:
            self.admission.body_complete()
        return message

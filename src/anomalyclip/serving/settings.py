"""The limits and thresholds of one service instance, shared by every serving module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and thresholds of one service instance.

    ``image_threshold`` / ``pixel_threshold`` are *given* thresholds: they take precedence
    over the model's calibrated ones (:meth:`PostProcessor.with_given
    <anomalyclip.postprocess.PostProcessor.with_given>`), and a request's own query
    thresholds over both. Left as None with nothing calibrated, there is no threshold: no
    verdict and no mask, rather than one guessed from the map's range.

    The connection limits keep a slow or hostile client from holding the service: each
    open socket is a file descriptor, so ``max_connections`` stays well under the usual
    ``ulimit -n 1024``; a client gets ``header_timeout_s`` to send its request line and
    headers, and ``body_timeout_s`` between two pieces of its body (``body_deadline_s``
    for all of it). ``max_inflight_bytes`` bounds the upload bytes held by all requests
    together, from the first byte read to the response (a single request is always let
    in when no other holds any).

    A body must also keep up a rate: after ``body_rate_grace_s`` it must average at least
    ``min_body_rate`` bytes a second (else 408 and close, as Apache's ``mod_reqtimeout``
    ``MinRate`` does), so that a trickle of a byte every few seconds cannot hold a slot
    until the deadline. A request counts against ``max_concurrent_requests`` only once
    its body is complete; bodies still arriving have their own cap, ``max_body_reads``,
    so slow uploads can never keep finished requests waiting. ``/healthz`` is under
    neither cap. A response the client does not read is given ``write_timeout_s`` to make
    progress, and at most ``max_write_buffer_bytes`` are held for one connection; beyond
    either, the connection is dropped and its buffered output freed.
    """

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch_size: int = 16
    max_set_size: int = 64
    max_set_pixels: int = 200_000_000
    request_timeout_s: float = 60.0
    max_pending: int = 32
    max_pending_bytes: int = 256 * 1024 * 1024
    max_inflight_bytes: int = 512 * 1024 * 1024
    max_group_images: int = 4  # scored in one call; a cancelled request stops between groups
    max_connections: int = 256
    max_concurrent_requests: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 15.0
    body_deadline_s: float = 120.0
    keep_alive_s: float = 5.0
    min_body_rate: float = 500.0  # bytes/s a body must average once its grace is over
    body_rate_grace_s: float = 10.0
    max_body_reads: int = 128  # bodies arriving at once (then 503)
    write_timeout_s: float = 30.0  # a response the client does not read: dropped
    max_write_buffer_bytes: int = 256 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    max_reference_sets: int = 4  # kept in memory, the least recently used dropped first
    map_max_side: int = 256
    overlay_max_side: int = 1024
    audit_log: str | None = None  # operators' marks on streams, as JSON Lines (else memory)

    def __post_init__(self) -> None:
        positive = (
            "max_upload_bytes",
            "max_pixels",
            "max_batch_size",
            "max_set_size",
            "max_set_pixels",
            "max_reference_sets",
            "max_pending",
            "max_pending_bytes",
            "max_inflight_bytes",
            "max_group_images",
            "max_connections",
            "max_concurrent_requests",
            "max_body_reads",
            "max_write_buffer_bytes",
            "max_header_bytes",
            "map_max_side",
            "overlay_max_side",
        )
        problems = [f"{name} must be positive" for name in positive if getattr(self, name) < 1]
        timeouts = (
            "request_timeout_s",
            "header_timeout_s",
            "body_timeout_s",
            "body_deadline_s",
            "keep_alive_s",
            "body_rate_grace_s",
            "write_timeout_s",
        )
        problems += [f"{name} must be positive" for name in timeouts if not getattr(self, name) > 0]
        if not self.min_body_rate >= 0:
            problems.append("min_body_rate must be zero (no minimum) or positive")
        if problems:
            raise ValueError("invalid service settings: " + "; ".join(problems))

"""``anomalyclip serve``: the HTTP service and its browser page."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from typing import TYPE_CHECKING

from anomalyclip.cli import options
from anomalyclip.cli.options import (
    add_calibration_argument,
    add_method_arguments,
    add_model_arguments,
    add_scoring_arguments,
)

if TYPE_CHECKING:
    from anomalyclip.predictor import Predictor
    from anomalyclip.serving import ServiceSettings

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP service and its browser page",
        description="Serve a scoring method over HTTP: a JSON API (/docs describes it) and "
        "an inspection page at /. The model is loaded once and shared by all requests.",
    )
    add_model_arguments(parser)
    add_method_arguments(parser)
    add_scoring_arguments(parser)
    add_calibration_argument(parser)
    from anomalyclip.methods import METHODS

    parser.add_argument(
        "--offer",
        nargs="+",
        default=[],
        choices=list(METHODS),
        metavar="METHOD",
        help="also offer these methods (with their default settings and the same "
        "--clip-weights); requests and the page choose with ?method=NAME",
    )
    parser.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="serve a model exported by `anomalyclip export` (ONNX Runtime, no torch model)",
    )
    service = parser.add_argument_group("service")
    service.add_argument("--host", default="127.0.0.1", help="address to listen on")
    service.add_argument("--port", type=int, default=8000)
    service.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest image file accepted (MB)"
    )
    service.add_argument(
        "--max-megapixels", type=float, default=40.0, help="largest image accepted (megapixels)"
    )
    service.add_argument("--max-batch", type=int, default=16, help="most files per batch request")
    service.add_argument(
        "--timeout", type=float, default=60.0, help="seconds before a request gives up (504)"
    )
    service.add_argument(
        "--max-pending", type=int, default=32, help="requests allowed to wait (then 503)"
    )
    _add_connection_arguments(parser)
    service.add_argument(
        "--max-group-images",
        type=int,
        default=4,
        help="images scored in one call; a request that times out or whose client leaves "
        "stops between groups",
    )
    service.add_argument(
        "--image-threshold",
        type=float,
        help="verdict threshold (default: the calibrated one; without either, no verdict)",
    )
    service.add_argument(
        "--pixel-threshold",
        type=float,
        help="mask threshold (default: the calibrated one; without either, no mask)",
    )
    service.add_argument(
        "--audit-log",
        metavar="FILE.jsonl",
        help="append operators' marks on streams (/v1/streams) here, one JSON line each "
        "(default: kept in memory only)",
    )
    service.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    parser.set_defaults(func=run)


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The bounds on what one client may hold: sockets, slots, bytes and time."""
    connections = parser.add_argument_group(
        "connections",
        "bounds on what slow or hostile clients can hold; the defaults fit `ulimit -n 1024`",
    )
    connections.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open sockets at once; a connection beyond is answered 503 and closed",
    )
    connections.add_argument(
        "--max-concurrent",
        type=int,
        default=64,
        help="requests handled at once (then 503)",
    )
    connections.add_argument(
        "--max-inflight-mb",
        type=float,
        default=512.0,
        help="upload bytes all requests may hold together (then 503; one request always fits)",
    )
    connections.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send its request headers (then 408, closed)",
    )
    connections.add_argument(
        "--body-timeout",
        type=float,
        default=15.0,
        help="seconds the body may stall between two pieces (then 408, closed)",
    )
    connections.add_argument(
        "--body-deadline",
        type=float,
        default=120.0,
        help="seconds the whole body may take (then 408, closed)",
    )
    connections.add_argument(
        "--min-body-rate",
        type=float,
        default=500.0,
        help="bytes/s a body must average after --body-rate-grace (then 408, closed; 0: none)",
    )
    connections.add_argument(
        "--body-rate-grace",
        type=float,
        default=10.0,
        help="seconds a body may take before --min-body-rate applies",
    )
    connections.add_argument(
        "--max-body-reads",
        type=int,
        default=128,
        help="request bodies arriving at once (then 503); a request counts against "
        "--max-concurrent only once its body is in",
    )
    connections.add_argument(
        "--write-timeout",
        type=float,
        default=30.0,
        help="seconds a response may wait for a client that reads nothing (then closed)",
    )
    connections.add_argument(
        "--keep-alive",
        type=float,
        default=5.0,
        help="seconds an idle kept-alive connection stays open",
    )


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    from anomalyclip.serving import ServiceSettings

    return ServiceSettings(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=int(args.max_megapixels * 1_000_000),
        max_batch_size=args.max_batch,
        request_timeout_s=args.timeout,
        max_pending=args.max_pending,
        max_inflight_bytes=int(args.max_inflight_mb * 1024 * 1024),
        max_group_images=args.max_group_images,
        max_connections=args.max_connections,
        max_concurrent_requests=args.max_concurrent,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        body_deadline_s=args.body_deadline,
        keep_alive_s=args.keep_alive,
        min_body_rate=args.min_body_rate,
        body_rate_grace_s=args.body_rate_grace,
        max_body_reads=args.max_body_reads,
        write_timeout_s=args.write_timeout,
        image_threshold=args.image_threshold,
        pixel_threshold=args.pixel_threshold,
        audit_log=getattr(args, "audit_log", None),
    )


def served_methods(args: argparse.Namespace) -> dict[str, Predictor]:
    """The main method (``--method``, ``--onnx``), then each of ``--offer``."""
    main = options.build_predictor(args)
    methods = {main.method: main}
    for name in args.offer:
        if name in methods:
            continue
        # the main method's own options (its checkpoint, say) are not the offered one's
        own = (
            {}
            if name == options.DEFAULT_METHOD
            else dict.fromkeys((*options.ANOMALYCLIP_ONLY, "checkpoint"))
        )
        changes = {"method": name, "reference": None, "tile_size": None, **own}
        offered = argparse.Namespace(**{**vars(args), **changes})
        methods[name] = options.build_method(offered)
    return methods


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        from anomalyclip.serving import create_app
        from anomalyclip.serving.connections import run_server
    except ImportError as error:
        raise RuntimeError(
            f"anomalyclip serve needs the 'serve' extra ({error}): pip install 'anomalyclip[serve]'"
        ) from None

    settings = settings_from_args(args)
    app = create_app(served_methods(args), settings)
    if not is_loopback(args.host):
        logger.warning(
            "listening on %s: the service has no authentication; put it behind a proxy "
            "that adds it before exposing it to a network",
            args.host,
        )
    logger.info("serving on http://%s:%d (API description at /docs)", args.host, args.port)
    run_server(app, settings, args.host, args.port, args.log_level)
    return 0

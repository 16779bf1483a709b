"""``anomalyclip download`` and ``anomalyclip info``: the cache for air-gapped machines."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    download = subparsers.add_parser(
        "download",
        help="fetch named backbones and checkpoints into the cache",
        description="Fetch, verify and cache named weights (default: what `predict` uses).",
    )
    download.add_argument("names", nargs="*", metavar="NAME")
    download.add_argument("--all", action="store_true", help="every registered file")
    download.set_defaults(func=run_download)
    info = subparsers.add_parser(
        "info", help="list registered weights, the cache and each file's checksum status"
    )
    info.set_defaults(func=run_info)


def run_download(args: argparse.Namespace) -> int:
    from anomalyclip import hub

    names = list(args.names)
    if args.all:
        names = list(hub.known_backbones()) + list(hub.known_checkpoints())
    names = names or [hub.DEFAULT_BACKBONE, hub.DEFAULT_CHECKPOINT]
    for name in names:
        path = hub.download(name)
        logger.info("%s: %s", name, path)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from anomalyclip import hub

    lines = [f"cache: {hub.cache_dir()}", f"user registry: {hub.user_registry_path()}", ""]
    lines.append("| name | kind | status | size | path |")
    lines.append("| --- | --- | --- | --- | --- |")
    for entry in hub.list_cached():
        size = f"{entry.size / 1e6:.1f} MB" if entry.size is not None else "-"
        lines.append(f"| {entry.name} | {entry.kind} | {entry.status} | {size} | {entry.path} |")
    lines.append("")
    for name, checkpoint in hub.known_checkpoints().items():
        lines.append(f"{name}: backbone {checkpoint.backbone}; {checkpoint.trained_on}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0

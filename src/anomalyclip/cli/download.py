"""``anomalyclip download`` and ``anomalyclip info``: fill the cache, and see what it holds.

``download`` on a machine that is online, then copying the cache folder, is how an
air-gapped machine gets the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from anomalyclip import hub

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    download = subparsers.add_parser(
        "download",
        help="fetch named backbones and checkpoints into the cache",
        description="Fetch, verify and cache registered weights. With no names: what "
        "`predict` uses by default (the ViT-L/14@336px backbone and the `mvtec` prompts).",
    )
    download.add_argument(
        "names", nargs="*", metavar="NAME", help="registered names, e.g. ViT-L/14@336px mvtec"
    )
    download.add_argument(
        "--all", action="store_true", help="every registered backbone and checkpoint"
    )
    download.add_argument("--no-progress", action="store_true", help="no progress bars")
    download.set_defaults(func=run_download)
    info = subparsers.add_parser(
        "info",
        help="list registered weights, the cache and each file's checksum status",
        description="List every registered name, where its file is (or would be) cached and "
        "whether that copy matches its checksum (ok, mismatch, partial, missing). Files that "
        "could run code (TorchScript, pickles of other objects) are hashed every time; "
        "data-only files are taken as verified when unchanged since their last check.",
    )
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument(
        "--verify",
        action="store_true",
        help="hash every cached file again, whatever its .verified marker says; exit 1 on "
        "a mismatch",
    )
    info.set_defaults(func=run_info)


def run_download(args: argparse.Namespace) -> int:
    if args.all and args.names:
        raise ValueError("give names or --all, not both")
    if args.all:
        names = list(hub.known_backbones())
        names += [n for n, c in hub.known_checkpoints().items() if c.file is not None]
    else:
        names = args.names or [hub.DEFAULT_BACKBONE, hub.DEFAULT_CHECKPOINT]
    unknown = [n for n in names if not (hub.lookup_checkpoint(n) or hub.lookup_backbone(n))]
    if unknown:
        raise ValueError(
            f"unknown name(s) {', '.join(map(repr, unknown))}; backbones: "
            f"{', '.join(hub.known_backbones())}; checkpoints: "
            f"{', '.join(hub.known_checkpoints())}"
        )
    failed = []
    for name in names:
        try:
            path = hub.download(name, progress=not args.no_progress)
        except (hub.DownloadError, hub.OfflineError, FileNotFoundError) as error:
            logger.error("%s", error)  # the message names the file
            failed.append(name)
            continue
        sys.stdout.write(f"{name}\t{path}\n")
        _hint_backbone(name)
    if failed:
        logger.error("not downloaded: %s", ", ".join(failed))
        return 2
    return 0


def _hint_backbone(name: str) -> None:
    """A checkpoint is no use without its backbone: say so when that is not cached."""
    checkpoint = hub.lookup_checkpoint(name)
    backbone = hub.lookup_backbone(checkpoint.backbone) if checkpoint is not None else None
    if backbone is not None and not hub.is_verified(backbone, backbone.cache_path()):
        logger.info(
            "%s needs the backbone %s, which is not cached: anomalyclip download %s",
            name,
            backbone.name,
            backbone.name,
        )


def run_info(args: argparse.Namespace) -> int:
    entries = hub.list_cached(verify=args.verify)
    mismatched = [e.name for e in entries if e.status == "mismatch"]
    if args.verify and mismatched:
        logger.error("cached files that do not match their checksums: %s", ", ".join(mismatched))
    code = 1 if args.verify and mismatched else 0
    checkpoints = hub.known_checkpoints()
    registry = hub.user_registry_path()
    if args.json:
        data = {
            "cache": str(hub.cache_dir()),
            "registry": str(registry),
            "offline": hub.offline(),
            "verified_by_hashing": args.verify,
            "files": [
                {
                    "name": e.name,
                    "kind": e.kind,
                    "status": e.status,
                    "size": e.size,
                    "path": str(e.path),
                    "checksum": e.checksum,
                    "url": e.url,
                }
                for e in entries
            ],
            "checkpoints": {
                name: {
                    "backbone": c.backbone,
                    "trained_on": c.trained_on,
                    "config": c.config,
                    "note": c.note,
                }
                for name, c in checkpoints.items()
            },
        }
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return code
    lines = [
        f"cache: {hub.cache_dir()} (ANOMALYCLIP_CACHE)",
        f"registry file: {registry} ({'present' if registry.is_file() else 'none'};"
        " ANOMALYCLIP_REGISTRY)",
        f"network: {'off (ANOMALYCLIP_OFFLINE)' if hub.offline() else 'allowed'}",
        "",
        "| name | kind | status | size | path |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in entries:
        size = f"{entry.size / 1e6:.1f} MB" if entry.size is not None else "-"
        lines.append(f"| {entry.name} | {entry.kind} | {entry.status} | {size} | {entry.path} |")
    if not args.verify:
        lines.append(
            "ok: matches its checksum; data-only files as checked when they last changed "
            "(--verify hashes every file again)"
        )
    lines.append("")
    for name, checkpoint in checkpoints.items():
        settings = ", ".join(f"{k}={v}" for k, v in checkpoint.config.items() if k != "backbone")
        trained = f"trained on {checkpoint.trained_on}; " if checkpoint.trained_on else ""
        lines.append(f"{name}: {trained}backbone {checkpoint.backbone}; {settings}")
    sys.stdout.write("\n".join(lines) + "\n")
    return code

"""``anomalyclip bank add|remove|info BANK [IMAGES...]``: a bank of known-good images kept
by hand, every version kept by content id, every change in ``BANK.audit.jsonl``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bank",
        help="add images to a bank of known-good images, remove them, or show it",
        description="A bank file (JSON) lists known-good images by SHA-256 and path; each "
        "change makes a new version named by the images' content (the earlier ones are "
        "kept, `--restore ID` goes back) and appends a line to BANK.audit.jsonl. Use it "
        "with --reference in predict, watch and serve by listing its images.",
    )
    parser.add_argument("action", choices=("add", "remove", "info"))
    parser.add_argument("bank", metavar="BANK", help="the bank file (made by the first add)")
    parser.add_argument("images", nargs="*", metavar="IMAGES", help="files, folders or globs")
    parser.add_argument(
        "--restore", metavar="ID", help="with info: make bank version ID the current one"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anomalyclip.inputs import gather_images
    from anomalyclip.inspection.bank import AuditLog, load_bank_file, members_for, save_bank_file

    path = Path(args.bank)
    bank = load_bank_file(path)
    audit = AuditLog(path.with_name(f"{path.stem}.audit.jsonl"))
    thresholds: dict[str, float | None] = {"image": None, "pixel": None}
    if args.action != "info" and not args.images:
        raise ValueError(f"bank {args.action}: name the images to {args.action}")
    changes: list[tuple[str, str, Callable[[], str]]] = []
    if args.action == "add":
        for member in members_for(gather_images(args.images)):
            changes.append((member.sha256, "normal", partial(bank.add, member)))
    elif args.action == "remove":
        for member in members_for(gather_images(args.images)):
            changes.append((member.sha256, "removed", partial(bank.remove, member.sha256)))
    elif args.restore:
        changes.append(("", "undo", partial(bank.restore, args.restore)))
    for sha256, verdict, change in changes:
        before = bank.id
        after = change()
        audit.append(
            sha256=sha256,
            verdict=verdict,
            bank_before=before,
            bank_after=after,
            thresholds_before=thresholds,
            thresholds_after=thresholds,
        )
    if changes:
        save_bank_file(bank, path)
        logger.info("bank %s: version %s, %d images", path, bank.id, bank.size)
    sys.stdout.write(json.dumps(bank.describe(), indent=2) + "\n")
    return 0

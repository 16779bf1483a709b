"""``anomalyclip`` command line: each sub-command lives in its own module of this package.

A module here that defines ``register(subparsers)`` adds its command; the parser it adds
sets ``func`` to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import pkgutil
import sys
from typing import NoReturn

logger = logging.getLogger("anomalyclip")


class SuggestingParser(argparse.ArgumentParser):
    """A parser whose "unrecognized arguments" error suggests the closest known option
    (``--tile-szie``: did you mean ``--tile-size``?). Python 3.14's ``suggest_on_error``
    does this for choices only, and only there."""

    def error(self, message: str) -> NoReturn:
        hints = [
            f"{word}: did you mean {', '.join(close)}?"
            for word in _unrecognized(message)
            if (close := difflib.get_close_matches(word, self._all_options(), n=2, cutoff=0.75))
        ]
        super().error("; ".join([message, *hints]))

    def _all_options(self) -> list[str]:
        """This parser's option strings and those of its sub-commands' parsers (the root
        reports a sub-command's unknown flags)."""
        names = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for parser in action.choices.values():
                    names.extend(parser._option_string_actions)
        return sorted(set(names))


def _unrecognized(message: str) -> list[str]:
    """The flags an "unrecognized arguments: ..." message names."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return []
    return [word.split("=")[0] for word in message[len(prefix) :].split() if word.startswith("-")]


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="anomalyclip",
        description="Zero-shot anomaly detection and segmentation with AnomalyCLIP.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback when a command fails"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from anomalyclip.decoding import decoding

    megapixels = getattr(args, "max_megapixels", None)
    try:
        max_pixels = None if megapixels is None else int(megapixels * 1_000_000)
        with decoding(
            getattr(args, "bit_depth", None),
            max_pixels,
            getattr(args, "max_side", None),
            getattr(args, "max_aspect", None),
        ):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        if args.debug:
            logger.exception("failed")
        else:
            logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())

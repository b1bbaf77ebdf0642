"""Command line: `python -m mosaic_core {plan,sample,prune,bench,train} ...`.

Each command lives in `mosaic_core/commands/<name>.py`. Bad input (a `ValueError` raised at
the engine's edge) is printed as one line `error: ...` and exits with status 2, with no
traceback; a missing file exits with status 1 the same way.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("plan", "sample", "prune", "bench", "train", "eval")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.split()[1] if " " in self.prog else ""
        hint = f"python -m mosaic_core {command} --help".replace("  ", " ")
        print(f"error: {message} (see `{hint}`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per available command."""
    parser = _Parser(prog="mosaic_core", description="MosaicDiff: divide, prune, conquer.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"mosaic_core.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"mosaic_core.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the command, and turn user errors into one clear line."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

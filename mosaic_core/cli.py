"""Command line: `python -m mosaic_core {plan,sample,prune,bench,train} ...`.

Each command lives in `mosaic_core/commands/<name>.py`. Bad input (a `ValueError` raised at
the engine's edge) is printed as one line `error: ...` and exits with status 2, with no
traceback; a missing file or another operating-system error (disk full, permission)
exits with status 1 the same way. Every size-bearing option is parsed with a bounded type
(`int_in`, `float_in`, `text_of`, backed by `mosaic_core.limits`), so a huge value is
refused while parsing, before anything of its size exists.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from mosaic_core import limits

COMMANDS = ("plan", "sample", "prune", "bench", "train", "eval", "tune")


def one_line(message: object) -> str:
    """An error message as one printable line: control characters (a value's CR, LF, ESC …) escaped."""
    text = str(message)
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.split()[1] if " " in self.prog else ""
        if len(message) > 500:  # argparse repeats the offending value: never echo a huge one
            message = message[:500] + "…"
        hint = f"python -m mosaic_core {command} --help".replace("  ", " ")
        print(f"error: {one_line(message)} (see `{hint}`)", file=sys.stderr)
        sys.exit(2)


def int_in(option: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse `type=` for a whole number in [low, high], checked while parsing (limits.parse_int)."""

    def parse(text: str) -> int:
        try:
            return limits.parse_int(option, text, low, high)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = "whole number"
    return parse


def float_in(option: str, low: float, high: float) -> Callable[[str], float]:
    """An argparse `type=` for a finite number in [low, high] (limits.parse_float)."""

    def parse(text: str) -> float:
        try:
            return limits.parse_float(option, text, low, high)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = "number"
    return parse


def text_of(option: str, max_length: int) -> Callable[[str], str]:
    """An argparse `type=` for a string of at most `max_length` characters (limits.check_text)."""

    def parse(text: str) -> str:
        try:
            return limits.check_text(option, text, max_length)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = "text"
    return parse


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
    succeeded = False
    try:
        from mosaic_core.allocator import steady_allocator

        steady_allocator()  # freed activations stay in the heap (mosaic_core/allocator.py)
        code = int(args.func(args) or 0)
        succeeded = True
        return code
    except ValueError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a missing file, a full disk, a folder we may not write
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        distributed = sys.modules.get("mosaic_core.distributed")  # never imported: no group joined
        if distributed is not None:
            distributed.finish_processes(succeeded)  # a launched run leaves its group together

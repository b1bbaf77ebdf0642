"""Regenerate the README's results table from a bench.md (the command that made it goes with it).

    python benchmarks/readme_table.py assets/bench/bench-0.3/bench.md
    python benchmarks/readme_table.py assets/bench/bench-0.3-timing/bench.md --command "python -m mosaic_core bench ..."

The README holds the table between `<!-- results-table: PATH -->` and `<!-- /results-table -->`;
everything between the markers is replaced by the bench.md's header line, the command and
its table. The command comes from the bench.md (`command: ...`, written by `bench` since it
records its own command line) or from `--command` for older files. Writes README.md in place.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def results_block(bench_md: str, source: str, command: str | None = None) -> str:
    """The README block of one bench.md: source marker, header line, command, table, end marker."""
    lines = bench_md.strip().splitlines()
    recorded = next((line for line in lines if line.startswith("command: `")), None)
    if recorded is not None:
        command = recorded[len("command: `"):].rstrip("`")
    if not command:
        raise ValueError(f"{source} records no command line: pass --command with the command that made it")
    table = [line for line in lines if line.startswith("|")]
    if not table:
        raise ValueError(f"{source} has no markdown table")
    notes = [line for line in lines if line and not line.startswith("|") and not line.startswith("command: `")]
    body = [f"<!-- results-table: {source} -->", f"Made by `{command}` ({source}):", "", notes[0], "", *table]
    body += ["", *notes[1:]] if len(notes) > 1 else []
    return "\n".join(body + ["<!-- /results-table -->"])


def replace_block(readme: str, block: str) -> str:
    """README text with its results block replaced (ValueError when the markers are missing)."""
    pattern = re.compile(r"<!-- results-table: .*? -->.*?<!-- /results-table -->", re.S)
    if not pattern.search(readme):
        raise ValueError("README.md has no <!-- results-table: ... --> ... <!-- /results-table --> block")
    return pattern.sub(lambda _: block, readme, count=1)


def main(argv: list[str] | None = None) -> int:
    """Read the bench.md, splice its table into README.md, write README.md atomically."""
    from mosaic_core.atomic import write_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_md", help="a bench.md written by `python -m mosaic_core bench`")
    parser.add_argument("--command", default=None, help="the command that made it (when the file does not record it)")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args(argv)
    source = Path(args.bench_md)
    shown = source.resolve().relative_to(ROOT) if source.resolve().is_relative_to(ROOT) else source
    readme = Path(args.readme)
    text = replace_block(readme.read_text(), results_block(source.read_text(), str(shown), args.command))
    write_bytes(readme, text.encode())
    print(f"updated {readme} from {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

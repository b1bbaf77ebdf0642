"""The engine (`mosaic_core`) never imports gradio: neither at import time nor in its source."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IMPORT_ALL = """
import importlib, pkgutil, sys
import mosaic_core
for module in pkgutil.walk_packages(mosaic_core.__path__, "mosaic_core."):
    if module.name != "mosaic_core.__main__":  # running it would parse sys.argv and exit
        importlib.import_module(module.name)
assert "gradio" not in sys.modules, "gradio was imported by the engine"
print("ok")
"""


def test_importing_every_engine_module_leaves_gradio_out():
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_no_gradio_import_in_the_engine_source():
    pattern = re.compile(r"^\s*(import\s+gradio|from\s+gradio[\s.]|.*import_module\(\s*['\"]gradio)", re.MULTILINE)
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "mosaic_core").rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []

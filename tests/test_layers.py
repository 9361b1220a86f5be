"""The layer contracts of ``pyproject.toml`` (import-linter) and ruff's checks: layers only look down, leaf
utilities import no layer, the core and the study layer import nothing of Ray or MLflow, and no
package's modules import each other in a cycle."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "4 kept" in done.stdout, done.stdout[-2000:]


def test_ruff_finds_nothing():
    """pyflakes and import order (``[tool.ruff]`` in pyproject.toml) over the whole repository."""
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

"""Study-file variants for the benchmarks: a shipped study with some fields replaced, written
as a new YAML file (what a user would write by hand), and the helpers that run and read them."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "studies" / "quickstart.yaml"


def write_variant(base: Path, folder: Path, name: str, **changes: Any) -> Path:
    """``base`` with the top-level ``changes`` (``name`` and ``output_dir`` = ``folder`` set too),
    written to ``folder/<name>.yaml``; returns that path."""
    data = yaml.safe_load(Path(base).read_text())
    data.update(changes, name=name, output_dir=str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_search(study_file: Path, *extra: str) -> float:
    """``python search.py run STUDY_FILE`` in a fresh process; returns its wall time (s), Ray
    start-up and shutdown included. Raises SystemExit with the output's tail on failure."""
    began = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "search.py"), "run", str(study_file), *extra],
                            cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{study_file}: search.py run failed (rc {result.returncode}):\n"
                         f"{(result.stdout + result.stderr)[-3000:]}")
    return elapsed


def load_line() -> str:
    """The machine's 1/5/15-minute load averages and core count, for the record."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"

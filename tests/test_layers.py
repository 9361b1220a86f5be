"""The layer contracts of ``pyproject.toml`` (import-linter) and ruff's checks: layers only look down, leaf
utilities import no layer, the core and the study layer import nothing of Ray or MLflow, the method
specs import no torch, and no package's modules import each other in a cycle; and the study driver
imports neither torch nor timm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "5 kept" in done.stdout, done.stdout[-2000:]


def test_ruff_finds_nothing():
    """pyflakes and import order (``[tool.ruff]`` in pyproject.toml) over the whole repository."""
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


#: what the study driver (``python search.py run``) imports: the command line, the run, loading a
#: study and the MLflow tracker of a tracked study; and the test objective, which the driver imports
#: for ``--objective`` (benchmarks/driver_scaling.py measures the driver with it)
DRIVER_MODULES = ("search", "p3b_search.launch", "p3b_search.study.loading", "p3b_search.tracking.study_tracking",
                  "tests.search_objective")


def test_the_study_driver_imports_neither_torch_nor_timm():
    """The driver runs for the whole study: importing its modules and loading (so checking) every
    shipped study file leaves torch and timm unimported (they cost it about 1.1 GiB)."""
    code = (f"import sys, pathlib\nimport {', '.join(DRIVER_MODULES)}\n"
            "from p3b_search.study.loading import load_study\n"
            "studies = [load_study(p) for p in sorted(pathlib.Path('studies').glob('*.yaml'))]\n"
            "assert len(studies) > 5, len(studies)\n"
            "print(' '.join(sorted(m for m in ('torch', 'timm') if m in sys.modules)) or 'neither')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["neither"], done.stdout


@pytest.mark.slow
def test_a_study_run_leaves_the_driver_without_torch_and_timm(tmp_path):
    """A whole (one-trial, tracked) study through the command line's run: what needs torch and timm
    before it (model name, weights, GPUs, the dense cost) runs in a child process, the trials in Ray
    workers, and Ray Tune adds no TensorBoard logger (tensorboardX imports torch). The driver
    still gets the dense cost that :func:`dense_cost` counts."""
    from p3b_search.study.dense import dense_cost
    from p3b_search.study.loading import load_study, with_overrides

    code = ("import json, sys\nfrom p3b_search.launch import run_study\n"
            "from p3b_search.study.loading import load_study, with_overrides\n"
            f"study = with_overrides(load_study('studies/quickstart.yaml'), n_trials=1, output_dir={str(tmp_path)!r})\n"
            "outcome = run_study(study, num_cpus=2, printer=lambda line: None)\n"
            "print(json.dumps({'finished': not outcome.interrupted, 'macs': outcome.dense.get('macs'),\n"
            "                  'imported': [m for m in ('torch', 'timm') if m in sys.modules]}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    study = with_overrides(load_study(ROOT / "studies" / "quickstart.yaml"), output_dir=str(tmp_path))
    assert json.loads(done.stdout.splitlines()[-1]) == {"finished": True, "macs": dense_cost(study)["macs"],
                                                        "imported": []}

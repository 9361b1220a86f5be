"""search.py: help a newcomer understands, one-line errors, status/pareto of a study folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

import search
from p3b_search.study.loading import load_study
from p3b_search.study.results import trials_frame, write_trials

ROOT = Path(__file__).parent.parent


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, str(ROOT / "search.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("run", "resume", "status", "pareto", "compare", "ui", "export", "bench"):
        assert f"    {command}" in result.stdout
    assert "python search.py run studies/quickstart.yaml" in result.stdout


def test_run_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        search.main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--address", "--trials", "--name", "--output-dir", "--cpus"):
        assert option in text


def test_bad_study_file_is_one_line_and_exit_status_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: s\nn_trial: 3\n")
    assert search.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: n_trial: unknown key: did you mean n_trials?")
    assert "\n" not in err


def test_unknown_study_name(tmp_path, capsys):
    assert search.main(["status", "nope", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: study 'nope': no study folder {tmp_path / 'nope'}: pass the folder printed by `search.py run`, "
        "the study file, or set --output-dir to where the study ran")


@pytest.fixture
def study_folder(tmp_path):
    """A study folder as a run leaves it: study.yaml, optuna.db and trials.parquet."""
    path = tmp_path / "study.yaml"
    path.write_text(f"name: cli\noutput_dir: {tmp_path / 'runs'}\nmethod: {{name: p3b}}\n"
                    "objectives: [top1, {name: macs, reference: 4.0e+6}]\n"
                    "search_space:\n  method_config.prune_ratio: {type: float, low: 0.3, high: 0.8}\n")
    study = load_study(path)
    study.layout.root.mkdir(parents=True)
    study.layout.study_file.write_text(path.read_text())
    records = optuna.create_study(directions=study.directions)
    distribution = {"method_config.prune_ratio": optuna.distributions.FloatDistribution(0.3, 0.8)}
    for ratio, values in ((0.5, [90.0, 2e6]), (0.7, [85.0, 1e6]), (0.3, [80.0, 3e6])):
        records.enqueue_trial({"method_config.prune_ratio": ratio})
        records.tell(records.ask(distribution), values)
    write_trials(trials_frame(records.get_trials(), study.metric_names, study.directions, [0.0, 4e6],
                              default_method="p3b"),
                 study.layout)
    return study.layout.root


def test_status_shows_trials_and_front(study_folder, capsys):
    assert search.main(["status", str(study_folder)]) == 0
    out = capsys.readouterr().out
    assert "study cli in" in out and "3 complete, 0 running, 0 pruned, 0 fail" in out
    assert "Pareto front of cli (2 of 3 finished trials; top1 (maximize) / macs (minimize))" in out
    assert "hypervolume 2.65e+08 (reference point: top1=0, macs=4e+06)" in out
    assert "driver:" not in out  # the last driver ended: no record


def test_status_names_a_running_driver(study_folder, capsys):
    from p3b_search.search.driver_record import DriverRecord

    DriverRecord(study_folder / "driver.json").write(with_ray_session=False)  # this process drives it
    assert search.main(["status", str(study_folder)]) == 0
    assert f"driver: running (pid {os.getpid()}, started " in capsys.readouterr().out


def test_pareto_as_csv(study_folder, capsys):
    assert search.main(["pareto", "cli", "--output-dir", str(study_folder.parent), "--csv"]) == 0
    front = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out))
    assert front["number"].tolist() == [0, 1] and front["pareto"].all()


def test_export_is_forwarded(capsys):
    with pytest.raises(SystemExit) as exit_:
        search.main(["export", "--help"])
    assert exit_.value.code == 0
    assert "--pick" in capsys.readouterr().out


def test_run_refuses_an_existing_study(study_folder, capsys):
    assert search.main(["run", str(study_folder.parent.parent / "study.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"name: study 'cli' already exists in {study_folder}: continue it with "
                        f"`python search.py resume {study_folder}`, or pick another --name")

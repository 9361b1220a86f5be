"""StudyTracker and MlflowTrialReporter against a real local MLflow store (SQLite + artifact folder)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from p3b_search.study.front import pareto_summary
from p3b_search.study.loading import load_study
from p3b_search.study.messages import StudyError
from p3b_search.study.pareto import hypervolume
from p3b_search.tracking.background import BackgroundSender
from p3b_search.tracking.client import TrackingStoreError
from p3b_search.tracking.moved_store import follow_moved_folder
from p3b_search.tracking.study_run import StudyTracker
from p3b_search.tracking.study_tracking import MlflowStudyTracking
from p3b_search.tracking.trial_run import MlflowTrialReporter
from tests.paths import REPO_ROOT as REPO

OBJECTIVES = {"top1": "maximize", "macs": "minimize"}
REFERENCE = [0.0, 10.0]


def make_tracker(folder: Path, study: str = "demo") -> StudyTracker:
    return StudyTracker(f"sqlite:///{folder}/mlflow.db", "p3b", study, artifact_location=str(folder / "mlartifacts"))


def start(tracker: StudyTracker, folder: Path, resume: bool = False) -> str:
    study_file = folder / "study.yaml"
    study_file.write_text("name: demo\ntrials: 4\n")
    space = {"alpha": {"low": 0.1, "high": 2.0, "log": True}, "method": {"choices": ["p3b", "taylor"]}}
    return tracker.start(study_file, space, "tpe", OBJECTIVES, resume=resume)


def allocation_rows(step: int, keep: float, with_benefits: bool = True) -> list[dict]:
    """Rows of one mask update of a 3-block model (6 sub-blocks)."""
    rows = []
    for layer in range(3):
        for kind in ("attn", "mlp"):
            row = dict(step=step, epoch=step // 10, layer=layer, kind=kind, sub_block=2 * layer + (kind == "mlp"),
                       keep_ratio_target=keep, keep_ratio=keep - 0.01 * layer, kept_params=1000, kept_macs=5000)
            if with_benefits:
                row.update(benefit_cls=0.1 * layer, benefit_patch=0.2, importance=0.5)
            rows.append(row)
    return rows


def log_trial(tracker: StudyTracker, number: int, top1: float, macs: float, epochs: int = 3,
              with_benefits: bool = True, state: str = "finished") -> MlflowTrialReporter:
    reporter = MlflowTrialReporter(**tracker.child_run_args(number, {"alpha": 0.1 * (number + 1), "method": "p3b"}))
    for epoch in range(epochs):
        reporter.report_epoch({"epoch": epoch, "stage": 0, "loss": 2.0 / (epoch + 1), "top1": top1 - epochs + epoch,
                               "top5": 90.0, "lr": 1e-3, "kept_params": 1e5, "macs": macs, "keep_ratio": 0.7})
        reporter.report_allocations(allocation_rows(10 * epoch, 1.0 - 0.1 * epoch, with_benefits))
    reporter.report_final({"top1": top1, "macs": macs, "params": 1e5})
    assert reporter.finish(state)
    return reporter


def trials_table(rows: list[tuple[int, float, float, str]], run_ids: dict[int, str] | None = None) -> pd.DataFrame:
    """The search's ``trials.parquet`` layout; ``mlflow_run_id`` is None where the worker had not told it yet."""
    table = pd.DataFrame(rows, columns=["number", "top1", "macs", "state"]).assign(**{"param.alpha": 0.5},
                                                                                  epochs_done=3)
    return table.assign(mlflow_run_id=[(run_ids or {}).get(n) for n in table["number"]])


def metric_steps(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_parent_and_nested_children_carry_study_trials_and_allocations(tmp_path, monkeypatch):
    tracker = make_tracker(tmp_path)
    parent_id = start(tracker, tmp_path)
    monkeypatch.setenv("MLFLOW_RUN_ID", parent_id)  # as a Ray worker may inherit it
    first = log_trial(tracker, 0, top1=80.0, macs=4.0)
    second = log_trial(tracker, 1, top1=70.0, macs=2.0, with_benefits=False)
    tracker.close()
    assert "MLFLOW_RUN_ID" not in os.environ and mlflow.active_run() is None

    client = MlflowClient(tracker.tracking_uri)
    parent = client.get_run(parent_id)
    assert parent.data.tags["p3b.study"] == "demo" and parent.info.status == "FINISHED"
    assert parent.data.params["sampler"] == "tpe"
    assert parent.data.params["objectives"] == "top1:maximize, macs:minimize"
    assert '"log": true' in parent.data.params["space.alpha"]
    assert {a.path for a in client.list_artifacts(parent_id, "study")} == {"study/study.yaml", "study/search_space.json"}

    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(run.info.run_id for run in children) == sorted([first.run_id, second.run_id])
    child = client.get_run(first.run_id)
    assert child.info.status == "FINISHED" and child.data.tags["state"] == "finished"
    assert child.data.tags["trial_number"] == "0" and child.info.run_name == "demo-trial-0000"
    assert child.data.params == {"alpha": "0.1", "method": "p3b"}
    assert metric_steps(client, first.run_id, "top1") == {0: 77.0, 1: 78.0, 2: 79.0}
    assert sorted(metric_steps(client, first.run_id, "keep_ratio")) == [0, 1, 2]
    assert metric_steps(client, first.run_id, "keep_ratio/L02.mlp") == pytest.approx({0: 0.98, 10: 0.88, 20: 0.78})
    assert child.data.metrics["final/top1"] == 80.0 and child.data.metrics["final/params"] == 1e5

    for reporter, has_benefits in ((first, True), (second, False)):
        paths = {a.path for a in client.list_artifacts(reporter.run_id, "allocations")}
        assert paths == {f"allocations/{name}" for name in ("allocations.parquet", "allocations.json",
                                                             "keep_ratio_heatmap.png")}
        table = pd.read_parquet(client.download_artifacts(reporter.run_id, "allocations/allocations.parquet",
                                                          str(tmp_path)))
        assert len(table) == 18 and table["name"].iloc[:2].tolist() == ["L00.attn", "L00.mlp"]
        assert ("benefit_cls" in table.columns) == has_benefits
        shown = pd.read_json(client.download_artifacts(reporter.run_id, "allocations/allocations.json", str(tmp_path)),
                             orient="split")  # the MLflow table format the UI renders
        assert len(shown) == 18 and set(shown["name"]) == set(table["name"])
        logged = client.get_run(reporter.run_id).data.tags["mlflow.loggedArtifacts"]
        assert '"path": "allocations/allocations.json", "type": "table"' in logged


@pytest.mark.slow
def test_pareto_tags_move_with_the_front_and_hypervolume_is_logged_per_finished_count_and_trial_epochs(tmp_path):
    tracker = make_tracker(tmp_path)
    parent_id = start(tracker, tmp_path)
    runs = {n: log_trial(tracker, n, top1, macs).run_id for n, top1, macs in [(0, 80.0, 4.0), (1, 70.0, 2.0)]}
    client = MlflowClient(tracker.tracking_uri)

    def pareto_tags() -> dict[int, str | None]:
        return {n: client.get_run(run_id).data.tags.get("pareto") for n, run_id in runs.items()}

    nothing_yet = tracker.publish_front(pareto_summary(trials_table([(0, np.nan, np.nan, "RUNNING")]), OBJECTIVES,
                                                        REFERENCE))
    assert nothing_yet.front.empty and nothing_yet.hypervolume == 0.0 and nothing_yet.trials_finished == 0

    snapshot = tracker.publish_front(pareto_summary(
        trials_table([(0, 80.0, 4.0, "COMPLETE"), (1, 70.0, 2.0, "COMPLETE")]), OBJECTIVES, REFERENCE))
    assert sorted(snapshot.front["number"]) == [0, 1] and pareto_tags() == {0: "true", 1: "true"}

    # trial 2 dominates trial 1; trial 3 would dominate everything but was stopped early (its
    # worker never ended the run): never a point, and the driver ends its run
    runs[2] = log_trial(tracker, 2, 75.0, 1.0).run_id
    stopped = MlflowTrialReporter(**tracker.child_run_args(3, {"alpha": 9.0}))
    stopped.report_epoch({"epoch": 0, "top1": 99.0, "macs": 0.5})
    while stopped.run_id is None:  # the worker's run exists once the store answered
        time.sleep(0.02)
    runs[3] = tracker.end_trial(3, "stopped", "dominated at fine-tune epoch 1")
    assert runs[3] == stopped.run_id
    table = trials_table([(0, 80.0, 4.0, "COMPLETE"), (1, 70.0, 2.0, "COMPLETE"), (2, 75.0, 1.0, "COMPLETE"),
                          (3, 99.0, 0.5, "PRUNED")], run_ids={0: runs[0], 3: runs[3]})
    snapshot = tracker.publish_front(pareto_summary(table, OBJECTIVES, REFERENCE))
    assert sorted(snapshot.front["number"]) == [0, 2] and snapshot.trials_finished == 3
    assert pareto_tags() == {0: "true", 1: "false", 2: "true", 3: None}
    in_ui_filter = client.search_runs([tracker.experiment_id], "tags.pareto = 'true'")
    assert sorted(run.info.run_id for run in in_ui_filter) == sorted([runs[0], runs[2]])
    assert tracker.child_run_ids() == runs
    ended = client.get_run(runs[3])
    assert ended.info.status == "KILLED" and ended.data.tags["state_reason"] == "dominated at fine-tune epoch 1"

    # 0: 80 % at 4 MACs and 2: 75 % at 1 MAC, reference (0 %, 10 MACs): 75*9 + 5*6
    assert snapshot.hypervolume == pytest.approx(705.0)
    assert snapshot.hypervolume == pytest.approx(hypervolume(np.array([[80.0, 4.0], [75.0, 1.0]]), ["maximize", "minimize"],
                                                             REFERENCE))
    history = metric_steps(client, parent_id, "hypervolume")
    assert history == pytest.approx({0: 0.0, 2: 80.0 * 6 + 70.0 * 2, 3: 705.0})
    assert metric_steps(client, parent_id, "front_size") == {0: 0.0, 2: 2.0, 3: 2.0}
    # the history against trial-epochs (3 per trial, in trial order): the stopped trial spends
    # epochs without moving the front; each point is logged once over the three publishes
    assert metric_steps(client, parent_id, "history/hypervolume") == pytest.approx(
        {3: 480.0, 6: 620.0, 9: 705.0, 12: 705.0})
    assert len(client.get_metric_history(parent_id, "history/hypervolume")) == 4

    front = pd.read_parquet(client.download_artifacts(parent_id, "pareto/front.parquet", str(tmp_path)))
    assert sorted(front["mlflow_run_id"]) == sorted([runs[0], runs[2]]) and front["knee"].sum() == 1
    html = Path(client.download_artifacts(parent_id, "pareto/front.html", str(tmp_path))).read_text()
    assert runs[2] in html and runs[1] in html and "param.alpha" in html and "plotly" in html
    assert runs[3] not in html
    assert {a.path for a in client.list_artifacts(parent_id, "pareto")} >= {"pareto/front.png", "pareto/history.png",
                                                                            "pareto/history.parquet"}


def test_a_trial_without_a_child_run_is_looked_for_once(tmp_path, monkeypatch):
    """A finished trial whose run is unknown makes the tracker search the store for the child
    runs; one that has no run (it failed before its first epoch) must not make every later
    publish search all of them again."""
    tracker = make_tracker(tmp_path)
    start(tracker, tmp_path)
    run = log_trial(tracker, 0, 80.0, 4.0).run_id
    searches = []
    real = tracker.child_run_ids
    monkeypatch.setattr(tracker, "child_run_ids", lambda: searches.append(1) or real())
    for ended in ([(0, 80.0, 4.0, "COMPLETE"), (1, np.nan, np.nan, "FAIL")],) * 3:
        snapshot = tracker.publish_front(pareto_summary(trials_table(ended), OBJECTIVES, REFERENCE))
    assert len(searches) == 1 and snapshot.front["mlflow_run_id"].tolist() == [run]
    tracker.publish_front(pareto_summary(trials_table([(0, 80.0, 4.0, "COMPLETE"), (1, np.nan, np.nan, "FAIL"),
                                                       (2, 70.0, 2.0, "COMPLETE")]), OBJECTIVES, REFERENCE))
    assert len(searches) == 2  # a new trial without a known run: searched again


def test_trial_state_follows_how_the_trial_ended(tmp_path):
    tracker = make_tracker(tmp_path)
    start(tracker, tmp_path)
    with pytest.raises(RuntimeError, match="loss is NaN"):
        with MlflowTrialReporter(**tracker.child_run_args(0, {"alpha": 1.0})) as failing:
            failing.report_epoch({"epoch": 0, "loss": float("nan")})
            raise RuntimeError("loss is NaN at epoch 0")
    stopped = MlflowTrialReporter(**tracker.child_run_args(1, {"alpha": 2.0}))
    stopped.finish("stopped", "dominated after 2 epochs")
    client = MlflowClient(tracker.tracking_uri)
    failed_run, stopped_run = client.get_run(failing.run_id), client.get_run(stopped.run_id)
    assert failed_run.info.status == "FAILED" and failed_run.data.tags["state"] == "failed"
    assert failed_run.data.tags["state_reason"] == "RuntimeError: loss is NaN at epoch 0"
    assert stopped_run.info.status == "KILLED" and stopped_run.data.tags["state"] == "stopped"
    assert stopped_run.data.tags["state_reason"] == "dominated after 2 epochs"
    with pytest.raises(ValueError, match="trial state 'done'"):
        stopped.finish("done")


def test_retried_trial_continues_its_child_run_with_all_allocations(tmp_path):
    tracker = make_tracker(tmp_path)
    parent_id = start(tracker, tmp_path)
    args = tracker.child_run_args(5, {"alpha": 1.0})
    first = MlflowTrialReporter(**args)
    first.report_allocations(allocation_rows(0, 1.0) + allocation_rows(10, 0.9))
    first.finish("failed", "worker died")
    retry = MlflowTrialReporter(**args)  # resumed from the epoch-0 checkpoint: step 10 comes again
    retry.report_allocations(allocation_rows(10, 0.85) + allocation_rows(20, 0.8))
    retry.finish("finished")
    client = MlflowClient(tracker.tracking_uri)
    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert [run.info.run_id for run in children] == [first.run_id] == [retry.run_id]
    assert children[0].info.status == "FINISHED"
    table = pd.read_parquet(client.download_artifacts(retry.run_id, "allocations/allocations.parquet", str(tmp_path)))
    assert sorted(table["step"].unique()) == [0, 10, 20] and len(table) == 18
    assert table.loc[table["step"] == 10, "keep_ratio_target"].unique().tolist() == [0.85]


def test_bad_input_fails_with_one_line_errors(tmp_path):
    tracker = make_tracker(tmp_path)
    start(tracker, tmp_path)
    reporter = MlflowTrialReporter(**tracker.child_run_args(0, {}))
    with pytest.raises(ValueError, match="allocation row lacks keep_ratio"):
        reporter.report_allocations([{"step": 0, "layer": 0, "kind": "attn"}])
    reporter.finish("failed", "bad row")
    with pytest.raises(ValueError, match=r"lacks objective column\(s\) \['macs'\]"):
        pareto_summary(pd.DataFrame({"number": [0], "top1": [1.0]}), OBJECTIVES, REFERENCE)
    with pytest.raises(TrackingStoreError, match="already holds study 'demo'.*resume it"):
        start(make_tracker(tmp_path), tmp_path)
    tracker.close()


def _closed_port() -> int:
    """A local port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_tracking_server_never_blocks_the_trial(tmp_path, monkeypatch, caplog):
    # each MLflow request to a dead server now takes about 2 s of retries: 40 of them made
    # synchronously would take over a minute
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    port = _closed_port()
    reporter = MlflowTrialReporter(f"http://127.0.0.1:{port}", "1", "0" * 32, "offline", {"alpha": 1.0},
                                   trial_number=0, finish_timeout_s=1.0)
    with caplog.at_level(logging.WARNING, logger="p3b_search.tracking"):
        began = time.perf_counter()
        for epoch in range(20):
            reporter.report_epoch({"epoch": epoch, "loss": 1.0, "top1": 50.0})
            reporter.report_allocations(allocation_rows(epoch, 0.9))
        calls = time.perf_counter() - began
        deadline = time.monotonic() + 60
        while f"127.0.0.1:{port} unreachable" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)  # the sender warns once its first call failed
        sent_everything = reporter.finish("finished")
    assert calls < 1.0 and not sent_everything and reporter.run_id is None
    assert len(reporter.epochs) == 20  # the in-memory record is complete regardless
    assert f"127.0.0.1:{port} unreachable" in caplog.text and "could not be sent" in caplog.text


def test_unreachable_tracking_server_fails_the_study_start_at_once(tmp_path):
    tracker = StudyTracker(f"http://127.0.0.1:{_closed_port()}", "p3b", "demo")
    began = time.perf_counter()
    with pytest.raises(RuntimeError, match="does not answer .*fix tracking.uri in the study file"):
        start(tracker, tmp_path)
    assert time.perf_counter() - began < 5


def _study(tmp_path: Path, tracking: str = ""):
    """A study config whose folder exists, tracked in the embedded store or at ``tracking``."""
    tmp_path.mkdir(parents=True)
    path = tmp_path / "study.yaml"
    path.write_text(f"name: demo\noutput_dir: {tmp_path / 'runs'}\n" + (f"tracking: {{uri: '{tracking}'}}\n" if tracking else ""))
    study = load_study(path)
    study.layout.root.mkdir(parents=True)
    study.layout.study_file.write_text(path.read_text())
    return study


@pytest.mark.slow
def test_only_a_store_the_user_must_fix_is_a_one_line_error(tmp_path, monkeypatch):
    """A server that does not answer or refuses us: one line naming the fix. Anything else MLflow
    (or this project) raises comes with its traceback."""
    with pytest.raises(StudyError, match=r"study.yaml: tracking: MLflow tracking server .* does not answer") as error:
        MlflowStudyTracking().start(_study(tmp_path / "down", f"http://127.0.0.1:{_closed_port()}"), resume=False)
    assert "\n" not in str(error.value) and error.value.__suppress_context__

    def refusing(self, *args, **kwargs):
        raise RestException({"error_code": "PERMISSION_DENIED", "message": "bob may not read experiment 1"})

    monkeypatch.setattr(MlflowClient, "search_runs", refusing)
    with pytest.raises(StudyError, match="tracking: cannot use MLflow tracking store .*PERMISSION_DENIED: bob may not"):
        MlflowStudyTracking().start(_study(tmp_path / "refused"), resume=False)

    def failing(self, *args, **kwargs):
        raise MlflowException("unexpected: lost the connection to run 'x'", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(MlflowClient, "search_runs", failing)
    with pytest.raises(MlflowException, match="unexpected") as error:
        MlflowStudyTracking().start(_study(tmp_path / "bug"), resume=False)
    assert "search_all" in {frame.name for frame in error.traceback}  # raised where it happened
    monkeypatch.undo()

    def broken(self, *args, **kwargs):
        raise ValueError("a bug of the tracker")

    monkeypatch.setattr(StudyTracker, "_create_parent", broken)
    with pytest.raises(ValueError, match="a bug of the tracker"):
        MlflowStudyTracking().start(_study(tmp_path / "broken"), resume=False)


BEFORE_MOVE = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from p3b_search.tracking.study_run import StudyTracker
from tests.tracking.test_study_tracking import log_trial, start
folder = Path({folder!r})
tracker = StudyTracker(f"sqlite:///{{folder}}/mlflow.db", "demo", "demo",
                       artifact_location=(folder / "mlartifacts").as_uri())
start(tracker, folder)
print(log_trial(tracker, 0, top1=80.0, macs=4.0).run_id)
tracker.close()
"""


@pytest.mark.slow
def test_the_embedded_store_follows_its_moved_folder(tmp_path):
    """After ``mv`` of a study folder its embedded store's artifact locations are rewritten to the
    new folder: the experiment's, every run's, so the runs read and write their artifacts there
    and nothing reaches the old folder. Pins the MLflow schema columns that
    :mod:`p3b_search.tracking.moved_store` writes: an MLflow that keeps the locations elsewhere
    fails here."""
    before, after = tmp_path / "before" / "demo", tmp_path / "after" / "demo"
    before.mkdir(parents=True)
    # the study before the move runs in another process, as the stopped driver did (MLflow caches
    # each run's artifact location per process)
    logged = subprocess.run([sys.executable, "-c", BEFORE_MOVE.format(repo=str(REPO), folder=str(before))],
                            capture_output=True, text=True, cwd=tmp_path)
    assert logged.returncode == 0, logged.stderr
    trial_run_id = logged.stdout.split()[-1]
    assert follow_moved_folder(before / "mlflow.db", "demo", before / "mlartifacts") is None  # not moved
    (tmp_path / "after").mkdir()
    before.rename(after)

    assert follow_moved_folder(after / "mlflow.db", "demo", after / "mlartifacts") == (before / "mlartifacts").as_uri()
    assert follow_moved_folder(after / "mlflow.db", "demo", after / "mlartifacts") is None  # once
    assert follow_moved_folder(after / "missing.db", "demo", after / "mlartifacts") is None
    client = MlflowClient(f"sqlite:///{after}/mlflow.db")
    experiment = client.get_experiment_by_name("demo")
    assert experiment.artifact_location == (after / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and all(r.info.artifact_uri.startswith(f"{experiment.artifact_location}/") for r in runs)
    table = pd.read_parquet(client.download_artifacts(trial_run_id, "allocations/allocations.parquet", str(tmp_path)))
    assert len(table) == 18

    resumed = StudyTracker(f"sqlite:///{after}/mlflow.db", "demo", "demo")
    parent_id = start(resumed, after, resume=True)
    resumed.publish_front(pareto_summary(trials_table([(0, 80.0, 4.0, "COMPLETE")], {0: trial_run_id}), OBJECTIVES,
                                         REFERENCE))
    resumed.close()
    assert {a.path for a in client.list_artifacts(parent_id, "pareto")} >= {"pareto/front.png", "pareto/front.parquet"}
    assert (after / "mlartifacts" / parent_id / "artifacts" / "pareto" / "front.png").is_file()
    assert not before.exists()


class _FlakyStore:
    """A call that fails as an unreachable/locked store would, ``failures`` times, then succeeds."""

    def __init__(self, failures: int, log: list):
        self.failures, self.log = failures, log

    def __call__(self, name: str):
        def call(client):
            if self.failures:
                self.failures -= 1
                raise RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "database is locked"})
            self.log.append(name)
        return call


def test_sender_retries_transient_failures_in_order_and_drops_rejected_calls(tmp_path):
    sent: list[str] = []
    flaky = _FlakyStore(failures=3, log=sent)
    sender = BackgroundSender(f"sqlite:///{tmp_path}/unused.db", "unit", retry_s=0.01)

    def rejected(client):
        raise MlflowException.invalid_parameter_value("bad param")

    sender.submit("a", flaky("a"))
    sender.submit("bad", rejected)
    sender.submit("b", flaky("b"))
    # close() returns once the queue drains; the bound only has to cover opening the SQLite store
    # (its schema migrations take seconds on a loaded machine)
    assert sender.close(timeout_s=120) == 0
    assert sent == ["a", "b"]


CRASHING_DRIVER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from p3b_search.tracking.trial_run import MlflowTrialReporter
from tests.tracking.test_study_tracking import make_tracker, start
folder = Path({folder!r})
tracker = make_tracker(folder)
with tracker:
    start(tracker, folder)
    reporter = MlflowTrialReporter(**tracker.child_run_args(0, {{"alpha": 1.0}}))
    reporter.report_epoch({{"epoch": 0, "loss": 1.0}})
    while reporter.run_id is None or reporter._sender.pending:  # the epoch is in the store
        time.sleep(0.05)
    print(tracker.parent_run_id, reporter.run_id, flush=True)
    if {crash!r}:
        os._exit(1)  # a hard crash: no finally, no atexit
    time.sleep(60)  # waits for Ctrl-C
"""


def _driver(tmp_path: Path, crash: bool) -> tuple[subprocess.Popen, str, str]:
    script = CRASHING_DRIVER.format(repo=str(REPO), folder=str(tmp_path), crash=crash)
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    line = process.stdout.readline()
    assert line, process.stderr.read()
    parent_id, child_id = line.split()
    return process, parent_id, child_id


@pytest.mark.slow
def test_ctrl_c_marks_the_study_and_its_running_trials_killed(tmp_path):
    process, parent_id, child_id = _driver(tmp_path, crash=False)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(parent_id).info.status == "KILLED"
    child = client.get_run(child_id)
    assert child.info.status == "KILLED" and child.data.tags["state"] == "stopped"


@pytest.mark.slow
def test_runs_left_running_by_a_crash_are_failed_on_resume(tmp_path):
    process, parent_id, child_id = _driver(tmp_path, crash=True)
    assert process.wait(timeout=30) == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(child_id).info.status == "RUNNING"  # what a hard crash leaves behind
    tracker = make_tracker(tmp_path)
    assert start(tracker, tmp_path, resume=True) == parent_id
    child = client.get_run(child_id)
    assert child.info.status == "FAILED" and child.data.tags["state"] == "failed"
    assert "marked on resume" in child.data.tags["state_reason"]
    assert client.get_run(parent_id).info.status == "RUNNING"
    tracker.close("FINISHED")
    assert client.get_run(parent_id).info.status == "FINISHED"

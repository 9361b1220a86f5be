"""A study reviewed in the real MLflow UI: `mlflow server` on 127.0.0.1, a tiny real study run
against it by the search runner (local Ray, the digits MLP objective of ``tests/search_objective``),
then headless Chromium (Debian's ``chromium`` package, driven by playwright) checks that the parent
run, its nested trials, the ``tags.pareto = "true"`` filter and the Pareto HTML artifact are
visible. Screenshots go to ``$P3B_UI_SCREENSHOTS`` (default: the test's tmp folder).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from p3b_search.tracking.client import ui_url
from tests.paths import REPO_ROOT as ROOT

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STUDY = "ui-study"
N_TRIALS = 4
STUDY_FILE = """name: {name}
output_dir: {output_dir}
method: {{name: p3b}}
training: {{prune: {{epochs: 1, lr: 0.01}}, finetune: {{epochs: 1, lr: 0.01}}, batch_size: 64}}
search_space:
  method_config.prune_ratio: {{type: float, low: 0.2, high: 0.9}}
objectives: [top1, {{name: macs, reference: 3000}}]
sampler: {{name: random, seed: 0}}
n_trials: {n_trials}
concurrency: 2
"""


def require_chromium() -> None:
    """Skip without Chromium, except in CI (CI=true), where its absence is a failure."""
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} missing: install Debian's browser with `apt-get install -y chromium`"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Wait until the MLflow server at ``url`` answers; kill it and fail (with its log) otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                os.killpg(server.pid, signal.SIGKILL)
                pytest.fail(f"the MLflow server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)


@pytest.fixture
def mlflow_server(tmp_path):
    """URL of a real tracking server (SQLite backend, served artifacts) in its own process group."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no GenAI job workers
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_health(url, server, tmp_path / "server.log")
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    log.close()


def run_tiny_study(url: str | None, folder: Path):
    """A real study through the search runner, tracked on the server at ``url`` (None: in the
    embedded store of the study folder)."""
    from p3b_search.launch import run_study
    from p3b_search.study.loading import load_study

    study_file = folder / "study.yaml"
    text = STUDY_FILE.format(name=STUDY, output_dir=folder / "runs", n_trials=N_TRIALS)
    study_file.write_text(text + (f'tracking: {{uri: "{url}"}}\n' if url else ""))
    outcome = run_study(load_study(study_file), objective="tests.search_objective:run_trial", num_cpus=2,
                        printer=lambda line: None)
    assert not outcome.interrupted
    return outcome


def test_the_study_review_is_visible_in_the_mlflow_ui(mlflow_server, tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright

    began = time.monotonic()
    outcome = run_tiny_study(mlflow_server, tmp_path)
    print(f"study ran in {time.monotonic() - began:.1f} s")
    client = MlflowClient(mlflow_server)
    experiment_id = client.get_experiment_by_name(STUDY).experiment_id
    (parent,) = client.search_runs([experiment_id], f"tags.`p3b.study` = '{STUDY}'")
    tagged = client.search_runs([experiment_id], "tags.pareto = 'true'")
    front_run_ids = {run.info.run_id for run in tagged}
    assert {int(run.data.tags["trial_number"]) for run in tagged} == set(outcome.front["number"])
    on_front = {f"{STUDY}-trial-{n:04d}": n in set(outcome.front["number"]) for n in outcome.trials["number"]}
    assert len(on_front) == N_TRIALS
    shots = Path(os.environ.get("P3B_UI_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    front_html = (f"{mlflow_server}/#/experiments/{experiment_id}/runs/{parent.info.run_id}"
                  "/artifacts/pareto/front.html?workflowType=machine_learning")

    began = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 900},
        )
        browser.set_default_timeout(20_000)
        page = browser.new_page()
        page.goto(ui_url(mlflow_server, experiment_id), wait_until="domcontentloaded")
        page.locator(f'a[href$="/runs/{parent.info.run_id}"]', has_text=STUDY).wait_for()  # the parent run
        assistant = page.get_by_role("button", name="Close")  # the assistant side panel narrows the table
        if assistant.count() == 1:
            assistant.click()
        page.locator('[data-component-id*="runnamecellrenderer"]').first.click()  # expand the parent
        for name in on_front:
            page.get_by_text(name, exact=True).wait_for()
        page.screenshot(path=str(shots / "ui_study_runs.png"))

        search = page.get_by_test_id("search-box")
        search.fill('tags.pareto = "true"')
        search.press("Enter")
        page.get_by_text(f"{1 + len(front_run_ids)} matching runs").wait_for()  # the parent and the front
        for name, visible in on_front.items():
            assert page.get_by_text(name, exact=True).count() == int(visible), name
        page.screenshot(path=str(shots / "ui_pareto_filter.png"))

        page.goto(front_html, wait_until="domcontentloaded")
        page.get_by_text("pareto/front.html").first.wait_for()
        plot = page.frame_locator("iframe.mlflow-html-iframe")
        plot.get_by_text(f"Pareto front of {N_TRIALS} finished trials").wait_for()
        plot.locator("g.scatterlayer g.trace").nth(1).locator("path.point").first.hover(force=True)  # a front point
        plot.locator("g.hoverlayer g.hovertext").wait_for()
        hover = plot.locator("g.hoverlayer").text_content()
        assert "param.method_config.prune_ratio" in hover and any(run_id in hover for run_id in front_run_ids), hover
        page.screenshot(path=str(shots / "ui_pareto_artifact.png"))
        browser.close()
    print(f"browser checks in {time.monotonic() - began:.1f} s; screenshots: {shots}")


def test_search_py_ui_serves_the_study_s_embedded_store(tmp_path):
    """`search.py ui NAME` on a study tracked in its own folder (the default): the MLflow UI it
    starts on 127.0.0.1 lists the front's runs under ``tags.pareto = "true"`` and serves the
    parent run's Pareto HTML."""
    outcome = run_tiny_study(None, tmp_path)
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        ui = subprocess.Popen([sys.executable, str(ROOT / "search.py"), "ui", str(outcome.study.layout.root),
                               "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                              start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, ui, log)
        client = MlflowClient(url)
        experiment_id = client.get_experiment_by_name(STUDY).experiment_id
        assert log.read_text().startswith(f"MLflow UI for {STUDY}: {ui_url(url, experiment_id)}")
        tagged = client.search_runs([experiment_id], "tags.pareto = 'true'")
        assert {int(run.data.tags["trial_number"]) for run in tagged} == set(outcome.front["number"])
        (parent,) = client.search_runs([experiment_id], f"tags.`p3b.study` = '{STUDY}'")
        with urllib.request.urlopen(f"{url}/get-artifact?path=pareto/front.html&run_uuid={parent.info.run_id}",
                                    timeout=30) as response:
            page = response.read().decode()
        assert f"Pareto front of {N_TRIALS} finished trials" in page
    finally:
        os.killpg(ui.pid, signal.SIGKILL)
        ui.wait(timeout=30)

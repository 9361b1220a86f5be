"""Export of a trial: picks over the trials table, the written folder, a fresh-process reload,
the model card, bench, the command line and MLflow registration.

The study is fake but real: the digits task's tiny timm ViT, shrunk with random masks by
p3b_search.surgery, briefly trained on the digits target domain, saved by the objective's own
writer (model/ + result.json) and listed in a trials.parquet written with pyarrow.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from objectives.prune_finetune import _save_final, objectives_of
from p3b_search.config import DataConfig, TrialConfig
from p3b_search.cost import model_cost, torch_macs
from p3b_search.data import build_loaders
from p3b_search.export.bench import bench
from p3b_search.export.card import UNSTRUCTURED_NOTE
from p3b_search.export.cli import main
from p3b_search.export.load import ExportError, load_pruned
from p3b_search.export.picks import Pick, parse_amount, select_trial
from p3b_search.export.runtimes import check_runtime
from p3b_search.export.writer import export_trial
from p3b_search.methods import PrunedModel
from p3b_search.models import DIGITS_VIT, create_timm_model
from p3b_search.study.layout import StudyLayout
from p3b_search.surgery import get_adapter, random_masks, shrink_model
from p3b_search.surgery.gates import random_residual
from p3b_search.tracking.registry import register_model
from p3b_search.training.loop import evaluate
from p3b_search.trial_folder import TrialFolder
from tests.paths import REPO_ROOT as REPO

STUDY = "digits-export"
OBJECTIVES = [("top1", "maximize"), ("macs", "minimize")]


# ----------------------------------------------------------------------------- a fake but real study

def _train_briefly(model: torch.nn.Module, loader, steps: int, seed: int) -> None:
    """A few Adam steps so the model predicts something (top-1 well above chance)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    batches = iter(())
    for _ in range(steps):
        try:
            inputs, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            inputs, targets = next(batches)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    model.eval()


def _unstructured(model: torch.nn.Module, seed: int, keep: float) -> dict[str, torch.Tensor]:
    """Zero a random (1 - keep) of every sub-block linear weight, as DIMAP/SViTE leave them."""
    gen = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    masks = {}
    for sb in adapter.sub_blocks:
        names = ("qkv", "proj") if sb.kind == "attn" else ("fc1", "fc2")
        for name, linear in zip(names, adapter.linears(sb), strict=True):
            mask = torch.rand(linear.weight.shape, generator=gen) < keep
            with torch.no_grad():
                linear.weight.mul_(mask)
            masks[f"{sb.block_path}.{sb.kind}.{name}.weight"] = mask
    return masks


def _make_trial(layout: StudyLayout, number: int, kind: str, keep: float, loaders, train_steps: int) -> dict:
    """Trial ``number``: a pruned, briefly trained model saved by the objective's writer."""
    train_loader, val_loader, num_classes = loaders
    method = "dimap" if kind == "unstructured" else "p3b"
    knobs = {"prune_ratio": round(1 - keep, 3)} | ({"residual": "shared"} if kind == "shared" else {})
    config = TrialConfig(model=DIGITS_VIT.model_copy(update={"weights": None}), data=DataConfig(kind="digits"),
                         method=method, method_config=knobs)
    torch.manual_seed(number)
    dense = create_timm_model(config.model, num_classes).eval()
    dense_params = model_cost(dense).params
    if kind == "structured":
        model = shrink_model(dense, random_masks(get_adapter(dense), seed=number, keep=keep, dead_prob=0.1))
        pruned = PrunedModel(model, structured=True)
    elif kind == "shared":
        adapter = get_adapter(dense)
        model = shrink_model(dense, random_masks(adapter, seed=number, keep=keep, dead_prob=0.1, shared=True),
                             random_residual(adapter, keep=keep, seed=number))
        pruned = PrunedModel(model, structured=True)
    else:
        pruned = PrunedModel(dense, structured=False, weight_masks=_unstructured(dense, number, keep))
    _train_briefly(pruned.model, train_loader, train_steps, seed=number)
    if pruned.weight_masks:  # the fine-tune stage keeps the zeros at zero
        with torch.no_grad():
            for name, param in pruned.model.named_parameters():
                if name in pruned.weight_masks:
                    param.mul_(pruned.weight_masks[name])
    objectives = objectives_of(pruned, evaluate(pruned.model, val_loader, amp=False), dense_params)
    workdir = layout.trial_dir(number)
    workdir.mkdir(parents=True)
    _save_final(pruned, config, num_classes, pruned.model, TrialFolder(workdir), objectives)
    return objectives


def _row(number: int, state: str, objectives: dict | None = None, run_id: str | None = None) -> dict:
    values = objectives or {}
    return {"number": number, "state": state, "method": "p3b",
            **{m: float(values.get(m, np.nan)) for m in ("top1", "top5", "macs", "params", "latency_ms")},
            "mlflow_run_id": run_id}


def write_trials_table(layout: StudyLayout, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), layout.trials_table)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain nothing from two, and a busy machine is not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> StudyLayout:
    """Trials 0 (structured, keep 0.5), 1 (structured, keep 0.8), 2 (unstructured, keep 0.5),
    3 (COMPLETE, model folder deleted), 4 (RUNNING: result.json not finished), 5 (FAIL)."""
    layout = StudyLayout(tmp_path_factory.mktemp("runs") / STUDY)
    layout.root.mkdir()
    layout.study_file.write_text(yaml.safe_dump({
        "name": STUDY, "output_dir": str(layout.root.parent), "data": {"kind": "digits"},
        "model": {"name": DIGITS_VIT.name, "overrides": DIGITS_VIT.overrides},
        "method": {"name": "p3b"}, "objectives": ["top1", "macs"]}))
    probe = create_timm_model(DIGITS_VIT, 5)
    loaders = build_loaders(DataConfig(kind="digits", max_train_samples=256), probe, batch_size=64, seed=0)
    results = {n: _make_trial(layout, n, kind, keep, loaders, train_steps=steps)
               for n, kind, keep, steps in ((0, "structured", 0.5, 60), (1, "structured", 0.8, 5),
                                            (2, "unstructured", 0.5, 5), (3, "structured", 0.6, 1))}
    shutil.rmtree(layout.trial_dir(3) / "model")
    running = layout.trial_dir(4)
    running.mkdir(parents=True)
    (running / "result.json").write_text(json.dumps({"state": "running", "objectives": {}}))
    results[3] = {**results[3], "top1": 100.0, "macs": 1e12}  # the best, on record only
    rows = [_row(n, "COMPLETE", results[n], run_id=None) for n in range(4)]
    rows += [_row(4, "RUNNING"), _row(5, "FAIL")]
    write_trials_table(layout, rows)
    return layout


def _objectives(layout: StudyLayout, number: int) -> dict:
    """The trial's objectives as its result.json records them."""
    return json.loads((layout.trial_dir(number) / "result.json").read_text())["objectives"]


@pytest.fixture(scope="module")
def exported(study, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("exports") / "trial0"
    result = export_trial(study.root, Pick.parse("trial 0"), out, bench_repeats=3)
    return out, result


# ----------------------------------------------------------------------------- picks (tables only)

def _table(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame([{"number": n, "state": s, "top1": t, "macs": m, "params": p, "latency_ms": lat}
                         for n, s, t, m, p, lat in rows])


TABLE = _table([
    (0, "COMPLETE", 80.0, 100.0, 10.0, 5.0),
    (1, "COMPLETE", 70.0, 40.0, 4.0, 2.0),
    (2, "COMPLETE", 75.0, 60.0, 6.0, 3.0),
    (3, "COMPLETE", 50.0, 35.0, 3.5, 1.9),
    (4, "RUNNING", np.nan, np.nan, np.nan, np.nan),
    (5, "FAIL", 99.0, 1.0, 1.0, 1.0),           # never a candidate, whatever it recorded
    (6, "COMPLETE", 80.0, 90.0, 9.0, 4.0),     # ties trial 0 on top-1 with fewer MACs
]).assign(pareto=[False, True, True, True, False, False, True])  # the front as the driver wrote it


def test_the_knee_is_taken_on_the_front_the_driver_wrote():
    """Export takes the front of the table's pareto column (the one the front files and the MLflow
    tags show), never one of its own: with trial 1 off that front, the knee moves."""
    moved = TABLE.assign(pareto=[False, False, True, True, False, False, True])
    assert select_trial(moved, Pick.parse("knee"), OBJECTIVES)["number"] == 2
    with pytest.raises(ExportError, match="marks no trial on the front"):
        select_trial(TABLE.drop(columns="pareto"), Pick.parse("knee"), OBJECTIVES)


def test_max_accuracy_takes_the_best_complete_trial_ties_to_fewer_macs():
    assert select_trial(TABLE, Pick.parse("max-accuracy"), OBJECTIVES)["number"] == 6


def test_limits_filter_before_max_accuracy():
    assert select_trial(TABLE, Pick.parse("max-accuracy", max_macs=70), OBJECTIVES)["number"] == 2
    assert select_trial(TABLE, Pick.parse("max-accuracy", max_params=4.0), OBJECTIVES)["number"] == 1
    assert select_trial(TABLE, Pick.parse("max-accuracy", max_latency_ms=1.95), OBJECTIVES)["number"] == 3


def test_unsatisfiable_limit_names_the_best_available_value():
    with pytest.raises(ExportError, match=r"--max-macs 10: .*smallest macs available is 35 \(trial 3"):
        select_trial(TABLE, Pick.parse("max-accuracy", max_macs=10), OBJECTIVES)


def test_knee_is_the_front_point_closest_to_the_ideal_after_scaling():
    # Front: 0 (80, 100) is dominated by 6 (80, 90); front = 6, 2, 1, 3. Scaled over the front
    # (top1 80..50, macs 35..90): 6 -> (0, 1), 2 -> (.167, .455), 1 -> (.333, .091), 3 -> (1, 0).
    assert select_trial(TABLE, Pick.parse("knee"), OBJECTIVES)["number"] == 1
    # Under a MACs limit the front shrinks to 1 and 3: both at distance 1 -> lower index wins.
    assert select_trial(TABLE, Pick.parse("knee", max_macs=45), OBJECTIVES)["number"] == 1


def test_trial_pick_and_its_errors():
    assert select_trial(TABLE, Pick.parse("trial 2"), OBJECTIVES)["number"] == 2
    assert Pick.parse("trial:2") == Pick.parse("trial 2")
    with pytest.raises(ExportError, match="no such trial"):
        select_trial(TABLE, Pick.parse("trial 42"), OBJECTIVES)
    with pytest.raises(ExportError, match="not to --pick trial N"):
        Pick.parse("trial 2", max_macs=1.0)
    with pytest.raises(ExportError, match="use max-accuracy, knee or 'trial N'"):
        Pick.parse("best")


def test_no_complete_trial_is_a_clear_error():
    with pytest.raises(ExportError, match="no COMPLETE trial yet"):
        select_trial(TABLE[TABLE["state"] != "COMPLETE"], Pick.parse("knee"), OBJECTIVES)


def test_amounts_accept_suffixes():
    assert parse_amount("350M", "--max-macs") == 3.5e8
    assert parse_amount("1.2e9", "--max-macs") == 1.2e9
    with pytest.raises(ExportError, match="--max-params: must be a positive number"):
        parse_amount("lots", "--max-params")


# ----------------------------------------------------------------------------- the exported folder

def test_export_writes_a_self_contained_folder(exported, study):
    out, result = exported
    assert result.trial == 0
    for name in ("model.safetensors", "arch.json", "README.md", "model.pt2", "model.onnx"):
        assert (out / name).is_file(), name
    assert not (out / "model.onnx.data").exists()  # a small model's ONNX weights stay inline
    arch = json.loads((out / "arch.json").read_text())
    assert arch["model_name"] == DIGITS_VIT.name
    assert arch["extra"]["classes"] == 5 and arch["extra"]["structured"] is True
    assert arch["extra"]["preprocessing"]["input_size"] == [3, 16, 16]
    assert arch["extra"]["source"] == {"study": STUDY, "trial": 0, "mlflow_run_id": None, "pick": "trial 0",
                                       "objectives": _objectives(study, 0)}
    assert any(row["kept"] and any(v is not None for v in row["kept"].values()) for row in arch["sub_blocks"])
    assert not list(out.parent.glob(".*partial"))


@pytest.mark.slow
def test_fresh_process_reproduces_logits_counts_and_top1(exported, study, tmp_path):
    """load_pruned in a new interpreter: the trial's model's logits (to fp32 rounding: two
    processes may pick different kernels), exactly the recorded params and MACs, the recorded
    top-1 (digits val set, preprocessing from arch.json), and model.pt2 agrees."""
    out, _ = exported
    from p3b_search.export.load import load_pruned

    original = load_pruned(study.trial_dir(0) / "model")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        save_file({"x": x, "logits": original(x)}, tmp_path / "io.safetensors")
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        import p3b_search
        from safetensors.torch import load_file, save_file
        folder = {str(out)!r}
        model = p3b_search.load_pruned(folder)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("optuna", "ray", "mlflow", "pandas", "pyarrow"))
        io = load_file({str(tmp_path / "io.safetensors")!r})
        program = torch.export.load(folder + "/model.pt2").module()
        with torch.no_grad():
            logits, pt2 = model(io["x"]), program(io["x"])
        save_file({{"logits": logits}}, {str(tmp_path / "fresh.safetensors")!r})
        from p3b_search.cost import model_cost, torch_macs
        from p3b_search.data.digits import digits_datasets
        from p3b_search.training.loop import evaluate
        prep = model.pretrained_cfg
        _, val, _ = digits_datasets("target", prep["input_size"][-1], prep["mean"], prep["std"])
        loader = torch.utils.data.DataLoader(val, batch_size=128)
        cost = model_cost(model)
        print(json.dumps({{"heavy": heavy,
                          "pt2_diff": (pt2 - logits).abs().max().item(), "params": cost.params, "macs": cost.macs,
                          "top1": evaluate(model, loader, amp=False)["top1"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    recorded = _objectives(study, 0)
    assert seen["heavy"] == []
    fresh = load_file(tmp_path / "fresh.safetensors")["logits"]
    torch.testing.assert_close(fresh, load_file(tmp_path / "io.safetensors")["logits"], rtol=1e-5, atol=1e-5)
    assert seen["pt2_diff"] < 1e-5
    assert (seen["params"], seen["macs"]) == (int(recorded["params"]), int(recorded["macs"]))
    assert abs(seen["top1"] - recorded["top1"]) < 0.1
    assert recorded["top1"] > 30.0  # the model learned something: the check is not at chance level


def test_card_states_source_figures_and_latency(exported, study):
    out, result = exported
    card = (out / "README.md").read_text()
    recorded = _objectives(study, 0)
    assert f"study {STUDY}, trial 0" in card
    assert f"top-1: **{recorded['top1']:.2f} %**" in card
    assert f"{int(recorded['params']):,}" in card and f"{int(recorded['macs']):,}" in card
    assert "| cpu | 1 |" in card and "latency ratio" in card
    assert "prune_ratio" in card and "`p3b`" in card
    assert "- residual width: per block (each sub-block keeps its own residual input and output channels)" in card
    assert "Unstructured sparsity" not in card
    assert result.bench.counts.macs < result.bench.counts.dense_macs


def test_a_shared_residual_trial_exports_narrow_says_so_and_rounds(tmp_path_factory):
    """A trial cut with one shared residual width: arch.json and the card say so, load_pruned
    rebuilds it, and --round-to keeps that width (rounding it would change its norms)."""
    layout = StudyLayout(tmp_path_factory.mktemp("shared_runs") / STUDY)
    layout.root.mkdir()
    layout.study_file.write_text(yaml.safe_dump({
        "name": STUDY, "output_dir": str(layout.root.parent), "data": {"kind": "digits"},
        "model": {"name": DIGITS_VIT.name, "overrides": DIGITS_VIT.overrides},
        "method": {"name": "p3b", "config": {"residual": "shared"}}, "objectives": ["top1", "macs"]}))
    probe = create_timm_model(DIGITS_VIT, 5)
    loaders = build_loaders(DataConfig(kind="digits", max_train_samples=128), probe, batch_size=64, seed=0)
    objectives = _make_trial(layout, 0, "shared", 0.6, loaders, train_steps=2)
    write_trials_table(layout, [_row(0, "COMPLETE", objectives)])
    out = tmp_path_factory.mktemp("shared_export")
    result = export_trial(layout.root, Pick.parse("trial 0"), out / "cut", onnx=False, bench_repeats=1)
    arch = json.loads((result.folder / "arch.json").read_text())
    assert arch["residual"]["mode"] == "shared"
    width, dense_width = len(arch["residual"]["kept"][0]), DIGITS_VIT.overrides["embed_dim"]
    card = (result.folder / "README.md").read_text()
    assert (f"- residual width: shared: one width for the embedding, every sub-block and the head "
            f"({width} of {dense_width} channels)") in card
    model = load_pruned(result.folder)
    assert model.embed_dim == width and not any(type(m).__name__ == "SlicedLinear" for m in model.modules())
    rounded = export_trial(layout.root, Pick.parse("trial 0"), out / "rounded", onnx=False, bench_repeats=1,
                           round_to=8)
    x = torch.randn(2, *get_adapter(model).input_size())
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(rounded.folder)(x), model(x), rtol=1e-4, atol=1e-5)
    assert load_pruned(rounded.folder).embed_dim == width


def test_card_shows_the_front_with_the_exported_trial_ringed(exported):
    out, result = exported
    card = (out / "README.md").read_text()
    assert (out / "front.png").is_file() and "front.png" in result.files
    assert "![Pareto front of study" in card and "this trial is ringed in blue" in card
    assert "| device | batch | runtime |" in card and "| latency ratio | MACs ratio |" in card


def test_rounded_export_keeps_the_logits_and_reports_the_rounded_macs(study, exported, tmp_path):
    plain, _ = exported
    result = export_trial(study.root, Pick.parse("trial 0"), tmp_path / "round8", onnx=False, bench_repeats=1,
                          round_to=8)
    x = torch.randn(2, *get_adapter(load_pruned(plain)).input_size())
    with torch.no_grad():
        assert (load_pruned(result.folder)(x) - load_pruned(plain)(x)).abs().max().item() <= 1e-4
    rounded = load_pruned(result.folder)
    assert result.bench.counts.macs == model_cost(rounded).macs == round(torch_macs(rounded))
    assert result.bench.counts.macs >= _objectives(study, 0)["macs"]
    assert any("rounded up to multiples of 8" in note for note in result.notes)
    with pytest.raises(ExportError, match=r"--round-to 8: trial 2 is unstructured"):
        export_trial(study.root, Pick.parse("trial 2"), tmp_path / "sparse8", onnx=False, round_to=8)
    with pytest.raises(ExportError, match=r"--round-to: must be a whole number >= 1"):
        export_trial(study.root, Pick.parse("trial 0"), tmp_path / "zero", onnx=False, round_to=0)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["compile", "onnxruntime"])
def test_bench_runs_both_models_under_the_deployed_runtime(exported, runtime):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    out, _ = exported
    report = bench(out, devices=["cpu"], batch_sizes=(1,), warmup=1, repeats=2, runtime=runtime)
    assert report.runtime == runtime and report.timings[0].pruned_ms > 0 and report.timings[0].dense_ms > 0
    assert f"runtime {runtime}" in report.table()


def test_bench_refuses_onnxruntime_off_the_cpu_before_any_compute():
    with pytest.raises(ExportError, match=r"--runtime onnxruntime: runs on the CPU here: add --device cpu"):
        check_runtime("onnxruntime", ["cuda"])


def test_unstructured_export_says_so_and_counts_non_zeros(study, tmp_path):
    result = export_trial(study.root, Pick.parse("trial 2"), tmp_path / "sparse", onnx=False, bench_repeats=2)
    card = (result.folder / "README.md").read_text()
    assert UNSTRUCTURED_NOTE in card and "no speed-up without sparse kernels" in card
    assert "non-zero MACs" in card
    recorded = _objectives(study, 2)
    counts = result.bench.counts
    assert counts.macs == counts.dense_macs == recorded["macs"]
    assert counts.params == recorded["params"] < counts.dense_params
    assert counts.nonzero_macs == recorded["nonzero_macs"] < counts.macs
    assert (result.folder / "weight_masks.safetensors").is_file()
    assert json.loads((result.folder / "arch.json").read_text())["extra"]["structured"] is False


def test_max_accuracy_never_silently_skips_a_trial_whose_model_is_gone(study, tmp_path):
    # Trial 3 is recorded as the most accurate but its model folder is gone.
    with pytest.raises(ExportError, match=r"trial 3: .*gone.*exportable trials: 0..2"):
        export_trial(study.root, Pick.parse("max-accuracy"), tmp_path / "best", onnx=False)
    below = max(_objectives(study, n)["macs"] for n in range(3))
    result = export_trial(study.root, Pick.parse("max-accuracy", max_macs=below), tmp_path / "best",
                          onnx=False, bench_repeats=1)
    assert result.trial == max(range(3), key=lambda n: _objectives(study, n)["top1"])


def test_unfinished_trial_fails_with_the_resume_command_and_a_gone_model_says_so(study, tmp_path):
    cases = ((4, r"not fine-tuned yet \(state RUNNING.*finish it with `python search.py resume .*digits-export`"),
             (3, r"model folder .*00003/model is gone.*copy trials/00003 back"))
    for number, why in cases:
        expected = f"trial {number}: .*{why}.*exportable trials: 0..2; nothing was exported"
        with pytest.raises(ExportError, match=expected):
            export_trial(study.root, Pick.parse(f"trial {number}"), tmp_path / f"t{number}", onnx=False)
        assert not (tmp_path / f"t{number}").exists()


def test_model_folder_that_differs_from_its_record_is_refused(study, tmp_path):
    copy = StudyLayout(tmp_path / STUDY)
    shutil.copytree(study.root, copy.root, ignore=shutil.ignore_patterns("00002", "00003"))
    result = copy.trial_dir(0) / "result.json"
    data = json.loads(result.read_text())
    data["objectives"]["params"] += 1
    result.write_text(json.dumps(data))
    with pytest.raises(ExportError, match="is not the trial's result; nothing was exported"):
        export_trial(copy.root, Pick.parse("trial 0"), tmp_path / "out", onnx=False)
    assert not (tmp_path / "out").exists()


def test_register_needs_the_trial_s_mlflow_run(study, tmp_path):
    with pytest.raises(ExportError, match="--register digits-vit: trial 0 has no MLflow run"):
        export_trial(study.root, Pick.parse("trial 0"), tmp_path / "out", register="digits-vit",
                     registrar=register_model)
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_not_overwritten_without_asking(exported, study):
    out, _ = exported
    with pytest.raises(ExportError, match="exists and is not empty.*--overwrite"):
        export_trial(study.root, Pick.parse("trial 1"), out, onnx=False)


# ----------------------------------------------------------------------------- bench and command line

def test_bench_compares_against_the_dense_parent(exported):
    out, _ = exported
    report = bench(out, devices=["cpu"], batch_sizes=(1, 8), warmup=1, repeats=3)
    assert [(t.device, t.batch_size) for t in report.timings] == [("cpu", 1), ("cpu", 8)]
    assert all(t.pruned_ms > 0 and t.dense_ms > 0 for t in report.timings)
    assert 0 < report.counts.macs_ratio < 1
    table = report.table()
    assert "latency ratio" in table and f"{report.counts.macs_ratio:.3f}" in table


def test_cli_export_and_bench(study, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(study.root), "--pick", "trial", "1", "--out", str(out), "--no-onnx"]) == 0
    assert "exported trial 1" in capsys.readouterr().out
    assert (out / "model.pt2").is_file() and not (out / "model.onnx").exists()
    assert main(["bench", str(out), "--batch-sizes", "1", "--repeats", "2", "--threads", "1",
                 "--json", str(tmp_path / "b.json")]) == 0
    assert "MACs ratio" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["timings"][0]["batch_size"] == 1
    assert main(["export", STUDY, "--output-dir", str(study.root.parent), "--pick", "max-accuracy",
                 "--max-macs", "1", "--out", str(tmp_path / "none")]) == 2
    assert "no COMPLETE trial qualifies" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", str(out), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_register_logs_pt2_into_the_trial_run_and_sets_alias_best(study, tmp_path):
    from mlflow import MlflowClient

    copy = StudyLayout(tmp_path / STUDY)
    shutil.copytree(study.root, copy.root, ignore=shutil.ignore_patterns("00002", "00003"))
    client = MlflowClient(copy.default_tracking_uri())
    experiment = client.create_experiment(STUDY, artifact_location=copy.mlflow_artifacts.as_uri())
    run = client.create_run(experiment, run_name="trial-0")
    client.set_terminated(run.info.run_id, "FINISHED")
    rows = pq.read_table(copy.trials_table).to_pylist()
    rows[0]["mlflow_run_id"] = run.info.run_id
    write_trials_table(copy, rows)

    result = export_trial(copy.root, Pick.parse("trial 0"), tmp_path / "out", register="digits-vit",
                          onnx=False, bench_repeats=1, registrar=register_model)
    version = client.get_model_version_by_alias("digits-vit", "best")
    assert int(version.version) == result.registered_version and version.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert artifacts == {"export/README.md", "export/arch.json"}

    import mlflow

    from p3b_search.export.load import load_pruned

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(copy.default_tracking_uri())
    try:
        registered = mlflow.pytorch.load_model("models:/digits-vit@best")  # pt2: no pickle
    finally:
        mlflow.set_tracking_uri(previous)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(registered(x), load_pruned(result.folder)(x), rtol=1e-4, atol=1e-5)

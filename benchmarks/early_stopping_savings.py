"""What early stopping saves, and what it costs the front: a study run with and without it.

    python benchmarks/early_stopping_savings.py studies/prune_stage_stopping.yaml --seeds 0 1 2
    python benchmarks/early_stopping_savings.py studies/prune_stage_stopping.yaml --seeds 0 1 2 \
        --from-parquet benchmarks/results/prune_stage_stopping_savings.parquet      # the table only

For each sampler seed the study runs twice, with ``early_stopping.enabled`` false and true (folders
``<output_dir>/<name>-off-s<seed>`` and ``-on-s<seed>``; a finished one is read, not run again;
the two arms of a seed run one after the other, off first). Per run it counts the **trial-epochs**
trained (``epochs_done`` summed over trials: the compute spent, in units of one epoch of one
trial) and the **normalised hypervolume** of the COMPLETE trials' front: the hypervolume against
the study's reference point (top-1 0 %, the dense model's MACs) divided by the box from that
point to (top-1 100 %, MACs 0), so 1.0 would be a model at 100 % for free. Then, over seeds: the
compute saved (1 - on / off trial-epochs) and the hypervolume difference (on - off) with its 95 %
t interval, paired by seed, with two one-sided tests of equivalence within ``--margin`` (default 0.01)
and the minimum detectable difference.

Writes ``<out>/<name>_savings.md`` and ``.parquet`` and prints the table. With ``--from-parquet``
it runs nothing: it reads the per-run rows of an earlier run (the ``.parquet`` it wrote) and writes
the same ``.md`` from them, the command in it being the run's (without ``--from-parquet``).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

from p3b_search.study.trials_table import EPOCHS_DONE, FAIL, PRUNED, STATE

HV_MARGIN = 0.01  # normalised hypervolume: the equivalence margin declared for issue 22's goal


def arm(study, seed: int, stopping: bool):
    """The study with the sampler seed and early stopping of one arm, in its own folder."""
    name = f"{study.name}-{'on' if stopping else 'off'}-s{seed}"
    from p3b_search.study.loading import with_overrides

    return with_overrides(study, name=name, sampler={**study.sampler.model_dump(), "seed": seed},
                          early_stopping={**study.early_stopping.model_dump(), "enabled": stopping})


def measure(study) -> dict[str, float]:
    """Trial-epochs, stopped trials and normalised hypervolume of a finished study."""
    from p3b_search.study.summary import study_summary

    outcome = study_summary(study)
    trials = outcome.trials
    top1_index = study.metric_names.index("top1")
    box = 1.0
    for i, (name, reference) in enumerate(zip(study.metric_names, outcome.reference)):
        box *= (100.0 - reference) if i == top1_index else reference
    return {"trials": len(trials), "stopped": int((trials[STATE] == PRUNED).sum()),
            "failed": int((trials[STATE] == FAIL).sum()), "trial_epochs": int(trials[EPOCHS_DONE].sum()),
            "front": len(outcome.front), "hypervolume": outcome.hypervolume, "hv_normalised": outcome.hypervolume / box,
            "wall_s": float(trials["duration_s"].sum())}


def run_arms(base, seeds: list[int], cpus: int | None) -> pd.DataFrame:
    """Runs (or reads, when finished) both arms of every seed; one row per arm: ``seed``,
    ``stopping`` and the figures of :func:`measure`."""
    from p3b_search.launch import run_study
    from p3b_search.study.summary import study_finished

    rows = []
    for seed in seeds:
        for stopping in (False, True):
            study = arm(base, seed, stopping)
            if not study_finished(study):
                print(f"running {study.name} ...", flush=True)
                outcome = run_study(study, resume=study.layout.root.exists(), num_cpus=cpus)
                if outcome.interrupted:
                    sys.exit(f"{study.name} was interrupted: run the command again to continue")
            rows.append({"seed": seed, "stopping": stopping, **measure(study)})
    return pd.DataFrame(rows)


def markdown(name: str, runs: pd.DataFrame, command: str, margin: float = HV_MARGIN) -> str:
    """The per-run table, the compute saved and the hypervolume difference (with its equivalence
    test within ``margin`` of normalised hypervolume) as Markdown."""
    from p3b_search.stats import (
        ALPHA,
        equivalence_p,
        minimum_detectable_difference,
        paired_difference,
        paired_t_test,
        t_interval,
    )

    off, on = (runs[runs["stopping"] == flag].set_index("seed") for flag in (False, True))
    saved = 1 - on["trial_epochs"] / off["trial_epochs"]
    saved_ci = t_interval(saved.dropna())
    hv_on, hv_off = on["hv_normalised"].to_dict(), off["hv_normalised"].to_dict()
    hv = paired_difference(hv_on, hv_off)
    tost = equivalence_p(hv_on, hv_off, margin)
    mdd = minimum_detectable_difference(paired_t_test(hv_on, hv_off).sd, hv.n)
    lines = [f"# Early stopping savings: study `{name}`", "", "    " + command, "",
             "| seed | early stopping | trials | stopped | failed | trial-epochs | trial seconds | front | "
             "normalised hypervolume |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs.sort_values(["seed", "stopping"]).itertuples():
        lines.append(f"| {r.seed} | {'on' if r.stopping else 'off'} | {r.trials} | {r.stopped} | {r.failed} | "
                     f"{r.trial_epochs} | {r.wall_s:.0f} | {r.front} | {r.hv_normalised:.4f} |")
    lines += ["", f"Compute saved (1 - trial-epochs on / off), mean over {saved_ci.n} seeds: "
              f"**{saved_ci.mean:.1%}** (95 % CI [{saved_ci.low:.1%}, {saved_ci.high:.1%}]); per seed: "
              + ", ".join(f"{s}: {v:.1%}" for s, v in saved.items()) + ".",
              f"Normalised hypervolume, on - off, paired by seed: **{hv.mean:+.4f}** "
              f"(95 % CI [{hv.low:+.4f}, {hv.high:+.4f}], n = {hv.n}): "
              + ("not separated from 0" if not hv.excludes_zero else
                 ("separated: stopping " + ("raised" if hv.mean > 0 else "lowered") + " it"))
              + f"; equivalence within ±{margin:g} (two one-sided tests): p = {tost:.3f}, "
              + ("equivalent." if tost < ALPHA else "not shown equivalent.")
              + f" Minimum detectable difference (80 % power): {mdd:.4f}."]
    return "\n".join(lines) + "\n"


def run_command(argv: list[str], program: str = "python benchmarks/early_stopping_savings.py") -> str:
    """The command that runs the studies: ``program`` with ``argv`` (``sys.argv[1:]``) without
    ``--from-parquet PATH``."""
    args = list(argv)
    if "--from-parquet" in args:
        i = args.index("--from-parquet")
        del args[i:i + 2]
    return program + " " + " ".join(shlex.quote(a) for a in args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="the study file (its early_stopping settings are the 'on' arm)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cpus", type=int, default=None, help="CPUs local Ray may use (default: all)")
    parser.add_argument("--margin", type=float, default=HV_MARGIN, help="equivalence margin, normalised hypervolume")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--from-parquet", type=Path, default=None, metavar="PATH",
                        help="run nothing: write the table from the per-run rows an earlier run wrote")
    args = parser.parse_args()
    from p3b_search.study.loading import load_study

    base = load_study(args.study)
    if args.from_parquet is not None:
        runs = pd.read_parquet(args.from_parquet)
    else:
        runs = run_arms(base, args.seeds, args.cpus)
        args.out.mkdir(parents=True, exist_ok=True)
        runs.to_parquet(args.out / f"{base.name}_savings.parquet", index=False)
    text = markdown(base.name, runs, run_command(sys.argv[1:]), args.margin)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{base.name}_savings.md").write_text(text)
    print(text)

if __name__ == "__main__":
    main()

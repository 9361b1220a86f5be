"""Search efficiency: hypervolume after N trials, default sampler (TPE) vs random search.

    python -m benchmarks.search_efficiency                    # quickstart, 3 seeds x {tpe, random}
    python -m benchmarks.search_efficiency --seeds 0 1 2 3 4 --checkpoints 4 8 --out benchmarks/results/search_efficiency.md

Each run is the quickstart study (``studies/quickstart.yaml``) with only the sampler (and its
seed) replaced and MLflow tracking off, run by ``search.py run`` in a fresh process. The two
samplers alternate, so load drifts hit both alike. The hypervolume of the completed trials
among the first N (by Optuna number) is computed with ``p3b_search.study.pareto.hypervolume``
against one fixed reference, 0 % top-1 and the dense model's MACs, and normalised by the
box 100 % x dense MACs (1.0 = a 100 %-accurate model that costs nothing).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.study_variants import QUICKSTART, load_line, run_search, write_variant
from p3b_search.study.trials_table import COMPLETE, NUMBER, STATE


def hypervolumes(study_file: Path, checkpoints: list[int]) -> dict[int, float]:
    """Normalised hypervolume of the study's first N trials, for each N in ``checkpoints``."""
    from p3b_search.study.front import reference_point
    from p3b_search.study.loading import load_study
    from p3b_search.study.pareto import hypervolume
    from p3b_search.study.results import read_trials

    study = load_study(study_file)
    reference = reference_point(study)
    if study.metric_names != ["top1", "macs"]:
        raise SystemExit(f"{study_file}: objectives must be [top1, macs] for this benchmark")
    box = 100.0 * reference[1]
    frame = read_trials(study.layout).sort_values("number")
    out = {}
    for n in checkpoints:
        first = frame[(frame[NUMBER] < n) & (frame[STATE] == COMPLETE)]
        values = first[study.metric_names].to_numpy(float)
        out[n] = hypervolume(values, study.directions, reference) / box if len(first) else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=QUICKSTART, help="base study file (default: quickstart)")
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[4, 8], help="N: trials counted")
    parser.add_argument("--folder", type=Path, help="where the study files and folders go (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="p3b-search-efficiency-"))
    n_trials = max(args.checkpoints)

    results: dict[str, list[dict[int, float]]] = {s: [] for s in args.samplers}
    for seed in args.seeds:
        for sampler in args.samplers:
            path = write_variant(args.study, folder, f"hv-{sampler}-s{seed}", sampler={"name": sampler, "seed": seed},
                                 tracking={"enabled": False}, n_trials=n_trials)
            wall = run_search(path)
            results[sampler].append(hypervolumes(path, args.checkpoints))
            shown = ", ".join(f"N={n}: {v:.4f}" for n, v in results[sampler][-1].items())
            print(f"{sampler} seed {seed}: {shown} ({wall:.0f} s; {load_line()})", flush=True)

    header = "| sampler | " + " | ".join(f"hypervolume after {n} trials" for n in args.checkpoints) + " |"
    rows = [header, "|---|" + "---|" * len(args.checkpoints)]
    for sampler, runs in results.items():
        cells = []
        for n in args.checkpoints:
            values = [r[n] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        rows.append(f"| {sampler} | " + " | ".join(cells) + " |")
    table = (f"{args.study.name}, seeds {args.seeds}, mean ± std (sample) of the normalised hypervolume "
             f"(reference 0 % top-1, dense MACs)\n\n" + "\n".join(rows))
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""p3b-search: find the best pruned vision transformer for your data set.

Optuna proposes pruning settings, Ray Tune trains them (prune stage, then fine-tune), MLflow
records every trial, and you pick a model from the accuracy / MACs Pareto front.

  python search.py run studies/quickstart.yaml     # a 5-minute CPU demo (embedded digits data)
  python search.py status quickstart               # trials so far and the current front
  python search.py pareto quickstart               # the front as a table
  python search.py compare method_comparison       # methods x prune ratios over seeds, every pair tested
  python search.py ui quickstart                   # MLflow UI on http://127.0.0.1:5000
  python search.py export quickstart --pick knee --out pruned/   # the chosen model
  python search.py resume quickstart               # continue an interrupted study

A study is a YAML file (see studies/); its results live in <output_dir>/<name>/ (default
runs/<name>/). NAME is that folder, the study file, or a study name under --output-dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXPORT_COMMANDS = ("export", "bench")


def _print_front(outcome) -> None:
    from p3b_search.study.tables import table_text

    study = outcome.study
    print(f"\nPareto front of {study.name} ({len(outcome.front)} of {outcome.pareto.trials_finished} finished trials; "
          f"{' / '.join(f'{n} ({d})' for n, d in zip(study.metric_names, study.directions))}):")
    print(table_text(outcome.front, study.metric_names, outcome.dense))
    reference = ", ".join(f"{n}={v:.4g}" for n, v in zip(study.metric_names, outcome.reference))
    print(f"hypervolume {outcome.hypervolume:.6g} (reference point: {reference}); {_normalized(outcome)}")
    if outcome.dense is not None:
        print(outcome.dense.describe())
    if study.shared_prefixes:
        print(f"shared prefixes: {outcome.trial_epochs_shared} trial-epochs restored from "
              f"{study.layout.prefixes} instead of trained")


def _normalized(outcome) -> str:
    """The normalised hypervolume, or why there is none."""
    value = outcome.hypervolume_normalized
    if value == value:  # not NaN
        return f"normalised {value:.3f} (1.0 = dense accuracy at zero cost)"
    return "normalised: n/a (dense accuracy unknown: set dense_reference.top1 in the study file or run a dense trial)"


def _hints(folder: Path) -> None:
    print(f"\nresults:   {folder}  (trials.parquet, allocations.parquet)")
    print(f"MLflow UI: python search.py ui {folder}")
    print(f"export:    python search.py export {folder} --pick knee --out {folder.name}-knee/")


def _run(args: argparse.Namespace) -> int:
    from p3b_search.launch import run_study
    from p3b_search.study.loading import load_study, with_overrides

    _import_objective(args.objective)  # a custom objective may register its own methods
    study = load_study(args.study)
    changes = {k: v for k, v in (("n_trials", args.trials), ("name", args.name), ("output_dir", args.output_dir))
               if v is not None}
    if changes:
        study = with_overrides(study, **changes)
    return _finish(run_study(study, address=args.address, objective=args.objective or _default_objective(),
                             num_cpus=args.cpus, verbose=args.verbose))


def _import_objective(objective: str | None) -> None:
    """Import the module of ``--objective MODULE:FUNCTION`` (one-line error when it cannot be)."""
    from p3b_search.study.messages import StudyError

    if not objective:
        return
    module, _, function = objective.partition(":")
    try:
        imported = __import__(module, fromlist=["_"])
    except ImportError as error:
        raise StudyError(f"--objective {objective}: cannot import {module!r} ({error}): check the module name "
                         "and that it is importable here (PYTHONPATH)") from None
    if not callable(getattr(imported, function or "run_trial", None)):
        raise StudyError(f"--objective {objective}: module {module!r} has no function "
                         f"{function or 'run_trial'!r}: name one with the run_trial signature")


def _positive_int(text: str) -> int:
    """argparse type of counts: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return value


def _default_objective() -> str:
    from p3b_search.search.trainable import DEFAULT_OBJECTIVE

    return DEFAULT_OBJECTIVE


def _resume(args: argparse.Namespace) -> int:
    from p3b_search.launch import run_study
    from p3b_search.study.loading import study_folder, study_from_folder

    _import_objective(args.objective)
    study = study_from_folder(study_folder(args.study, args.output_dir))
    return _finish(run_study(study, resume=True, address=args.address, objective=args.objective or _default_objective(),
                             num_cpus=args.cpus, verbose=args.verbose))


def _finish(outcome) -> int:
    _print_front(outcome)
    minutes, seconds = divmod(int(outcome.elapsed_s), 60)
    print(f"{'interrupted' if outcome.interrupted else 'finished'} after {minutes}m{seconds:02d}s")
    if outcome.interrupted:
        print(f"continue with: python search.py resume {outcome.study.layout.root}")
    _hints(outcome.study.layout.root)
    return 130 if outcome.interrupted else 0


def _status(args: argparse.Namespace) -> int:
    from p3b_search.search.driver_record import DriverRecord
    from p3b_search.study.front_report import history_line
    from p3b_search.study.loading import study_folder, study_from_folder
    from p3b_search.study.summary import study_summary
    from p3b_search.study.tables import table_text
    from p3b_search.study.trials_table import NEVER_RAN, STATE, STATE_WORDS, ended_count

    folder = study_folder(args.study, args.output_dir)
    outcome = study_summary(study_from_folder(folder))
    frame = outcome.trials
    counts = frame[STATE].value_counts().to_dict() if len(frame) else {}
    shown = [s for s in STATE_WORDS if s != NEVER_RAN or counts.get(s)]
    print(f"study {outcome.study.name} in {folder}: {outcome.study.n_trials} trials planned, "
          f"{ended_count(frame[STATE])} ended ({'not finished' if outcome.interrupted else 'finished'}); "
          + ", ".join(f"{counts.get(s, 0)} {STATE_WORDS[s]}" for s in shown))
    driver = DriverRecord(outcome.study.layout.driver_record).driver_state()
    if driver:
        print(driver)
    print(table_text(frame, outcome.study.metric_names, outcome.dense))
    _print_front(outcome)
    history = history_line(outcome.pareto.history)
    if history:
        print(history)
    return 0


def _pareto(args: argparse.Namespace) -> int:
    from p3b_search.study.loading import study_folder, study_from_folder
    from p3b_search.study.summary import study_summary

    outcome = study_summary(study_from_folder(study_folder(args.study, args.output_dir)))
    if args.csv:
        outcome.front.to_csv(sys.stdout, index=False)
    else:
        _print_front(outcome)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from p3b_search.study.compare import (
        CORE_METHOD,
        compare_methods,
        compare_plan,
        core_benefits,
        trial_allocations,
        trial_results,
    )
    from p3b_search.study.compare_report import markdown, title, write_comparison
    from p3b_search.study.loading import load_study, study_folder, study_from_folder
    from p3b_search.study.results import read_trials
    from p3b_search.tracking.figures import write_comparison_figures

    study = study_from_folder(study_folder(args.study, args.output_dir))
    named = Path(args.study).expanduser()
    section = load_study(named).compare if named.is_file() else study.compare  # a study file's section wins
    plan = compare_plan(study, section, args.primary, args.margin, args.equivalence)
    results = trial_results(study, read_trials(study.layout))
    comparison = compare_methods(results, plan, study.candidate_methods())
    if results.empty:
        print(title(study, comparison) + "\n(no finished trials yet)")
        return 0
    print(markdown(study, comparison), end="")
    if args.out:
        prefix = Path(args.out).expanduser()
        allocations = trial_allocations(study, results)
        benefits = core_benefits(allocations)
        paths = write_comparison(study, comparison, benefits, prefix)
        for path in paths + write_comparison_figures(allocations, benefits, CORE_METHOD, prefix):
            print(f"wrote {path}")
    return 0


def _positive_float(text: str) -> float:
    """argparse type of margins: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0 (got {text!r})")
    return value


def _ui(args: argparse.Namespace) -> int:
    from p3b_search.credentials import MissingVariable, redact_secrets
    from p3b_search.study.loading import study_folder, study_from_folder
    from p3b_search.study.messages import StudyError
    from p3b_search.tracking.ui import experiment_route, serve_ui

    study = study_from_folder(study_folder(args.study, args.output_dir))
    uri = study.tracking_uri
    try:
        route = experiment_route(uri, study.name)
    except MissingVariable as error:
        raise StudyError(f"{study.source}: {error}") from None
    if uri.startswith(("http://", "https://")):
        print(f"study {study.name} logs to the tracking server: {redact_secrets(uri).rstrip('/')}/{route}")
        return 0
    print(f"MLflow UI for {study.name}: http://127.0.0.1:{args.port}/{route}\n"
          "(Ctrl-C to stop; list the front with the filter tags.pareto = \"true\")")
    return serve_ui(uri, args.port)


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """The command line's parser, and its command names in the order of its help."""
    parser = argparse.ArgumentParser(prog="search.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def study_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("study", metavar="NAME", help="study folder, study file, or study name under --output-dir")
        p.add_argument("--output-dir", default="runs", help="where studies live (default: runs)")

    def ray_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="join a running Ray cluster ('auto', HEAD:6379 or ray://HEAD:10001) "
                                         "instead of starting Ray on this machine; the study folder must be on "
                                         "shared storage")
        p.add_argument("--cpus", type=_positive_int, help="CPUs local Ray may use (default: all)")
        p.add_argument("--verbose", action="store_true", help="show Ray's and the trials' own output")
        p.add_argument("--objective", metavar="MODULE:FUNCTION",
                       help="run another objective with the run_trial signature (default: "
                            "objectives.prune_finetune:run_trial)")

    run = sub.add_parser("run", help="start a study from a study file",
                         description="Start a study: validate the file, then run its trials with Ray Tune.")
    run.add_argument("study", metavar="STUDY.yaml", help="the study file (see studies/)")
    run.add_argument("--trials", type=_positive_int, help="number of trials (overrides n_trials)")
    run.add_argument("--name", help="study name (overrides name; results go to <output_dir>/<name>)")
    run.add_argument("--output-dir", help="where the study folder is created (overrides output_dir)")
    ray_args(run)
    run.set_defaults(handler=_run)

    resume = sub.add_parser("resume", help="continue an interrupted study (no trial lost or repeated)")
    study_arg(resume)
    ray_args(resume)
    resume.set_defaults(handler=_resume)

    status = sub.add_parser("status", help="trials so far and the current Pareto front (also while it runs)")
    study_arg(status)
    status.set_defaults(handler=_status)

    pareto = sub.add_parser("pareto", help="the Pareto front as a table")
    study_arg(pareto)
    pareto.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    pareto.set_defaults(handler=_pareto)

    compare = sub.add_parser("compare", help="methods x prune ratios over seeds: top-1 with 95 %% CIs, kept "
                                             "params, MACs; every pair of methods by paired t tests, Holm-adjusted",
                             description="Compare the methods of a study (e.g. studies/method_comparison.yaml) "
                                         "per prune ratio over its seeds: every pair by a paired t test, "
                                         "Holm-adjusted over all pairs of the report, Friedman's omnibus per "
                                         "ratio, equivalence (TOST) for the declared pairs, and top-1 at the "
                                         "primary method's MACs. Options win over the study file's compare "
                                         "section.")
    study_arg(compare)
    compare.add_argument("--primary", metavar="A:B", help="the declared primary comparison, e.g. "
                                                          "p3b:global-taylor: reported first, tested for "
                                                          "equivalence, and A's MACs are where every method's "
                                                          "top-1 is matched")
    compare.add_argument("--equivalence", metavar="A:B", action="append",
                         help="also test A and B for equivalence within the margin (repeatable)")
    compare.add_argument("--margin", type=_positive_float, metavar="POINTS",
                         help="equivalence margin in top-1 points (default: the study file's, else 1)")
    compare.add_argument("--out", metavar="PREFIX", help="also write PREFIX.md, PREFIX.parquet (methods), "
                                                         "PREFIX_pairs.parquet, PREFIX_omnibus.parquet and, when "
                                                         "the trials recorded allocations, PREFIX_depth.png")
    compare.set_defaults(handler=_compare)

    ui = sub.add_parser("ui", help="open the MLflow UI on the study's tracking store (127.0.0.1)")
    study_arg(ui)
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui.set_defaults(handler=_ui)

    sub.add_parser("export", help="export a trial's pruned model (see: search.py export --help)", add_help=False)
    sub.add_parser("bench", help="benchmark an exported model against its dense parent "
                                 "(see: search.py bench --help)", add_help=False)
    return parser, list(sub.choices)  # the subparsers action's public Action.choices: name -> parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in EXPORT_COMMANDS:
        from p3b_search.export.cli import main as export_main
        from p3b_search.tracking.registry import register_model

        return export_main(argv, registrar=register_model)
    from p3b_search.study.messages import StudyError, did_you_mean

    parser, commands = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        parser.error(f"unknown command '{argv[0]}': {did_you_mean(argv[0], commands)}"
                     f"choose one of {', '.join(commands)}")
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

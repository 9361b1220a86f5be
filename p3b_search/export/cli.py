"""Command line of ``search.py export`` and ``search.py bench``::

    search.py export NAME --pick {max-accuracy | knee | trial N} --out DIR
                     [--max-macs X] [--max-params X] [--max-latency MS] [--register MODEL_NAME]
                     [--round-to N] [--overwrite] [--no-onnx] [--output-dir runs]
    search.py bench DIR [--batch-sizes 1 64] [--repeats 10] [--warmup 3] [--device cpu ...] [--threads N]
                    [--runtime eager|compile|onnxruntime] [--json FILE]

``NAME``: a study folder, a study file (its ``output_dir``/``name``), or a study name under
``--output-dir``. Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from p3b_search.export.load import ExportError
from p3b_search.export.runtimes import RUNTIMES

if TYPE_CHECKING:
    from p3b_search.export.writer import ModelRegistrar


def _study_folder(name: str, output_dir: str) -> Path:
    """:func:`p3b_search.study.loading.study_folder`, its error as an :class:`ExportError`."""
    from p3b_search.study.loading import study_folder
    from p3b_search.study.messages import StudyError

    try:
        return study_folder(name, output_dir)
    except StudyError as error:
        raise ExportError(str(error)) from None


def _export_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export a trial's pruned model to a self-contained folder")
    parser.add_argument("study", metavar="NAME", help="study folder, study file, or study name under --output-dir")
    parser.add_argument("--pick", nargs="+", required=True, metavar="RULE",
                        help="max-accuracy | knee | trial N")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (must be empty or new)")
    parser.add_argument("--max-macs", help="max-accuracy/knee among trials with at most this many MACs per image "
                                           "(e.g. 1.2e9 or 350M)")
    parser.add_argument("--max-params", help="... with at most this many parameters (e.g. 5M)")
    parser.add_argument("--max-latency", help="... with at most this recorded latency in ms")
    parser.add_argument("--register", metavar="MODEL_NAME",
                        help="also log the model to the trial's MLflow run, register it and set alias 'best'")
    parser.add_argument("--round-to", type=int, default=1, metavar="N",
                        help="round kept widths up to multiples of N (8 or 16 suit CPU/GPU kernels) with zero "
                             "units: same logits, a few more MACs, faster kernels (default 1: as trained)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-onnx", action="store_true", help="do not write model.onnx")
    parser.add_argument("--output-dir", default="runs", help="where studies live (default: runs)")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="latency/throughput of an exported model against its dense parent")
    parser.add_argument("folder", metavar="DIR", type=Path, help="a folder written by `search.py export`")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64],
                        help="batch sizes (default 1 64; above 1 halved if memory or time requires)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--device", nargs="+", dest="devices", help="default: cpu, plus cuda when present")
    parser.add_argument("--threads", type=int, help="CPU threads torch may use (default: torch's choice)")
    parser.add_argument("--runtime", default="eager", choices=RUNTIMES,
                        help="how both models run: eager PyTorch (default), torch.compile, or ONNX Runtime (CPU; "
                             "needs pip install 'p3b-search[onnx]')")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")


def build_parser(prog: str = "search.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)
    _export_parser(sub)
    _bench_parser(sub)
    return parser


def _run_export(args: argparse.Namespace, registrar: ModelRegistrar | None) -> None:
    from p3b_search.export.picks import Pick, parse_amount
    from p3b_search.export.writer import export_trial

    limits = {key: parse_amount(value, option) for key, value, option in (
        ("max_macs", args.max_macs, "--max-macs"), ("max_params", args.max_params, "--max-params"),
        ("max_latency_ms", args.max_latency, "--max-latency")) if value is not None}
    pick = Pick.parse(" ".join(args.pick), **limits)
    folder = _study_folder(args.study, args.output_dir)
    result = export_trial(folder, pick, args.out, args.register, overwrite=args.overwrite, onnx=not args.no_onnx,
                          round_to=args.round_to, registrar=registrar)
    print(f"exported trial {result.trial} of {folder} ({pick.describe()}) to {result.folder}: "
          f"{', '.join(result.files)}")
    for note in result.notes:
        print(f"note: {note}")
    print(result.bench.table())
    if result.registered_version is not None:
        print(f"registered as {args.register} version {result.registered_version} (alias 'best')")


def _run_bench(args: argparse.Namespace) -> None:
    import torch

    from p3b_search.export.bench import bench, default_devices
    from p3b_search.export.runtimes import check_runtime

    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0 or (args.threads or 1) < 1:
        raise ExportError("--batch-sizes, --repeats and --threads must be >= 1, --warmup >= 0")
    devices = args.devices
    if devices and any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device is available here: use --device cpu")
    check_runtime(args.runtime, devices or default_devices())
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench(args.folder, devices=devices, batch_sizes=tuple(args.batch_sizes), warmup=args.warmup,
                   repeats=args.repeats, runtime=args.runtime)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=1))


def main(argv: Sequence[str] | None = None, prog: str = "search.py",
         registrar: ModelRegistrar | None = None) -> int:
    """Run ``export`` or ``bench`` (``argv`` starts with the subcommand); returns the exit status.
    ``registrar``: what ``export --register`` registers the model with (the command line passes
    the tracking layer's :func:`~p3b_search.tracking.registry.register_model`)."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "export":
            _run_export(args, registrar)
        else:
            _run_bench(args)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

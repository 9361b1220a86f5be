#!/usr/bin/env bash
# The GPU check: what only a CUDA machine can show, in one run of at most about 8 minutes.
#
#     bash benchmarks/gpu_check.sh [OUT]     # OUT: logs and figures (default $OUT, else gpu_check_out)
#     PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh     # another interpreter than `python`
#
# Needs the project installed (pip install -e ".[test]") with a CUDA build of torch. Steps, each
# logged to OUT/<step>.log, with a summary in OUT/summary.md to paste into RESULTS.md:
#   1. the CUDA tests (those skipped without CUDA: bf16 autocast in training, bench on cuda);
#   2. P3B vs dense step time, deit_small at 224 px, batch 64, bf16 autocast: P3B's defaults and
#      the full block-benefit computation (aux_batch_fraction 1, aux_every 1), alternated;
#   3. a 2-trial study with gpu: 0.5 per trial (studies/gpu_check.yaml), both trials at once;
#   4. its knee exported and benchmarked on the GPU (and the CPU) at batch 1 and 64.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
py="${PYTHON:-python}"   # e.g. PYTHON=.venv/bin/python
mkdir -p "$out"
summary="$out/summary.md"
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log, record the outcome
    local name="$1" limit="$2"; shift 2
    local start=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "- $name: exit $rc after $(( $(date +%s) - start )) s (\`$*\`)" >> "$summary"
    [ "$rc" -eq 0 ] || status=1
}
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
    "$py" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}')"
    echo
} > "$summary"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "CUDA is not available: nothing to check" | tee -a "$summary"; exit 1; }

step cuda_tests 120 "$py" -m pytest -q -p no:cacheprovider -k "cuda" tests/training/test_training.py tests/export/test_export.py
step p3b_step_ratio 180 "$py" -m benchmarks.p3b_overhead --model deit_small --device cuda --threads 4 \
    --repeats 3 --epochs 1 --steps 12 --variant default: --variant full:aux_batch_fraction=1,aux_every=1
step study_two_trials_one_gpu 150 "$py" search.py run studies/gpu_check.yaml --output-dir "$out/runs"
step export_knee 60 "$py" search.py export gpu_check --output-dir "$out/runs" --pick knee --out "$out/export" --overwrite
step bench_export 60 "$py" search.py bench "$out/export" --device cuda cpu --batch-sizes 1 64 --json "$out/bench.json"

{
    echo
    echo "## P3B / dense step time (deit_small, 224 px, batch 64, bf16)"
    grep -A 6 "^deit_small" "$out/p3b_step_ratio.log"
    echo
    echo "## The 2-trial study (gpu: 0.5 each)"
    tail -n 12 "$out/study_two_trials_one_gpu.log"
    echo
    echo "## Exported knee, latency"
    tail -n 12 "$out/bench_export.log"
} >> "$summary" 2>&1
cat "$summary"
exit "$status"

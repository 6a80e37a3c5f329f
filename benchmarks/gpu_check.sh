#!/usr/bin/env bash
# One call that proves gkd's GPU paths and measures them, in ≤ 8 minutes on one H200-class GPU:
#   0. environment and installs (wheels carried in .whl/ by benchmarks/gpu_wheels.sh; vLLM only if
#      importable there: its wheel pins its own torch and is far over what can be carried)
#   1. the GPU-marked tests (tests/test_gpu.py: bf16 GKD step, chunked / fused losses on the device vs a
#      float64 reference, our sampler vs HF generate greedy, vLLM rollout vs our sampler)
#   2. the real pair, gkd vs TRL's GKDTrainer, 30 steps each, bf16 (bench_real_pair.py)
#   3. the loss's memory at V = 151,936 on CUDA (bench_loss_memory.py)
#   4. speculative teacher-mixed sampling vs plain sampling + scoring (bench_rollout.py)
# Every step runs under its own time budget and is recorded even when it fails; JSON results and
# logs go to --out (default benchmarks/results/gpu), a summary table is printed at the end, and
# --bundle FILE packs the folder into one archive (the device tool brings back few files).
#   bash benchmarks/gpu_check.sh                    # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run          # on CPU, tiny sizes, seconds (the test suite runs this)
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
OUT_DIR="$ROOT/benchmarks/results/gpu"
BUNDLE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --bundle) BUNDLE="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out DIR, --bundle FILE)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
       TRL_EXPERIMENTAL_SILENCE=1 GKD_CACHE="${GKD_CACHE:-$OUT_DIR/cache}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/steps.jsonl"
T_START=$(date +%s)

step() {  # step NAME BUDGET_SECONDS COMMAND...: run, log, record {"step", "rc", "seconds"}
  local name=$1 budget=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (budget ${budget}s): $*"
  timeout "$budget" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$? t1=$(date +%s)
  tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/   /'
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((t1 - t0)), \"timed_out\": $([ $rc -eq 124 ] && echo true || echo false)}" >> "$OUT_DIR/steps.jsonl"
}

# 0. environment, installs
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl > /dev/null 2>&1; then
  step install 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gkd-site "$ROOT"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gkd-site"
fi
step environment 120 $PY - "$OUT_DIR/environment.json" <<'PYEOF'
import importlib, json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "packages": {}}
for name in ("transformers", "accelerate", "peft", "trl", "datasets", "deepspeed", "vllm"):
    try:
        info["packages"][name] = importlib.import_module(name).__version__
    except Exception as e:  # noqa: BLE001 - report, never fail the check here
        info["packages"][name] = f"missing ({type(e).__name__})"
if not str(info["packages"]["vllm"])[0].isdigit():
    info["vllm_note"] = ("vLLM is not installed on this machine and cannot be carried (its wheel pins its own torch and "
                         "is far over the 64 MiB a call may carry): the vLLM test is skipped")
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PYEOF

if [ $DRY -eq 1 ]; then
  DEV=cpu
  # side by side, one thread each: the dry run checks that every step runs, not how fast (it is the test
  # suite's slowest test otherwise); the GPU run below keeps them one after another, timed alone
  export OMP_NUM_THREADS=1
  step gpu_tests 300 env GKD_TEST_DEVICE=cpu ACCELERATE_USE_CPU=true $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml" &
  step real_pair 300 $PY benchmarks/bench_real_pair.py --tiny --steps 2 --reps 1 --batch 2 --new-tokens 8 --out "$OUT_DIR" &
  step loss_memory 300 $PY benchmarks/bench_loss_memory.py --quick --device cpu --methods trl_gkd,ours_fused --out "$OUT_DIR" &
  step rollout 300 $PY benchmarks/bench_rollout.py --quick --reps 1 --out "$OUT_DIR" &
  wait
else
  DEV=cuda
  step gpu_tests 90 env GKD_TEST_DEVICE=cuda $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml"
  step real_pair 150 $PY benchmarks/bench_real_pair.py --steps 30 --reps 1 --out "$OUT_DIR"
  step loss_memory 120 $PY benchmarks/bench_loss_memory.py --device cuda --out "$OUT_DIR"
  step rollout 60 $PY benchmarks/bench_rollout.py --size medium --reps 2 --out "$OUT_DIR"
fi

T_END=$(date +%s)
echo "{\"step\": \"total\", \"rc\": 0, \"seconds\": $((T_END - T_START)), \"device\": \"$DEV\", \"dry_run\": $([ $DRY -eq 1 ] && echo true || echo false)}" >> "$OUT_DIR/steps.jsonl"
$PY benchmarks/gpu_summary.py "$OUT_DIR" | tee "$OUT_DIR/summary.md"
rc=${PIPESTATUS[0]}
if [ -n "$BUNDLE" ]; then
  tar -czf "$BUNDLE" -C "$(dirname "$OUT_DIR")" --exclude cache "$(basename "$OUT_DIR")"
fi
exit $rc

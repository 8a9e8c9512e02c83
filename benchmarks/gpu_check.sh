#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and the codeq source tree:
#
#   bash benchmarks/gpu_check.sh            # PY=/path/to/python to pick the interpreter
#   SLOW=1 bash benchmarks/gpu_check.sh     # also the slow tests (> 2^24 elements)
#
# 1. builds and installs codeq (pip install --no-build-isolation --no-deps .),
#    keeping the ptxas register/spill report of every kernel;
# 2. runs the CUDA tests (tests/test_cuda.py, -m cuda) and the host emulation
#    of the radix select;
# 3. runs compute-sanitizer memcheck, racecheck, synccheck and initcheck on
#    benchmarks/cuda_driver.py (every kernel, every launch path, four dtypes);
# 4. runs benchmarks/bench_quantizer.py, bench_train_step.py (mlp, resnet20,
#    vit) and bench_data.py (CIFAR_ROOT=data, or synthetic data; with a
#    ResNet-20 step) on cuda, and benchmarks/gpu_report.py (µs, GB/s vs the
#    measured copy bandwidth, peak extra memory, group lasso over ViT-Tiny);
# 5. writes benchmarks/results/gpu_check_<stamp>.{md,json} (+ the log).
#
# Exit status: 0 when every step passed, 1 otherwise, 2 when there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-python}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$ROOT/benchmarks/results
mkdir -p "$OUT"
LOG=$OUT/gpu_check_$STAMP.log
REPORT=$OUT/gpu_check_$STAMP
: >"$LOG"
declare -a STATUS=()
FAILED=0

say() { echo "== $*" | tee -a "$LOG"; }
record() {  # record NAME RC
  local s=passed
  [ "$2" -eq 0 ] || { s="FAILED (rc=$2)"; FAILED=1; }
  STATUS+=("$1=$s")
  say "$1: $s"
}

say "codeq gpu_check $STAMP in $ROOT with $($PY --version 2>&1)"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
  say "no CUDA GPU visible to torch ($PY); nothing to check."
  exit 2
fi
nvidia-smi >>"$LOG" 2>&1 || true

# 1. build ----------------------------------------------------------------------
say "building: pip install --no-build-isolation --no-deps . (ptxas report in the log)"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
t0=$(date +%s)
CODEQ_PTXAS_VERBOSE=1 "$PY" -m pip install -v --no-build-isolation --no-deps . >"$OUT/gpu_check_${STAMP}_build.log" 2>&1
rc=$?
record build $rc
say "build took $(( $(date +%s) - t0 )) s"
grep -E "Compiling entry function|bytes stack frame|Used [0-9]+ registers" "$OUT/gpu_check_${STAMP}_build.log" \
  >"$OUT/gpu_check_${STAMP}_ptxas.txt" || true
if grep -qE "[1-9][0-9]* bytes spill stores" "$OUT/gpu_check_${STAMP}_ptxas.txt"; then
  say "ptxas: some kernels spill (see gpu_check_${STAMP}_ptxas.txt)"
  STATUS+=("ptxas_spills=some kernels spill, see ptxas.txt")
else
  STATUS+=("ptxas_spills=none")
fi
[ $rc -eq 0 ] || { say "build failed; see the build log"; exit 1; }

(cd /tmp && "$PY" -c "import codeq, json; i = codeq.info(); print(json.dumps(i)); assert i['cuda_built'] and 'cuda' in i['fused_devices'], i") >>"$LOG" 2>&1
record cuda_kernels_registered $?

# 2. tests ----------------------------------------------------------------------
MARK="cuda and not slow"
[ "${SLOW:-0}" != "0" ] && MARK="cuda"
say "tests: pytest -m '$MARK' tests/test_cuda.py"
(cd tests && CODEQ_REQUIRE_EXT=1 "$PY" -m pytest -q -rs -m "$MARK" test_cuda.py \
   --junitxml="$OUT/gpu_check_${STAMP}_tests.xml") >>"$LOG" 2>&1
record cuda_tests $?
(cd tests && "$PY" -m pytest -q test_select_emulation.py) >>"$LOG" 2>&1
record select_emulation $?

# 3. compute-sanitizer --------------------------------------------------------------
SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && SAN=$CUDA_HOME/bin/compute-sanitizer
if [ -z "$SAN" ]; then
  say "compute-sanitizer not found (install the CUDA toolkit's sanitizer)"
  STATUS+=("sanitizer=not found"); FAILED=1
else
  for tool in memcheck racecheck synccheck initcheck; do
    sizes="1,1000,65536,70001"
    [ "$tool" = racecheck ] && sizes="1,1000,65536,70001"
    say "compute-sanitizer --tool $tool benchmarks/cuda_driver.py --sizes $sizes"
    (cd /tmp && PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 \
        "$PY" "$ROOT/benchmarks/cuda_driver.py" --sizes "$sizes") >>"$LOG" 2>&1
    record "sanitizer_$tool" $?
  done
fi

# 4. benchmarks --------------------------------------------------------------------
if [ -f benchmarks/bench_quantizer.py ]; then
  say "benchmarks/bench_quantizer.py --device cuda"
  "$PY" benchmarks/bench_quantizer.py --device cuda --out "$OUT/bench_quantizer_cuda_$STAMP.json" >>"$LOG" 2>&1
  record bench_quantizer $?
else
  say "benchmarks/bench_quantizer.py is missing (skipped)"
  STATUS+=("bench_quantizer=missing")
fi
# The training step (all three models, every variant) and the input pipeline.
say "benchmarks/bench_train_step.py --device cuda --models mlp,resnet20,vit"
"$PY" benchmarks/bench_train_step.py --device cuda --models mlp,resnet20,vit --block 10 \
    --out "$OUT/bench_train_step_cuda_$STAMP.json" >>"$LOG" 2>&1
record bench_train_step $?
DATA_ARGS=(--synthetic)
[ -d "${CIFAR_ROOT:-data}/cifar-10-batches-bin" ] || [ -d "${CIFAR_ROOT:-data}/cifar-10-batches-py" ] \
  && DATA_ARGS=(--root "${CIFAR_ROOT:-data}")
say "benchmarks/bench_data.py --device cuda ${DATA_ARGS[*]} --train resnet20"
"$PY" benchmarks/bench_data.py --device cuda "${DATA_ARGS[@]}" --workers 4 --train resnet20 \
    --out "$OUT/bench_data_cuda_$STAMP.json" >>"$LOG" 2>&1
record bench_data $?

say "benchmarks/gpu_report.py"
args=()
for s in "${STATUS[@]}"; do args+=(--status "$s"); done
"$PY" benchmarks/gpu_report.py --out "$REPORT" --bench-json "$OUT/bench_quantizer_cuda_$STAMP.json" "${args[@]}" \
  >>"$LOG" 2>&1
record gpu_report $?
if [ -f "$REPORT.md" ]; then
  { echo; echo "## ptxas (registers / spills per kernel)"; echo; echo '```';
    cat "$OUT/gpu_check_${STAMP}_ptxas.txt"; echo '```'; } >>"$REPORT.md"
else
  # the report script failed: still leave a summary
  { echo "# codeq gpu_check $STAMP"; for s in "${STATUS[@]}"; do echo "- $s"; done; } >"$REPORT.md"
  "$PY" -c "import json,sys; print(json.dumps(dict(a.split('=',1) for a in sys.argv[1:]), indent=1))" \
    "${STATUS[@]}" >"$REPORT.json"
fi

say "summary:"
for s in "${STATUS[@]}"; do say "  $s"; done
say "report: $REPORT.md / $REPORT.json, log: $LOG"
exit $FAILED

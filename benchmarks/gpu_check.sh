#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and the codeq source tree:
#
#   bash benchmarks/gpu_check.sh            # PY=/path/to/python to pick the interpreter
#   SLOW=1 bash benchmarks/gpu_check.sh     # also the slow tests (> 2^24 elements)
#
# Steps, in this order (STEPS=a,b,... runs those, in the order given):
#   build       pip install --no-build-isolation --no-deps . (ptxas register/spill
#               report of every kernel kept in the build log)
#   tests       the CUDA tests (TESTS="test_cuda.py test_cuda_graph.py", -m cuda)
#   bench_train benchmarks/bench_train_step.py on cuda, three models, the eager and the
#               cuda_graph variants (BENCH_VARIANTS=..., BENCH_MIN_TIME=s per variant)
#   bench_quant benchmarks/bench_quantizer.py on cuda (µs and GB/s per size)
#   train       run_training.py on configs/demo.yaml (synthetic data) on cuda, twice:
#               the DataLoader path and dataset.on_device
#   compiled    bench_train_step.py: baseline vs codeq_qat_gl_compiled (use_compile: 1)
#   precision   bench_train_step.py with TF32, bf16 autocast and channels_last batches
#               (*_tf32, *_bf16, *_cl), and run_training.py on configs/demo.yaml with amp
#               bf16 and fp16
#   profile     benchmarks/profile_step.py --graph: launches and host time per step, and
#               a CUDA graph of the whole step (MLP, ResNet-20)
#   sanitizer   compute-sanitizer memcheck, racecheck, synccheck, initcheck on
#               benchmarks/cuda_driver.py (every kernel and launch path, four dtypes)
#   bench_data  benchmarks/bench_data.py (CIFAR_ROOT=data, or synthetic data) + a ResNet-20 step
#   report      benchmarks/gpu_report.py (µs, GB/s vs the measured copy bandwidth, peak
#               extra memory, group lasso over ViT-Tiny)
#
# Other switches: RESULTS=DIR (default benchmarks/results), BUDGET_S=N (stop starting
# steps after N seconds; each step is cut at what is left), PACK=FILE.tgz (re-pack
# RESULTS into FILE after every step, so that a run cut short still leaves its
# results), DEV=cpu (dry run of the script on the CPU kernels: no build, no sanitizer).
#
# Exit status: 0 when every step passed, 1 otherwise, 2 when there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-python}
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # steps run in other folders
DEV=${DEV:-cuda}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${RESULTS:-$ROOT/benchmarks/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check_$STAMP.log
REPORT=$OUT/gpu_check_$STAMP
ALL_STEPS=build,tests,bench_train,bench_quant,train,compiled,precision,profile,sanitizer,bench_data,report
STEPS=${STEPS:-$ALL_STEPS}
BUDGET_S=${BUDGET_S:-0}
T_START=$(date +%s)
: >"$LOG"
declare -a STATUS=()
FAILED=0

say() { echo "== [$(( $(date +%s) - T_START ))s] $*" | tee -a "$LOG"; }
pack() { [ -n "${PACK:-}" ] && tar czf "$PACK" -C "$OUT" . 2>/dev/null; return 0; }
record() {  # record NAME RC
  local s=passed
  case "$2" in
    0) ;;
    124|137) s="CUT at its time limit (rc=$2)"; FAILED=1 ;;
    *) s="FAILED (rc=$2)"; FAILED=1 ;;
  esac
  STATUS+=("$1=$s")
  say "$1: $s"
  pack
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
# limit CAP: seconds this step may take (CAP, or what is left of BUDGET_S); 0 = no time left
limit() {
  local cap=$1
  if [ "$BUDGET_S" -gt 0 ]; then
    local left=$(( BUDGET_S - ($(date +%s) - T_START) ))
    [ "$left" -lt 15 ] && { echo 0; return; }
    [ "$left" -lt "$cap" ] && cap=$left
  fi
  echo "$cap"
}
# step NAME CAP CMD...: run CMD (output to the log) under a time limit, and record it
step() {
  local name=$1 cap; cap=$(limit "$2"); shift 2
  if ! want "$name"; then return 0; fi
  if [ "$cap" -eq 0 ]; then STATUS+=("$name=skipped (budget spent)"); say "$name: skipped, budget spent"; return 0; fi
  say "$name (limit ${cap}s): $*"
  local t0; t0=$(date +%s)
  timeout -k 10 "$cap" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "$name took $(( $(date +%s) - t0 ))s"
  record "$name" $rc
}

say "codeq gpu_check $STAMP in $ROOT with $($PY --version 2>&1), steps $STEPS, budget ${BUDGET_S}s, device $DEV"
if [ "$DEV" = cuda ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
    say "no CUDA GPU visible to torch ($PY); nothing to check."
    exit 2
  fi
  nvidia-smi >>"$LOG" 2>&1 || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG"

# The steps ---------------------------------------------------------------------------
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
BUILD_LOG=$OUT/gpu_check_${STAMP}_build.log

do_build() {
  step build 600 env CODEQ_PTXAS_VERBOSE=1 "$PY" -m pip install -v --no-build-isolation --no-deps . \
    --log "$BUILD_LOG"
  grep -E "Compiling entry function|bytes stack frame|Used [0-9]+ registers" "$BUILD_LOG" \
    >"$OUT/gpu_check_${STAMP}_ptxas.txt" 2>/dev/null || true
  if grep -qE "[1-9][0-9]* bytes spill stores" "$OUT/gpu_check_${STAMP}_ptxas.txt"; then
    say "ptxas: some kernels spill (see gpu_check_${STAMP}_ptxas.txt)"
    STATUS+=("ptxas_spills=some kernels spill, see ptxas.txt")
  else
    STATUS+=("ptxas_spills=none")
  fi
  [[ " ${STATUS[*]} " == *" build=passed "* ]] || { tail -40 "$BUILD_LOG"; say "build failed; see the build log"; pack; exit 1; }
  # The extension must be the one just built, with kernels for $DEV.
  (cd /tmp && "$PY" -c "import codeq, json; i = codeq.info(); print(json.dumps(i)); \
    assert '$DEV' in i['fused_devices'], i") 2>&1 | tee -a "$LOG"
  record kernels_registered "${PIPESTATUS[0]}"
}

do_tests() {
  local mark="cuda and not slow" xd=()
  [ "${SLOW:-0}" != "0" ] && mark="cuda"
  "$PY" -c "import xdist" 2>/dev/null && xd=(-n 4)
  local tests
  read -r -a tests <<<"${TESTS:-test_cuda.py test_cuda_graph.py}"
  step tests 300 env -C tests CODEQ_REQUIRE_EXT=1 CODEQ_CUDA_TEST_DEVICE="$DEV" \
    "$PY" -m pytest -q -rs -p no:cacheprovider "${xd[@]}" -m "$mark" "${tests[@]}"
}

do_bench_train() {
  step bench_train 300 "$PY" benchmarks/bench_train_step.py --device "$DEV" --models mlp,resnet20,vit \
    --variants "${BENCH_VARIANTS:-baseline,reference_qat,reference_qat_gl,codeq_qat,codeq_qat_gl,baseline_graph,codeq_qat_gl_graph}" \
    --block 10 --min-time "${BENCH_MIN_TIME:-1}" --out "$OUT/bench_train_step_${DEV}_$STAMP.json"
}

do_bench_quant() {
  step bench_quant 200 "$PY" benchmarks/bench_quantizer.py --device "$DEV" --no-compile \
    --out "$OUT/bench_quantizer_${DEV}_$STAMP.json"
}

do_train() {
  local common="--config configs/demo.yaml --device $DEV --set epochs=2 --set save_dir=/tmp/codeq_gpu_check"
  step train 200 bash -c "$PY run_training.py $common --set run_name=loader && \
    $PY run_training.py $common --set run_name=on_device --set dataset.on_device=true"
}

do_compiled() {
  step compiled 400 "$PY" benchmarks/bench_train_step.py --device "$DEV" --models mlp,resnet20,vit \
    --variants baseline,codeq_qat_gl,codeq_qat_gl_compiled --block 10 --min-time 1 --min-reps 5 \
    --out "$OUT/bench_train_step_compiled_${DEV}_$STAMP.json"
}

do_precision() {
  local tf32=baseline_tf32,codeq_qat_gl_tf32,
  [ "$DEV" = cuda ] || tf32=""  # TF32 is a CUDA setting
  local common="--config configs/demo.yaml --device $DEV --set epochs=1 --set save_dir=/tmp/codeq_gpu_check"
  step precision 500 bash -c "\"$PY\" benchmarks/bench_train_step.py --device $DEV --models mlp,resnet20,vit \
    --variants baseline,${tf32}baseline_bf16,baseline_cl,codeq_qat_gl,codeq_qat_gl_bf16,codeq_qat_gl_cl \
    --block 10 --min-time 1 --min-reps 5 --out \"$OUT/bench_train_step_precision_${DEV}_$STAMP.json\" && \
    \"$PY\" run_training.py $common --set run_name=bf16 --set amp=bf16 && \
    \"$PY\" run_training.py $common --set run_name=fp16 --set amp=fp16"
}

do_profile() {
  step profile 200 "$PY" benchmarks/profile_step.py --device "$DEV" --models mlp,resnet20 \
    --variants baseline,codeq_qat_gl --graph --out "$OUT/profile_step_${DEV}_$STAMP.json"
}

do_sanitizer() {  # SAN_TOOLS="memcheck racecheck synccheck initcheck" (default all four)
  [ "$DEV" = cuda ] || { say "sanitizer: skipped on $DEV"; return 0; }
  local san tool
  san=$(command -v compute-sanitizer || true)
  [ -z "$san" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && san=$CUDA_HOME/bin/compute-sanitizer
  if [ -z "$san" ]; then
    say "compute-sanitizer not found (install the CUDA toolkit's sanitizer)"
    STATUS+=("sanitizer=not found"); FAILED=1; return 0
  fi
  for tool in ${SAN_TOOLS:-memcheck racecheck synccheck initcheck}; do
    STEPS="$STEPS,sanitizer_$tool" step "sanitizer_$tool" 300 env -C /tmp PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$san" --tool "$tool" --error-exitcode 99 "$PY" "$ROOT/benchmarks/cuda_driver.py" --sizes 1,1000,65536,70001
  done
}

do_bench_data() {
  local data=(--synthetic)
  [ -d "${CIFAR_ROOT:-data}/cifar-10-batches-bin" ] || [ -d "${CIFAR_ROOT:-data}/cifar-10-batches-py" ] \
    && data=(--root "${CIFAR_ROOT:-data}")
  step bench_data 200 "$PY" benchmarks/bench_data.py --device "$DEV" "${data[@]}" --workers 4 --train resnet20 \
    --out "$OUT/bench_data_${DEV}_$STAMP.json"
}

do_report() {
  local args=() bj=() s
  for s in "${STATUS[@]}"; do args+=(--status "$s"); done
  [ -f "$OUT/bench_quantizer_${DEV}_$STAMP.json" ] && bj=(--bench-json "$OUT/bench_quantizer_${DEV}_$STAMP.json")
  step report 200 "$PY" benchmarks/gpu_report.py --out "$REPORT" "${bj[@]}" "${args[@]}"
}

IFS=, read -r -a ORDER <<<"$STEPS"
for name in "${ORDER[@]}"; do
  case "$name" in
    build|tests|bench_train|bench_quant|train|compiled|precision|profile|sanitizer|bench_data|report) "do_$name" ;;
    *) say "unknown step '$name' (steps: $ALL_STEPS)"; exit 2 ;;
  esac
done

if [ -f "$REPORT.md" ]; then
  { echo; echo "## ptxas (registers / spills per kernel)"; echo; echo '```';
    cat "$OUT/gpu_check_${STAMP}_ptxas.txt" 2>/dev/null; echo '```'; } >>"$REPORT.md"
else
  # no report step (or it failed): still leave a summary
  { echo "# codeq gpu_check $STAMP"; for s in "${STATUS[@]}"; do echo "- $s"; done; } >"$REPORT.md"
  "$PY" -c "import json,sys; print(json.dumps(dict(a.split('=',1) for a in sys.argv[1:]), indent=1))" \
    "${STATUS[@]}" >"$REPORT.json"
fi

say "summary:"
for s in "${STATUS[@]}"; do say "  $s"; done
say "report: $REPORT.md / $REPORT.json, log: $LOG"
pack
exit $FAILED

#!/usr/bin/env bash
# The one command for a session lent a GPU (../shared/GPU.md): build in place (no network),
# run the GPU tests, run the gpu-quick suite one module at a time (so a slow or failing module
# loses only itself), and leave everything under $OUT in at most 8 files (the device tool
# brings back no more), printing the summary tables last.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# TESTS=none skips the GPU tests. EMU2_COMMIT=<hash> names the commit measured in the reports
# (the device tool's copy of the tree carries stale git metadata).
#   OUT=... TESTS="tests/test_x.py" MODULES="attention:170 head_loss" PYTEST_S=150 MODULE_S=90 bash benchmarks/gpu_check.sh
# (a module written name:seconds gets its own cap instead of MODULE_S)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
PY=${PYTHON:-python3}
SUITE=${SUITE:-gpu-quick}
PYTEST_S=${PYTEST_S:-180}       # cap on the GPU tests
MODULE_S=${MODULE_S:-120}       # cap on each benchmark module
BUILD_S=${BUILD_S:-240}         # cap on the in-place build
TESTS=${TESTS:-tests}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
MODULES=${MODULES:-$($PY -c "from benchmarks.run import MODULES; print(' '.join(MODULES))")}
log="$OUT/gpu_check.log"
: > "$log"
step() { echo "== $*" | tee -a "$log"; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$log"

step "build (in place, CUDA sources included)"
if ! EMU2_BUILD_CUDA=1 timeout "$BUILD_S" $PY setup.py -q build_ext --inplace >> "$log" 2>&1; then
  echo "build failed: see $log" | tee -a "$log"
fi

if [ "$TESTS" != none ]; then
  step "pytest -m gpu ($TESTS, cap ${PYTEST_S}s)"
  timeout "$PYTEST_S" $PY -m pytest -q -m gpu -p no:cacheprovider $TESTS > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?" >> "$OUT/pytest.log"
  tail -n 25 "$OUT/pytest.log" | tee -a "$log"
fi

step "benchmarks: $SUITE, one module at a time (cap ${MODULE_S}s each): $MODULES"
reports=$(mktemp -d)
names=""
for entry in $MODULES; do
  m=${entry%%:*}; cap=$MODULE_S
  [ "$m" != "$entry" ] && cap=${entry#*:}
  names="$names $m"
  start=$(date +%s)
  # the module's log goes straight to $OUT, so a call stopped mid-module still brings it back
  timeout "$cap" $PY -m benchmarks.run --suite "$SUITE" --only "$m" --out "$reports/$m" > "$OUT/$m.log" 2>&1
  status=$?
  mv "$OUT/$m.log" "$reports/$m.log"  # only a module stopped mid-way leaves its log in $OUT
  cat "$reports/$m.log" >> "$log"
  echo "-- $m: exit $status in $(( $(date +%s) - start ))s" | tee -a "$log"
done
( cd "$reports" && tar -cf "$OUT/reports.tar" . )
# The summary tables: the end of each module's log (after its 'suite' line).
for m in $names; do sed -n '/^suite /,$p' "$reports/$m.log"; done

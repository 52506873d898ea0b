#!/usr/bin/env bash
# The one command for a session lent a GPU (../shared/GPU.md): install the carried wheels,
# build in place (no network), run the GPU tests, run the gpu-quick suite one module at a time
# (so a slow or failing module loses only itself), and leave everything under $OUT in at most
# 8 files (the device tool brings back no more), printing the summary tables last.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# TESTS=none skips the GPU tests. EMU2_COMMIT=<hash> names the commit measured in the reports
# (the device tool's copy of the tree carries stale git metadata).
#   OUT=... TESTS="tests/test_x.py" MODULES="attention:170 head_loss" PYTEST_S=150 MODULE_S=90 bash benchmarks/gpu_check.sh
# (a module written name:seconds gets its own cap instead of MODULE_S)
# Wheels in .whl/ (ignored by git; the device tool's run must name it in `carry`) are installed
# first into a folder put first on PYTHONPATH: the GPU machine has no PyAV, which the data
# pipeline, and so the trainer, imports.
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
log="$OUT/gpu_check.log"
: > "$log"
step() { echo "== $*" | tee -a "$log"; }
# -k 10: a module that ignores the TERM (a hung CUDA call) is killed 10 s later
capped() { timeout -k 10 "$@"; }

site=""
wheels=(.whl/*.whl)
if [ -e "${wheels[0]}" ]; then
  step "install ${wheels[*]}"
  site=$(mktemp -d /tmp/site.XXXXXX)
  trap 'rm -rf "$site"' EXIT
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}" 2>&1 | tee -a "$log" || echo "wheel install failed" | tee -a "$log"
fi
export PYTHONPATH=${site:+$site:}$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
MODULES=${MODULES:-$($PY -c "from benchmarks.run import MODULES; print(' '.join(MODULES))")}

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$log"

# Without PyAV the trainer (and so train_step and the tests that import it) cannot even be
# imported: say so and stop rather than spend the GPU's minutes on import errors.
if ! $PY -c "import av; print('PyAV', av.__version__, 'from', av.__path__[0])" 2>&1 | tee -a "$log"; then
  needs=""
  [[ " $MODULES " == *" train_step"[:\ ]* ]] && needs="the train_step module imports the trainer, which needs it"
  collected=$(mktemp)
  if [ -z "$needs" ] && [ "$TESTS" != none ] \
     && ! $PY -m pytest -q --collect-only -m gpu -p no:cacheprovider $TESTS > "$collected" 2>&1 \
     && grep -q "No module named 'av'" "$collected"; then
    needs="the test files above cannot be imported without it"
    grep -E "^ERROR" "$collected" | tail -n 15 | tee -a "$log"
  fi
  if [ -n "$needs" ]; then
    echo "STOP: PyAV (import av) is missing, and $needs. Carry its wheel: put it in .whl/" \
         "and name \".whl\" in the run tool's carry." | tee -a "$log"
    exit 2
  fi
  echo "note: PyAV is missing; nothing asked for here imports it" | tee -a "$log"
fi

step "build (in place, CUDA sources included)"
if ! EMU2_BUILD_CUDA=1 capped "$BUILD_S" $PY setup.py -q build_ext --inplace >> "$log" 2>&1; then
  echo "build failed: see $log" | tee -a "$log"
fi

if [ "$TESTS" != none ]; then
  step "pytest -m gpu ($TESTS, cap ${PYTEST_S}s)"
  capped "$PYTEST_S" $PY -m pytest -q -m gpu -p no:cacheprovider $TESTS > "$OUT/pytest.log" 2>&1
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
  capped "$cap" $PY -m benchmarks.run --suite "$SUITE" --only "$m" --out "$reports/$m" > "$OUT/$m.log" 2>&1
  status=$?
  mv "$OUT/$m.log" "$reports/$m.log"  # only a module stopped mid-way leaves its log in $OUT
  cat "$reports/$m.log" >> "$log"
  echo "-- $m: exit $status in $(( $(date +%s) - start ))s" | tee -a "$log"
done
( cd "$reports" && tar -cf "$OUT/reports.tar" . )
# The summary tables: the end of each module's log (after its 'suite' line).
for m in $names; do sed -n '/^suite /,$p' "$reports/$m.log"; done

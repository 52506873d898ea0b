#!/usr/bin/env bash
# The one command for a session lent a GPU (../shared/GPU.md): build in place (no network),
# run the GPU tests, run the gpu-quick suite, and leave everything under $OUT (at most 8 files:
# the device tool brings back no more), printing the summary table last.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (OUT defaults to benchmarks/results/gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
log="$OUT/gpu_check.log"
: > "$log"
step() { echo "== $*" | tee -a "$log"; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$log"

step "build (in place, CUDA sources included)"
if ! EMU2_BUILD_CUDA=1 $PY setup.py -q build_ext --inplace >> "$log" 2>&1; then
  echo "build failed: see $log" | tee -a "$log"
fi

step "pytest -m gpu"
timeout 180 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -n 40 | tee -a "$log"

step "benchmarks: gpu-quick"
report_dir=$(mktemp -d)
timeout 330 $PY -m benchmarks.run --suite gpu-quick --out "$report_dir" > "$report_dir/run.log" 2>&1
status=$?
cat "$report_dir/run.log" >> "$log"
cp "$report_dir/report.json" "$report_dir/report.md" "$OUT/" 2>/dev/null
( cd "$report_dir" && ls ./*.png > /dev/null 2>&1 && tar -cf "$OUT/plots.tar" ./*.png )
[ $status -eq 0 ] || echo "benchmarks exited with $status" | tee -a "$log"
# The summary table is the end of run.log (after the 'wrote' lines).
sed -n '/^suite /,$p' "$report_dir/run.log"

#!/usr/bin/env bash
# The GPU check: one script for a GPU machine with no network.
#
#   bench/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# Installs the wheels in WHEEL_DIR (if given) into a private folder, runs the gpu-marked tests,
# then bench/gpu_check.py (copy latency pinned vs pageable per bucket, CUDA-graph replay vs plain
# launch, NVML readings, the Qwen model in fp16 with CUDA graphs at batch sizes 1 to 8,192 and the
# GPU-time table built from it, the lean TensorRT runtime, then a sustained load: the largest
# bucket back to back with NVML read every second).
# Writes into OUT_DIR: gpu_check.json, gpu_check.md, gpu_load.json, gpu-tests.log, gpu-tests.xml,
# nvidia-smi.txt. Exits non-zero if a test or a measurement failed. ITERS (default 2000) sets the
# samples per figure, LOAD_SECONDS (default 120) the sustained load, BUCKETS (comma-separated)
# the batch sizes. Plot the load afterwards, anywhere: python -m bench.gpu_load plot OUT_DIR/gpu_load.json X.png
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_check.sh OUT_DIR [WHEEL_DIR]}
wheels=${2:-}
py=${PYTHON:-python3}
mkdir -p "$out"

if [ -n "$wheels" ]; then
    echo "gpu_check: installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/tradingd-site "$wheels"/*.whl || { echo "gpu_check: wheel install failed"; exit 2; }
    export PYTHONPATH=/tmp/tradingd-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

nvidia-smi -q > "$out/nvidia-smi.txt" 2>&1 || echo "gpu_check: nvidia-smi failed (see $out/nvidia-smi.txt)"
"$py" - <<'PY'
import importlib
for name in ("numpy", "torch", "transformers", "onnxruntime", "cuda.bindings", "pynvml", "tensorrt_lean_bindings", "msgspec", "structlog"):
    try:
        m = importlib.import_module(name)
        print(f"gpu_check: {name} {getattr(m, '__version__', '')}")
    except Exception as exc:
        print(f"gpu_check: {name} MISSING: {exc}")
PY

echo "gpu_check: gpu-marked tests"
"$py" -m pytest -m gpu tests -p no:cacheprovider -q -rA --junitxml="$out/gpu-tests.xml" \
    -W "default::DeprecationWarning" 2>&1 | tee "$out/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

echo "gpu_check: measurements"
"$py" bench/gpu_check.py --out "$out" --iters "${ITERS:-2000}" --load-seconds "${LOAD_SECONDS:-120}" \
    ${BUCKETS:+--buckets "$BUCKETS"}
check_rc=$?

echo "gpu_check: tests rc=$tests_rc, measurements rc=$check_rc"
[ "$tests_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]

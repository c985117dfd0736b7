#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one pass, each step time-boxed, logs in $OUT (default
# ./gpu_checks): build the CUDA extension in place, run the GPU tests (op contract on the triton /
# cuda / torch backends with CUDA tensors, the triton kernel suite, the tiny-model integration on
# CUDA, graph-safe attach under hand-captured CUDA graphs and torch.compile "reduce-overhead", padding
# rows on every CUDA backend), the triton decode launch sweep, the op bandwidth and speedup gates, and model-level speed
# (bench/gpu_speed.py).
#
#   MODEL_DIR=dir-with-config.json-and-tokenizer DATA=counterfact.json bash bench/gpu_checks.sh
#
# Knobs: PY (python, default python3), ARCH (TORCH_CUDA_ARCH_LIST, default 9.0), JOBS (pytest
# workers, default 8). A step that fails or runs out of time is reported and the next one runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_checks}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -n "${MODEL_DIR:-}" ] && export NEURALDB_TEST_TOKENIZER="$MODEL_DIR"  # the integration tests need SmolLM2's tokenizer

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step build 120 env FORCE_CUDA=1 SKIP_CPU_EXT=1 TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}" MAX_JOBS=16 \
  $PY setup.py build_ext --inplace
step tests 240 $PY -m pytest -q -n "${JOBS:-8}" -p no:cacheprovider -rs \
  python_tests/test_gated_retrieve.py python_tests/test_gated_retrieve_triton_kernel.py \
  python_tests/test_integration.py python_tests/test_graph_safe_attach.py python_tests/test_graph_safe_attach_cuda.py \
  -k "test_gated_retrieve or triton_kernel or (planted and cuda) or graph_safe_attach_cuda or (padding_rows and cuda)"
step sweep 150 $PY bench/triton_decode_sweep.py --out "$OUT/triton_decode_sweep.json"
step bench_op 90 $PY -m pytest -q -s -p no:cacheprovider bench/test_bench_gated_retrieve_gpu.py -k test_gate_
if [ -n "${MODEL_DIR:-}" ] && [ -n "${DATA:-}" ]; then
  step gpu_speed 200 $PY bench/gpu_speed.py --model-dir "$MODEL_DIR" --data "$DATA" --out "$OUT/gpu_speed.json"
fi

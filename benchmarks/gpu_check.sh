#!/usr/bin/env bash
# The device checks of issue #11 in one go, on a CUDA machine with torch + triton: the GPU-marked fast-path tests
# (fused kernel and whole models vs float64 torch.func.jvp), then the speed/memory benchmark.
#   bash benchmarks/gpu_check.sh OUT_DIR [extra tangent_speed.py args]
# Needs taft's imports (timm, transformers, open_clip) importable; PYTHONPATH=src works without installing.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [benchmark args]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton, timm, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'timm', timm.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 \
  | tee "$out/gpu_tests.log" | tail -40
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/tangent_speed.py --out "$out" "$@" 2>&1 \
  | tee "$out/bench.log" | grep -v '^{'

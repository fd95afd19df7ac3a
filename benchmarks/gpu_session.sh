#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (the device tool: few, full calls). Run from the repo root:
#   bash benchmarks/gpu_session.sh [tests|bench|sweep|noise|sampler|all]   (results under $OUT or benchmarks/out)
# Builds the package (C++ extension included), runs the test suite with compiled Triton on CUDA (no
# interpreter), then the step benchmark; logs and JSON land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
what=${1:-all}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu_info.txt"
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }
if [[ $what == all || $what == tests ]]; then
  python3 -m pytest -q -p no:cacheprovider -rs --timeout 300 tests/ 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
fi
if [[ $what == all || $what == sweep ]]; then
  python3 benchmarks/sweep_triton_block.py --out "$OUT/sweep_triton_block.json" 2>&1 | tee "$OUT/sweep.txt"
fi
if [[ $what == all || $what == bench ]]; then
  python3 benchmarks/bench_step.py --out "$OUT/bench_step_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
  python3 benchmarks/bench_step.py --dtype bfloat16 --sizes 8 64 512 --no-compile \
    --out "$OUT/bench_step_gpu_bf16.json" 2>&1 | tee "$OUT/bench_gpu_bf16.txt"
fi
if [[ $what == noise ]]; then   # the noise step and the sampler loop only (a short call)
  python3 -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_backends_agree.py \
    tests/test_library_op.py tests/test_determinism.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -5
  for dt in float32 bfloat16; do
    python3 benchmarks/bench_step.py --dtype $dt --steps euler_ancestral --sizes 1 8 64 512 --no-compile \
      --out "$OUT/bench_noise_$dt.json" 2>/dev/null | tail -6
  done
fi
if [[ $what == all || $what == noise || $what == sampler ]]; then
  python3 benchmarks/bench_sampler.py --out "$OUT/bench_sampler_gpu.json" 2>&1 | tee "$OUT/bench_sampler.txt"
fi

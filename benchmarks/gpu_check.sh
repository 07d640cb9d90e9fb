#!/usr/bin/env bash
# The GPU check, one command for anyone with an NVIDIA GPU (meant to finish within 8 minutes on
# one H100-class GPU):
#     bash benchmarks/gpu_check.sh [folder]        # default: gpu_check/<date-time>
# It prints the GPU, runs the whole test suite (the CUDA tests included), times
# `python train.py --method align` from an empty output folder (pre-training included) and again
# with the base cached, and runs benchmarks/step_time.py on CUDA, eager and compiled. Everything
# it prints is also written to the folder it names at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$dir"
export PYTHONUNBUFFERED=1
seconds() { python -c "import time; print(f'{time.time() - $1:.1f}')"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$dir/gpu.txt"

t=$(date +%s.%N)
python -m pytest -q 2>&1 | tee "$dir/tests.txt"
echo "tests: $(seconds "$t") s" | tee -a "$dir/summary.txt"

rm -rf "$dir/out"
t=$(date +%s.%N)
python train.py --method align --out "$dir/out" --base "$dir/out/base.pt" 2>&1 | tee "$dir/align_cold.txt"
echo "python train.py --method align, empty output folder (pre-training included): $(seconds "$t") s" \
  | tee -a "$dir/summary.txt"
rm -rf "$dir/out/default-align-seed0"
t=$(date +%s.%N)
python train.py --method align --out "$dir/out" --base "$dir/out/base.pt" 2>&1 | tee "$dir/align_cached.txt"
echo "python train.py --method align, base cached: $(seconds "$t") s" | tee -a "$dir/summary.txt"

python benchmarks/step_time.py --device cuda --compile --rounds 5 --steps 20 2>&1 | tee "$dir/step_time.txt"
echo "wrote $dir/: gpu.txt, tests.txt, align_cold.txt, align_cached.txt, step_time.txt, summary.txt"
cat "$dir/summary.txt"

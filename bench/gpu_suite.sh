#!/usr/bin/env bash
# The GPU suite in one call (under 8 minutes on one H100/H200): every memory plan of the full-size random-weight
# ZIT at 1024 px, rank 32, batch 1, beside the diffusers + peft reference loop, then the CUDA part of
# train_bench. Writes its log and the planner's activation calibration (bench/calibration.json format) to
# ${OUT:-bench/out}. Needs torch with CUDA, diffusers, peft, transformers (requirements.txt); bitsandbytes
# adds the nf4 row when it can be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, peft, transformers" 2>/dev/null \
  || python3 -m pip install -q -r requirements.txt
python3 -c "import bitsandbytes" 2>/dev/null || python3 -m pip install -q bitsandbytes 2>/dev/null \
  || echo "bitsandbytes not installable here: no nf4 row"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 420 python3 bench/gpu_suite.py --calibration "$out/calibration.json" 2>&1 | tee "$out/gpu_suite.log"
timeout 60 python3 bench/train_bench.py --mode cuda --steps 4 --warmup 2 2>&1 | tee "$out/train_bench.log" || true

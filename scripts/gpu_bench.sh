#!/usr/bin/env bash
# The GPU measurements, in one go, for a machine with a CUDA GPU and PyTorch + Lightning already
# installed (no network): our training step vs a plain PyTorch loop, side by side, as ratios.
# Wheels for what such a machine lacks (hydra-core, omegaconf, antlr4) go in .whl/ beforehand:
#   pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
set -euo pipefail
OUT=${OUT:-/tmp/visionflow-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/bench.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/bench.txt"
run() { python3 -m benchmarks --only train_step "$@" 2>&1 | grep -v -i warn | tee -a "$OUT/bench.txt"; }
run --model simple_cnn --batch-size 512 --steps 100 --repeats 5 --precision bf16-mixed --channels-last
run --model resnet18 --image-size 32 --batch-size 512 --steps 100 --repeats 5 --precision bf16-mixed --channels-last
run --model resnet50 --image-size 224 --batch-size 256 --steps 30 --repeats 3 --precision bf16-mixed --channels-last

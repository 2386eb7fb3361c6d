#!/usr/bin/env bash
# cifar10_fast on a GPU machine, in one command: prepare CIFAR-10 (45,000 train / 5,000 val,
# 500 per class, seed 42; prepare also needs a test split, so 10 images go there), decode it once
# onto the GPU, compile, then time the training alone; prints one JSON line per run and writes
# $OUT/cifar10_fast.json. Needs torch, lightning, numpy and PIL there; no network.
#
# Here, once (the device gets at most 64 MiB of working tree, so the ~46 MB of JPEGs travel as
# one ignored .npz, with the wheels the device lacks):
#   .venv/bin/python scripts/cifar10_fast.py --pack ../shared/data/cifar10-jpeg/train .data/cifar10-jpeg.npz
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 webdataset==1.0.2 braceexpand==0.1.7
# There (carry .data and .whl):
#   bash scripts/cifar10_fast.sh [hydra overrides...]      e.g. trainer.max_epochs=12
# Extra runs on the same compiled network, e.g. the recipe's 20 epochs against 14 and 24:
#   CIFAR_VARIANTS="trainer.max_epochs=14;trainer.max_epochs=24" bash scripts/cifar10_fast.sh
set -euo pipefail
OUT=${OUT:-/tmp/visionflow-gpu}
DATA=${DATA:-.data/cifar10-jpeg.npz}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import hydra, omegaconf, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD" PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
variants=()
IFS=';' read -ra vs <<<"${CIFAR_VARIANTS:-}"
for v in "${vs[@]}"; do [ -n "$v" ] && variants+=(--variant "$v"); done
python3 scripts/cifar10_fast.py --data "$DATA" --out "$OUT" ${variants[@]+"${variants[@]}"} "$@" 2>&1 \
  | grep -v -i -E "warn|^\s*$" | tee "$OUT/cifar10_fast.log"

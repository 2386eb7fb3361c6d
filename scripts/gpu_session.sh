#!/usr/bin/env bash
# Every measurement that needs the GPU machine, in one call of the device tool. Each part writes
# its results to $OUT as it ends, so a call cut short still brings back the parts that finished:
#
#   bench   our training step vs a plain PyTorch loop, side by side, bf16 and channels_last:
#           simple_cnn 32 px bs 512, resnet18 32 px bs 512, resnet50 224 px bs 256, each with
#           ours' telemetry (MFU, peak GPU memory, NVML utilisation)            -> bench.txt
#   cifar   cifar10_fast, timed: plain and flip-TTA validation accuracy         -> cifar10_fast.json
#   int8    cifar_resnet18 trained on the GPU on the same split, then quantized each way and timed
#           at batch 1 and 64 on this machine's CPU (VNNI or AMX where it has them) -> int8.json
#
# Here, once: `bash scripts/gpu_session.sh prepare` packs the CIFAR-10 JPEGs into one ignored .npz
# (.data/; the device takes at most 64 MiB of working tree) and builds wheels of what the device's
# Python lacks (.whl/, CARRIED below; it has torch, lightning, torchmetrics, onnx, onnxruntime).
# There (carry .data and .whl; estimated at 8 minutes on an H200, not yet run there):
#   bash scripts/gpu_session.sh                  PARTS="bench int8" for some parts only
#   CIFAR_VARIANTS="trainer.max_epochs=14;trainer.max_epochs=24" bash scripts/gpu_session.sh
#                                                more cifar10_fast runs on the same compiled network
# SMOKE=1 runs every part at CPU size on any machine, from the same code: the test suite does
# (tests/integration/test_gpu_session.py), so the script works when a GPU session comes.
set -euo pipefail
# pure-Python packages visionflow imports that the GPU machine lacks, pinned as requirements.lock
CARRIED="hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 webdataset==1.0.2 braceexpand==0.1.7 tenacity==9.2.1"
if [ "${1:-}" = prepare ]; then
  .venv/bin/python scripts/cifar10_fast.py --pack "${CIFAR:-../shared/data/cifar10-jpeg/train}" .data/cifar10-jpeg.npz
  # shellcheck disable=SC2086  # CARRIED is words
  .venv/bin/pip wheel -q --no-deps -w .whl $CARRIED
  exit
fi
OUT=${OUT:-/tmp/visionflow-gpu}
DATA=${DATA:-.data/cifar10-jpeg.npz}
PARTS=${PARTS:-bench cifar int8}
WORK=${WORK:-/tmp/visionflow-gpu-work}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
if ls .whl/*.whl >/dev/null 2>&1 \
    && ! "$PY" -c "import hydra, omegaconf, antlr4, webdataset, braceexpand, tenacity" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD" PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true

if [ "${SMOKE:-0}" = 1 ]; then  # CPU size: a few steps, images and epochs; the same code paths
  bench_args=(--table smoke --turns run)  # the GPU's way of taking turns
  small=(data.cache=memory trainer.precision=32-true trainer.accelerator=cpu data.batch_size=16
         data.val_fraction=0.25 data.test_fraction=0.1)
  cifar_args=(--experiment cifar10_fast_smoke "${small[@]}" trainer.max_epochs=1)
  int8_args=(--epochs 1 --repeats 2 "${small[@]}" quantize.calibration_samples=16)
else
  bench_args=(--table cuda)
  cifar_args=()
  int8_args=(--epochs 10)
fi
quiet() { grep --line-buffered -v -i -E "warn|^\s*$" || true; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
} | tee "$OUT/machine.txt"

# the JPEG tree, once for both parts that train on it
tree=$DATA
if [[ "$DATA" == *.npz ]] && [[ " $PARTS " == *" cifar "* || " $PARTS " == *" int8 "* ]]; then
  tree=$WORK/cifar10-jpeg
  rm -rf "$tree"
  "$PY" scripts/cifar10_fast.py --unpack "$DATA" "$tree"
fi

failed=()
for part in $PARTS; do
  echo "== $part ($(date -u +%H:%M:%S))"
  ( case $part in
    bench)
      "$PY" -m benchmarks --only train_step "${bench_args[@]}" --precision bf16-mixed \
        --channels-last 2>&1 | quiet | tee "$OUT/bench.txt" ;;
    cifar)
      variants=()
      IFS=';' read -ra vs <<<"${CIFAR_VARIANTS:-}"
      for v in "${vs[@]}"; do [ -n "$v" ] && variants+=(--variant "$v"); done
      "$PY" scripts/cifar10_fast.py --data "$tree" --workdir "$WORK/cifar10_fast" --out "$OUT" \
        ${variants[@]+"${variants[@]}"} ${cifar_args[@]+"${cifar_args[@]}"} 2>&1 \
        | quiet | tee "$OUT/cifar10_fast.log" ;;
    int8)
      "$PY" -m benchmarks --only int8 --cifar "$tree" --workdir "$WORK/int8" --json "$OUT/int8.json" \
        "${int8_args[@]}" 2>&1 | quiet | tee "$OUT/int8.txt" ;;
    *) echo "unknown part '$part': PARTS takes bench, cifar and int8" >&2; exit 2 ;;
  esac ) || failed+=("$part")  # the next part runs all the same
done
echo "== done ($(date -u +%H:%M:%S)): $OUT${failed[*]:+; FAILED: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]

#!/usr/bin/env bash
# One prepared GPU benchmark (issue 13 item 9), <= 8 min on one H100/H200, offline assets only:
#   1. the one-program round against the loop of jitted clients at M = 10 and 100 (smoke model);
#   2. one client step of Spry, backprop (FedAvg) and MeBP (fedavg_remat) on RoBERTa-large and on
#      an int4 Llama2-7B shape at batch 8 x 64 tokens in bfloat16: step time, the device's
#      measured peak memory (memory_stats, each row in a fresh process) beside XLA's estimate;
#   3. a whole Spry round of M = 100 clients on the RoBERTa-large shape (2 local steps of batch
#      8 x 64 each, bfloat16), all clients vmapped at once against chunks of 10
#      (round.client_chunk): round time and measured peak, each row in a fresh process.
# Weights are random (drawn on the device, or the model's own init; no download; the working tree
# carries no weights).
#
#   bash scripts/gpu_bench.sh            # writes $OUT (or ./gpu_bench_out)/*.json and *.txt
#
# MODELS, METHODS, CLIENTS, BATCH, SEQ, ITERS, OVERRIDES, ROUND_MODEL, ROUND_CLIENTS, CHUNKS,
# ROUND_STEPS override the defaults (the tests run this script on the CPU with a tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # measured peaks, not the preallocated pool
OUT_DIR="${OUT:-gpu_bench_out}"
MODELS="${MODELS:-roberta-large,llama2-7b}"
METHODS="${METHODS:-spry,fedavg,fedavg_remat}"
CLIENTS="${CLIENTS:-10,100}"
BATCH="${BATCH:-8}"
SEQ="${SEQ:-64}"
ITERS="${ITERS:-10}"
OVERRIDES="${OVERRIDES:-{\}}"
ROUND_MODEL="${ROUND_MODEL:-roberta-large}"
ROUND_CLIENTS="${ROUND_CLIENTS:-100}"
CHUNKS="${CHUNKS:-0,10}"
ROUND_STEPS="${ROUND_STEPS:-2}"
mkdir -p "$OUT_DIR"
python - <<'PY'
import importlib, sys
missing = [m for m in ("jax", "flax", "optax", "ml_collections", "absl", "transformers")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages {missing}: pip install them (or carry their wheels) first")
import jax
print(f"jax {jax.__version__}; devices {jax.devices()}")
PY
(command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv) || true
python -m spry_jax.bench.throughput --clients="$CLIENTS" --devices= --repeats=3 \
  --out="$OUT_DIR/throughput.json" | tee "$OUT_DIR/throughput.txt"
python -m spry_jax.bench.device_step --models="$MODELS" --methods="$METHODS" --dtype=bfloat16 \
  --batch="$BATCH" --seq="$SEQ" --iters="$ITERS" --overrides="$OVERRIDES" \
  --out="$OUT_DIR/device_step.json" | tee "$OUT_DIR/device_step.txt"
python -m spry_jax.bench.device_round --model="$ROUND_MODEL" --clients="$ROUND_CLIENTS" \
  --chunks="$CHUNKS" --batch="$BATCH" --seq="$SEQ" --steps="$ROUND_STEPS" --dtype=bfloat16 \
  --overrides="$OVERRIDES" --out="$OUT_DIR/device_round.json" | tee "$OUT_DIR/device_round.txt"
echo "done: $OUT_DIR"

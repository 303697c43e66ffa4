#!/usr/bin/env bash
# One GPU check for a lent H100/H200 (CUDA PyTorch, transformers, peft; nothing downloadable), <= 8 minutes:
#   bash tests/gpu/device_check.sh            # writes $OUT/*.json (default OUT=./gpu-check-out)
# 1. builds the random-weight DeepSeek-R1-Distill-Qwen-1.5B-shape model (bf16, sharded) in a temp dir;
# 2. bf16 LoRA steps on it at 4096-token rows: tokens/s, MFU, peak memory vs the memory plan;
# 3. CUDA resume exactness (tiny model, dropout on, checkpoint with CUDA RNG);
# 4. torchrun --nproc-per-node 1 with NCCL through train_lora (collectives on the CUDA device).
# 5. the image classifier trains on CUDA (phantom discs vs squares, val AUC > 0.9).
# 6. packed attention on CUDA: a packed row's loss equals the per-example losses (tiny model, fp32).
# Each step has its own time limit and its own JSON; a failed step is recorded and the next one runs.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL="$(mktemp -d)/r1-distill-qwen-1.5b-random"

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its log and exit code
  local name="$1" limit="$2"; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - started))}" >>"$OUT/steps.jsonl"
  echo "$name: rc $rc in $((SECONDS - started)) s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, transformers, peft; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__)"
} >"$OUT/environment.txt" 2>&1

step build 90 "$PY" models/build_random_r1_distill.py "$MODEL"
step lora 150 "$PY" tests/gpu/device_check.py lora "$OUT" "$MODEL"
step resume 90 "$PY" tests/gpu/device_check.py resume "$OUT"
step nccl 60 "$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29517 \
  tests/gpu/device_check.py nccl "$OUT"
step classifier 60 "$PY" tests/gpu/device_check.py classifier "$OUT"
step packed 60 "$PY" tests/gpu/device_check.py packed "$OUT"
rm -rf "$(dirname "$MODEL")"
cat "$OUT"/steps.jsonl

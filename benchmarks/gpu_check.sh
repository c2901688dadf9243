#!/usr/bin/env bash
# The scale-out check for a CUDA machine (under 10 minutes on one node; not runnable on the CPU-only
# machine this was written on, so its numbers are not in docs/benchmarks.md yet):
#   1. bf16 + FSDP on all visible GPUs against 1 process and DDP: a 1.6B-parameter tiny-config Llama
#      teacher (hidden 2048, 16 layers, V = 128k) and a 0.16B student; per-process model-state memory,
#      peak CUDA memory and tokens/s (benchmarks/fsdp.py);
#   2. the chunked loss path against the plain one at V = 128k, bf16: peak memory and time ratios
#      (benchmarks/loss_memory.py).
# Usage: bash benchmarks/gpu_check.sh [output dir]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp -d -t kd_gpu_check-XXXX)}"
GPUS="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [ "$GPUS" -lt 1 ]; then echo "no CUDA GPU visible: this script needs one" >&2; exit 1; fi
DEVICES="$GPUS"; if [ "$DEVICES" -lt 2 ]; then DEVICES=1; fi
echo "== FSDP / DDP / 1 process on $GPUS GPU(s), bf16 =="
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 420 python benchmarks/fsdp.py --accelerator cuda \
  --devices "$DEVICES" --teacher-hidden 2048 --teacher-layers 16 --student-hidden 512 --student-layers 8 \
  --vocab 128000 --mixed-precision bf16 --steps 12 --warmup 4 --out "$OUT/fsdp"
echo "== chunked vs plain loss, V = 128k, bf16 =="
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 150 python benchmarks/loss_memory.py --device cuda \
  --vocab 128000 --dtype bfloat16 --repeats 3
echo "results under $OUT"

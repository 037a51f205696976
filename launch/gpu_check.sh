#!/usr/bin/env bash
# The GPU checks of the overhead work, in one run on a CUDA machine (results into $OUT, or ./gpu-check):
# the CUDA tests (async verdict with no host sync, device gate, hot copy in device memory), the overhead bench
# on GPT-2 124M bf16 with fused AdamW under the asynchronous and the synchronous verdict, and the GPT-2 124M
# guard check (step time, in-call %, host syncs per step, rollback time). Needs torch, transformers,
# safetensors, pyyaml and pytest already installed; nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_lr.py -k "cuda" 2>&1 | tee "$OUT/pytest.txt" | tail -25
GPT2=(--device cuda --n-embd 768 --n-layer 12 --n-head 12 --seq 512 --batch 8 --bf16 --fused)
for verdict in async sync; do
  timeout 200 python3 -m gradience.bench overhead "${GPT2[@]}" --verdict "$verdict" --block "${BLOCK:-100}" \
    --blocks "${BLOCKS:-2}" --json "$OUT/overhead-gpu-$verdict.json" 2>&1 | tee "$OUT/overhead-gpu-$verdict.txt"
done
timeout 120 python3 launch/gpu_guard_check.py --steps 40 2>&1 | tail -5 | tee "$OUT/guard-check.txt"

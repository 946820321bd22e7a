#!/usr/bin/env bash
# scripts/gpu_check.sh — check the real-model path on one GPU in under 10 minutes (issue 14):
# SFT first-step losses CUDA vs CPU (LoRA, OFT, DoRA, Full FT), GRPO weight motion with fp32
# masters vs pure bf16, measured peak memory of a ~1.5B-shaped model next to the --dry-run
# estimate, and an arena.py run (SFT + GRPO + scoring) in one process without leaking engines.
# Random-initialised Qwen2.5-/Llama-3.2-shaped models only: nothing is downloaded. The vLLM steps
# run only when vllm imports. Details: scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh          # one CUDA GPU (H100/H200)
#   bash scripts/gpu_check.sh --cpu    # the same checks at tiny shapes on CPU (CI, < 60 s)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

args=("$@")
cpu=0
for a in "${args[@]}"; do
    if [[ "$a" == "--cpu" ]]; then
        cpu=1
    fi
done
if [[ "$cpu" == 1 ]]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, CUDA {torch.cuda.is_available()}")'
if python -c 'import vllm' >/dev/null 2>&1; then
    python -c 'import vllm; print(f"vllm {vllm.__version__}")'
else
    echo "vllm: does not import here; the vLLM steps are skipped"
fi
exec timeout 600 python scripts/gpu_check.py "${args[@]}"

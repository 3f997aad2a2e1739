#!/usr/bin/env bash
# One CUDA GPU, at most 8 minutes, one Markdown table: the budget's peak beside max_memory_allocated,
# the step time and MFU at true SDXL shapes (random bf16 weights, 1024², subject/style, checkpointing
# on/off), and the RG denoiser's step ÷ CFG. See bench/gpu_check.py for what each column means.
#   bash bench/gpu_check.sh                    # on a GPU (H100/H200/4090 detected by name)
#   bash bench/gpu_check.sh --peak-tflops 312  # another GPU: its dense bf16 peak
#   bash bench/gpu_check.sh --smoke            # the same code path on the tiny model on the CPU
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
exec timeout 480 "$python" "$here/gpu_check.py" "$@"

#!/usr/bin/env bash
# Runs bench/gpu_check.py on a bare GPU machine: Python 3.12 with torch, transformers and tiktoken, no network.
# The service's other wheels, GPT-2's tokenizer files and the data come from bench/gpu_kit (bench/gpu_kit.sh
# makes it here; carry it along).
#   bash bench/gpu_check.sh OUT_DIR [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--quick]}
shift
mkdir -p "$out"
kit=$PWD/bench/gpu_kit
python=python3
if python3 -m venv --system-site-packages /tmp/scratchllm-venv 2>/dev/null; then
    python=/tmp/scratchllm-venv/bin/python
    $python -m pip install --quiet --no-index --find-links "$kit/wheels" -r "$kit/requirements.txt"
else  # no venv module in the image: install beside its packages instead
    python3 -m pip install --quiet --no-index --find-links "$kit/wheels" --target /tmp/scratchllm-site \
        -r "$kit/requirements.txt"
    export PYTHONPATH=/tmp/scratchllm-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TIKTOKEN_CACHE_DIR=$kit/tiktoken_cache SCRATCHLLM_DATA=$kit/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.txt" 2>&1 || true
timeout 450 $python bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"

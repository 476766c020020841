#!/usr/bin/env bash
# Builds bench/gpu_kit/ (git-ignored), which `run` carries to the GPU machine for bench/gpu_check.sh: the
# service's wheels for that machine's Python 3.12 at the versions this venv runs (its image has torch, numpy,
# transformers and tiktoken, no network), GPT-2's tokenizer files and the text the checks train on.
set -euo pipefail
cd "$(dirname "$0")/.."
kit=bench/gpu_kit
rm -rf "$kit"
mkdir -p "$kit/wheels" "$kit/data" "$kit/tiktoken_cache"
.venv/bin/python - > "$kit/requirements.txt" <<'PY'
import re, tomllib
provided = {"torch", "numpy", "tiktoken"}  # in the GPU image already
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() not in provided:
        print(requirement.split(";")[0].strip())
PY
.venv/bin/pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' | grep -viE '^(torch|nvidia|triton)' \
    > "$kit/constraints.txt"
.venv/bin/pip download --quiet --disable-pip-version-check --dest "$kit/wheels" --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -r "$kit/requirements.txt" -c "$kit/constraints.txt" 2>&1 | grep -v WARNING || true
cp ../shared/tiktoken_cache/* "$kit/tiktoken_cache/"
cp ../shared/data/tinyshakespeare.txt "$kit/data/"
du -sh "$kit"

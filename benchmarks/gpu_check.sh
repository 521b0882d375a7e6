#!/usr/bin/env bash
# The prepared GPU check (under ten minutes on one GPU): every model's training steps/s in fp32 and
# bf16 and its full-ranking evaluation time, ATHWE on the demo end to end, batched text extraction.
# Run from the repository root on a CUDA machine with the project installed (.venv or on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check "$@"

#!/usr/bin/env bash
# Runs the whole test suite on the CPU, offline, exactly as CI does.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_functional.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
# One thread per process: several tests start worker processes, and oversubscribing 2 cores slows torch ~30x.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-$PWD/.cache/hf}" ENTROPIC_CACHE="${ENTROPIC_CACHE:-$PWD/.cache/entropic}"
export MPLBACKEND=Agg MPLCONFIGDIR="$PWD/.cache/matplotlib"
# Triton kernels are tested on CPU through the interpreter (must be set before kernels are defined).
export TRITON_INTERPRET=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"

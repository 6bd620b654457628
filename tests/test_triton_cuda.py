"""Compiled Triton kernels on a CUDA GPU (bf16/fp16, D 32/64/128, T 128 and 1000, causal and not, temperature and
padding): FlashAttention's tolerance rule against an fp32 reference, and length-bucketed autotuning.

CI has no GPU, so this skips there with the reason; run it on a GPU machine (the device tool's H200) with
``bash scripts/test.sh tests/test_triton_cuda.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.triton]

SCRIPT = Path(__file__).resolve().parent / "cuda_kernel_checks.py"


@pytest.fixture(scope="module")
def checks() -> dict:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the compiled-kernel checks need a GPU (CPU runs them under "
                    "TRITON_INTERPRET=1 in test_triton_attention.py)")  # fmt: skip
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_low_precision_error_within_twice_plain_pytorch(checks):
    bad = [r for r in checks["rows"] if r["ours_err"] > 2 * r["plain_err"] + 1e-3]
    assert len(checks["rows"]) == 2 * 3 * 2 * 2 * 6  # dtypes x head dims x lengths x causal x tensors
    assert not bad, bad[:10]


def test_autotuning_runs_once_per_length_bucket(checks):
    assert checks["autotune"]["new_fwd_tunings"] == 1  # T = 200, 220, 250, 256 share the bucket 256

"""Test-wide settings: offline, deterministic, one thread, caches inside the repository."""

from __future__ import annotations

import os
from pathlib import Path

# Must be set before transformers/datasets are imported by any test module.
_REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HOME", str(_REPO / ".cache" / "hf"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MPLCONFIGDIR", str(_REPO / ".cache" / "matplotlib"))
# Triton kernels run on CPU tensors through the interpreter; it must be on before any kernel is defined,
# whichever test module happens to import entropic_kernels first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Seeds every test and restores global torch state it may change."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)

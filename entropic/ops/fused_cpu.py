"""Entropic attention in one fused C++ CPU kernel (``fused_entropic_attention.cpp`` next to it).

Per (batch, head) and block of query rows the kernel forms the logits with a GEMM, makes one pass per row for the
max, exp, sum, log-sum-exp (LSE) and Σ p·s, and multiplies the probabilities into V with a second GEMM. The entropy
is H = LSE − μ with μ = E_p[s], computed in the shifted form log l − Σ e·(s − m) / l. Backward recomputes each
block's probabilities from the LSE (FlashAttention-style) and forms

    dS = P ⊙ (dP − δ − g (S − μ)),   δ = rowsum(dO ⊙ O),  g = ∂L/∂H,

in one pass, then dV, dQ and dK by GEMMs. Saved: q, k, v, out, LSE and H (O(T) per head besides the inputs).

The extension is compiled with :func:`torch.utils.cpp_extension.load` on first use, into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, which holds a file lock while building, so concurrent first uses are safe). If it cannot
be built or loaded, :func:`fused_cpu_available` is False, one warning says why, and
:func:`entropic.ops.entropic_attention` keeps its other CPU paths. ``ENTROPIC_NO_FUSED_CPU=1`` disables it.

Covers: CPU, fp32 or fp64, no key padding, causal only with equal query and key lengths (top-left aligned).
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from entropic.env import env_flag
from entropic.ops.flash_cpu import queries_over_temperature

__all__ = [
    "DISABLE_ENV",
    "fused_cpu_applies",
    "fused_cpu_available",
    "fused_entropic_attention",
    "load_extension",
]

DISABLE_ENV = "ENTROPIC_NO_FUSED_CPU"
"""Environment switch that turns the fused kernel off (the dispatch then uses the flash or chunked path)."""

BLOCK_ROWS = 64
"""Query rows per block. Scratch per thread is two [BLOCK_ROWS, Tk] tiles."""

_SOURCE = Path(__file__).resolve().parent / "fused_entropic_attention.cpp"
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}

# Vector ISA per torch's detected CPU capability. The build is for this machine only; the capability and the torch
# version are part of the extension name, so a cache directory shared between different CPUs or torch installs never
# loads a binary built for another ISA or ABI.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    isa = _ISA_FLAGS.get(capability, [])
    torch_tag = re.sub(r"\W", "_", torch.__version__)
    module = load(
        name=f"entropic_fused_attention_{capability.lower() if isa else 'generic'}_torch{torch_tag}",
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-fopenmp", *isa],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
    if not module.has_blas():
        raise RuntimeError("libtorch_cpu exports no sgemm_/dgemm_ for the kernel's GEMMs")
    return module


def load_extension() -> ModuleType | None:
    """The compiled extension, built on first call; None (after one warning) if it cannot be built or loaded."""
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                try:
                    _state["module"] = _build()
                except Exception as exc:  # compiler missing, headers mismatched, BLAS absent, ...
                    message = f"fused CPU entropic attention unavailable, using the other CPU paths: {exc}"
                    _log.warning(message)
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    _state["module"] = None
    return _state["module"]


def fused_cpu_available() -> bool:
    """Whether the fused kernel is enabled (no ``ENTROPIC_NO_FUSED_CPU``) and its extension compiled."""
    return not env_flag(DISABLE_ENV) and load_extension() is not None


def fused_cpu_applies(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_padding_mask: torch.Tensor | None
) -> bool:
    """Whether the kernel computes these inputs exactly (shape and dtype only; not whether it is available)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and q.dtype == k.dtype == v.dtype
        and key_padding_mask is None
        and k.shape[-2] >= 1
        and (not causal or q.shape[-2] == k.shape[-2])
    )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows are dense and do not overlap (a BLAS operand with row stride >= D), else a copy."""
    return x if x.stride(-1) == 1 and x.stride(-2) >= x.shape[-1] else x.contiguous()


class _FusedEntropicAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, causal: bool):
        ext = load_extension()
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        out, lse, ent = ext.forward(q, k, v, scale, causal, BLOCK_ROWS)
        ctx.save_for_backward(q, k, v, out, lse, ent)
        ctx.scale, ctx.causal = scale, causal
        return out, ent

    @staticmethod
    def backward(ctx, d_out, d_ent):
        q, k, v, out, lse, ent = ctx.saved_tensors
        d_out = _last_dim_contiguous(d_out.to(q.dtype))
        d_ent = d_ent.to(q.dtype).contiguous()
        dq, dk, dv = load_extension().backward(q, k, v, out, lse, ent, d_out, d_ent, ctx.scale, ctx.causal, BLOCK_ROWS)
        return dq, dk, dv, None, None


def fused_entropic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    temperature: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, T, D] (temperature [H, Tq] or [H]) -> (out [B, H, Tq, D], row entropy [B, H, Tq]).

    Inputs must satisfy :func:`fused_cpu_applies` and the extension must load (:func:`fused_cpu_available`); the
    entropy has q's dtype. Both outputs are differentiable in q, k, v and the temperature (which divides the queries,
    so autograd carries its gradient).
    """
    if load_extension() is None:
        raise RuntimeError("the fused CPU entropic attention extension is unavailable (see the earlier warning)")
    return _FusedEntropicAttention.apply(queries_over_temperature(q, temperature), k, v, float(scale), bool(causal))

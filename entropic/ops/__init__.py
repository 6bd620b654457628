"""Attention that also returns each query row's entropy, with a choice of backends.

Backends of :func:`entropic_attention`:

* ``"triton"``: the fused Triton kernels of ``entropic_kernels`` (FlashAttention-style, O(T) memory).
  On a CPU tensor they run under the Triton interpreter, which needs ``TRITON_INTERPRET=1`` in the
  environment *before* the kernels are imported (slow; for tests only).
* ``"torch"``: exact CPU/PyTorch paths with O(T) saved memory per head, for CPU and machines without Triton. On
  fp32 CPU tensors without key padding (causal with equal query and key lengths, or not causal),
  :func:`entropic.ops.fused_cpu.fused_entropic_attention`, a C++ kernel compiled on first use (off with
  ``ENTROPIC_NO_FUSED_CPU=1``, or where it cannot be built), else
  :func:`entropic.ops.flash_cpu.flash_entropic_attention` on PyTorch's fused CPU flash kernel; otherwise
  :func:`entropic.ops.torch_attention.torch_entropic_attention`, chunked over queries with recomputation in
  backward.
* ``"reference"``: :func:`reference_entropic_attention`, the eager oracle that materializes the
  [B, H, T, T] probabilities.
* ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton and the kernels import, else ``"torch"``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch

from entropic.env import env_flag
from entropic.ops.flash_cpu import flash_cpu_applies, flash_entropic_attention
from entropic.ops.fused_cpu import fused_cpu_applies, fused_cpu_available, fused_entropic_attention
from entropic.ops.reference import reference_entropic_attention
from entropic.ops.torch_attention import DEFAULT_CHUNK_SIZE, torch_entropic_attention

__all__ = [
    "BACKENDS",
    "entropic_attention",
    "reference_entropic_attention",
    "resolve_backend",
    "torch_entropic_attention",
]

BACKENDS = ("auto", "triton", "torch", "reference")
"""Accepted values of ``backend``."""

_TRITON_MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _load_triton_kernel() -> tuple[Callable | None, str]:
    """(kernel function or None, reason it is unavailable)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return None, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    try:
        mod = importlib.import_module("entropic_kernels")
    except Exception as exc:
        return None, f"entropic_kernels cannot be imported ({type(exc).__name__}: {exc})"
    fn = getattr(mod, "triton_entropic_attention", None)
    if fn is None:
        return None, "entropic_kernels has no triton_entropic_attention (the Triton kernels are not installed)"
    return fn, ""


def _interpreter_enabled() -> bool:
    return env_flag("TRITON_INTERPRET")


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("triton", "torch" or "reference") that ``backend`` selects for tensors on ``device``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"triton"`` was requested but cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(repr(b) for b in BACKENDS)}")
    if backend in ("torch", "reference"):
        return backend
    if backend == "auto":
        if device.type == "cuda" and _load_triton_kernel()[0] is not None:
            return "triton"
        return "torch"
    # backend == "triton"
    if device.type != "cuda" and not _interpreter_enabled():
        raise RuntimeError(
            f'backend="triton" got {device.type} tensors, which only run under the Triton interpreter: set the '
            "environment variable TRITON_INTERPRET=1 before importing triton/entropic_kernels (e.g. "
            '`TRITON_INTERPRET=1 python ...`), or use backend="torch" for the PyTorch path.'
        )
    fn, why = _load_triton_kernel()
    if fn is None:
        raise RuntimeError(f'backend="triton" is unavailable: {why}. Use backend="torch" instead.')
    return "triton"


def _validate(q, k, v, temperature, key_padding_mask) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, T, D] (4 dims), got {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, t_q, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, H or D")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in B, H or T")
    if v.shape[3] != d:
        raise ValueError(f"v head dim {v.shape[3]} differs from q/k head dim {d}")
    t_k = k.shape[2]
    if temperature is not None:
        if not isinstance(temperature, torch.Tensor):
            raise TypeError(f"temperature must be a torch.Tensor or None, got {type(temperature).__name__}")
        if temperature.shape not in (torch.Size([h]), torch.Size([h, t_q])):
            raise ValueError(
                f"temperature must have shape [H] = [{h}] or [H, T] = [{h}, {t_q}], got {tuple(temperature.shape)}"
            )
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
        if temperature.device != q.device:
            raise ValueError(f"temperature is on {temperature.device} but q is on {q.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(
                f"key_padding_mask must be a bool torch.Tensor or None, got {type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != torch.Size([b, t_k]):
            raise ValueError(
                f"key_padding_mask must have shape [B, Tk] = [{b}, {t_k}], got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def entropic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    temperature: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention plus per-row entropy, differentiable through both outputs and the temperature.

    Args:
        q, k, v: [B, H, T, D] (k and v may have their own length Tk; with ``causal=True`` query i
            then sees keys 0..i + Tk − Tq).
        causal: query i attends to keys 0..i only.
        scale: logit scale, default 1/sqrt(D).
        temperature: [H, T] or [H]; divides the scaled logits: softmax(q·kᵀ·scale / t).
        key_padding_mask: bool [B, Tk], True = attend. Query rows with no visible key give output 0
            and entropy 0.
        backend: "auto", "triton", "torch" or "reference" (see the module docstring).

    Returns:
        out [B, H, T, D] in the input dtype; row_entropy [B, H, T] in nats, fp32.

    Raises:
        ValueError / TypeError: malformed inputs or unknown backend.
        RuntimeError: ``backend="triton"`` cannot run here (no Triton/kernels, or a CPU tensor
            without ``TRITON_INTERPRET=1``).
    """
    _validate(q, k, v, temperature, key_padding_mask)
    chosen = resolve_backend(backend, q.device)
    if backend == "auto" and chosen == "triton" and (q.dtype == torch.float64 or q.shape[-1] > _TRITON_MAX_HEAD_DIM):
        chosen = "torch"  # outside what the kernels support (fp16/bf16/fp32, head dim <= 256)
    kwargs = dict(causal=causal, scale=scale, temperature=temperature, key_padding_mask=key_padding_mask)
    if chosen == "triton":
        fn, _ = _load_triton_kernel()
        assert fn is not None
        return fn(q, k, v, **kwargs)
    if chosen == "torch":
        # fp64 stays on the chunked path (exact to ~1e-12, what the gradchecks rely on).
        if q.dtype == torch.float32 and fused_cpu_applies(q, k, v, causal, key_padding_mask) and fused_cpu_available():
            return fused_entropic_attention(q, k, v, causal=causal, scale=_scale(q, scale), temperature=temperature)
        if q.dtype == torch.float32 and flash_cpu_applies(q, k, causal, key_padding_mask):
            return flash_entropic_attention(q, k, v, causal=causal, scale=_scale(q, scale), temperature=temperature)
        return torch_entropic_attention(q, k, v, chunk_size=DEFAULT_CHUNK_SIZE, **kwargs)
    return reference_entropic_attention(q, k, v, **kwargs)


from entropic.ops.recording import (  # noqa: E402
    clear_row_entropies,
    collect_row_entropies,
    record_row_entropy,
)

__all__ += ["clear_row_entropies", "collect_row_entropies", "record_row_entropy"]

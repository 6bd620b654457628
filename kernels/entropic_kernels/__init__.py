"""entropic_kernels: Triton kernels for entropic (the package lives in ``kernels/entropic_kernels/``).

``triton_entropic_attention`` is a fused flash-attention-style op that also returns each query row's entropy
and differentiates through it. Importing this package never fails on a machine without Triton:
``TRITON_AVAILABLE`` is then False and the op raises a clear error.

Under ``TRITON_INTERPRET=1`` (set before this package is imported) the kernels run on CPU tensors in
Triton's interpreter; that is how the CPU tests run them.
"""

from __future__ import annotations

from entropic.env import env_flag

__all__ = ["TRITON_AVAILABLE", "TRITON_IMPORT_ERROR", "interpreter_enabled", "triton_entropic_attention"]

try:
    from entropic_kernels.attention import (
        EntropicAttentionFunction,
        triton_entropic_attention,
    )
    from entropic_kernels.attention import interpreter_enabled as _interp

    TRITON_AVAILABLE = True
    TRITON_IMPORT_ERROR: str | None = None
    __all__ += ["EntropicAttentionFunction"]
except Exception as exc:  # triton not installed (macOS, Windows, minimal installs) or broken: never fail the import
    TRITON_AVAILABLE = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    _interp = None

    def triton_entropic_attention(q, k, v, *, causal=True, scale=None, temperature=None, key_padding_mask=None):
        """Unavailable: Triton could not be imported."""
        raise RuntimeError(
            "entropic_kernels.triton_entropic_attention needs Triton, which could not be imported "
            f"({TRITON_IMPORT_ERROR}); install triton (Linux) or use the PyTorch backend "
            "(entropic.ops.entropic_attention(..., backend='torch'))"
        )


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1 is set (Triton then runs kernels on CPU tensors in its interpreter)."""
    if _interp is not None:
        return _interp()
    return env_flag("TRITON_INTERPRET")

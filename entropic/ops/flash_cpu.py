"""Entropic attention on PyTorch's fused CPU flash-attention kernel.

The kernel returns each row's log-sum-exp (LSE) next to the output. The entropy then needs only μ = E_p[s],
and μ_i = scale · q_i · Σ_j p_ij k_j: a second pass of the same kernel with the keys as values. So

    H_i = LSE_i − scale · ⟨q_i, (P K)_i⟩.

Gradients. The kernel's LSE has no autograd formula, so H is returned as sg(H) + (X − sg(X)) with the surrogate
X_i = −scale · ⟨sg(q_i), (P sg(K))_i⟩ (sg = stop-gradient): only the probabilities carry X's gradient, and
∂X_i/∂s_ij = −Σ_k s_ik ∂p_ik/∂s_ij = −p_ij (s_ij − μ_i) = ∂H_i/∂s_ij. The output's gradient is the kernel's own.
A temperature divides the queries (s = scale · (q/t) · k), so its gradient follows through autograd.

Covers what the kernel covers: CPU tensors, fp32 or fp64, no key padding, and causal attention only with equal
query and key lengths (the kernel's causal mask is aligned top-left). :func:`entropic.ops.entropic_attention`
uses it when it applies and the chunked path otherwise.
"""

from __future__ import annotations

import torch

__all__ = ["flash_cpu_applies", "flash_entropic_attention", "queries_over_temperature"]

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def flash_cpu_applies(q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: torch.Tensor | None) -> bool:
    """Whether :func:`flash_entropic_attention` computes exactly what the chunked path would for these inputs."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and q.dtype == k.dtype
        and key_padding_mask is None
        and (not causal or q.shape[-2] == k.shape[-2])
    )


def queries_over_temperature(q: torch.Tensor, temperature: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, Tq, D] divided by a temperature [H, Tq] or [H] (so s = scale · (q/t) · k), or q itself for None.

    The fused kernels take the temperature this way, and autograd carries its gradient through the division.
    """
    if temperature is None:
        return q
    t = temperature.to(q.dtype)
    return q / (t[None, :, :, None] if t.dim() == 2 else t[None, :, None, None])


def flash_entropic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    temperature: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, T, D] (temperature [H, Tq] or [H]) -> (out [B, H, Tq, D], row entropy [B, H, Tq]).

    Inputs must satisfy :func:`flash_cpu_applies`; both outputs are differentiable in q, k, v and the temperature.
    """
    q = queries_over_temperature(q, temperature)
    out, lse = _FLASH(q, k, v, 0.0, causal, scale=scale)
    keys_as_values, _ = _FLASH(q, k, k.detach(), 0.0, causal, scale=scale)  # (P K)_i, gradient through P only
    surrogate = -scale * (q.detach() * keys_as_values).sum(-1)
    entropy = lse.detach() + surrogate.detach()
    return out, entropy + (surrogate - surrogate.detach())

"""Eager reference attention that materializes probabilities: the test oracle for every backend.

This is deliberately the simplest correct formulation (it keeps the full [B, H, T, T] attention for
backward), so it serves as the fp32 autograd reference that the fused and chunked paths are checked
against. Do not use it for training at long context: use :func:`entropic.ops.entropic_attention`.
"""

from __future__ import annotations

import math

import torch


def reference_entropic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    temperature: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and per-row Shannon entropy, computed eagerly.

    Args:
        q, k, v: [B, H, T, D] queries, keys and values (T may differ between q and k/v only when
            ``causal=False``).
        causal: mask keys after the query position (query i attends to keys 0..i).
        scale: logit scale; defaults to 1/sqrt(D).
        temperature: [H, Tq] or [H]; the logits are divided by it, i.e. softmax(q·kᵀ·scale / t).
        key_padding_mask: bool [B, Tk], True where the key may be attended.

    Returns:
        out: [B, H, Tq, D] in the dtype of ``v``.
        row_entropy: [B, H, Tq] in nats, fp32. A query row with no visible key gets output 0 and
            entropy 0.
    """
    batch, heads, t_q, dim = q.shape
    t_k = k.shape[-2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if temperature is not None:
        t = temperature.float()
        t = t.view(1, heads, 1, 1) if t.dim() == 1 else t.view(1, heads, t_q, 1)
        logits = logits / t
    visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.tril(visible, diagonal=t_k - t_q)
    visible = visible.view(1, 1, t_q, t_k)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.view(batch, 1, 1, t_k).to(torch.bool)
    logits = logits.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(dim=-1, keepdim=True)
    logits = torch.where(any_visible, logits, torch.zeros_like(logits))
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp() * visible
    # Masked entries have p = 0 and contribute 0. The -inf log-probabilities are replaced before the product,
    # so neither the forward (0 * -inf) nor its backward produces nan.
    plogp = probs * log_probs.masked_fill(~visible, 0.0)
    row_entropy = -plogp.sum(dim=-1)
    out = torch.matmul(probs, v.float()).to(v.dtype)
    return out, row_entropy

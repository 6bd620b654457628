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
    attn_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and per-row Shannon entropy, computed eagerly: the one dense oracle of the project.

    Besides the fused op's inputs it takes what only a materialized attention can apply, so Hugging Face models'
    general masks, soft-capping and attention dropout run through it too (:mod:`entropic.hf`).

    Args:
        q, k, v: [B, H, T, D] queries, keys and values (T may differ between q and k/v only when
            ``causal=False``).
        causal: mask keys after the query position (query i attends to keys 0..i).
        scale: logit scale; defaults to 1/sqrt(D).
        temperature: [H, Tq] or [H]; the logits are divided by it, i.e. softmax(q·kᵀ·scale / t).
        key_padding_mask: bool [B, Tk], True where the key may be attended.
        attn_mask: bool, broadcastable to [B, H, Tq, Tk], True where the key may be attended (sliding windows,
            packed sequences, ...); combined with ``causal`` and ``key_padding_mask``.
        bias: additive logits, broadcastable to [B, H, Tq, Tk]; -inf entries are masked.
        softcap: logits become ``softcap · tanh(logits / softcap)`` before the bias (Gemma 2).
        dropout, training: attention dropout on the probabilities that weight ``v`` (in training only); the
            entropy is that of the probabilities before dropout, as in eager attention.

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
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias.float()
    visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.tril(visible, diagonal=t_k - t_q)
    visible = visible.view(1, 1, t_q, t_k)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.view(batch, 1, 1, t_k).to(torch.bool)
    if attn_mask is not None:
        visible = visible & attn_mask.to(torch.bool)
    if bias is not None:
        visible = visible & torch.isfinite(logits)
    visible = visible.expand_as(logits)
    logits = logits.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(dim=-1, keepdim=True)
    logits = torch.where(any_visible, logits, torch.zeros_like(logits))
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp() * visible
    # Masked entries have p = 0 and contribute 0. The -inf log-probabilities are replaced before the product,
    # so neither the forward (0 * -inf) nor its backward produces nan.
    plogp = probs * log_probs.masked_fill(~visible, 0.0)
    row_entropy = -plogp.sum(dim=-1)
    if dropout > 0 and training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, v.float()).to(v.dtype)
    return out, row_entropy

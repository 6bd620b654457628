"""Exact, memory-efficient entropic attention in plain PyTorch (CPU, or any device without Triton).

The forward runs over blocks of queries: for each block it forms the [B, H, block, Tk] logits, the
probabilities, the output rows, the row logsumexp (LSE) and the row entropy, and then drops the
block. Backward keeps only q, k, v, the row LSE, the row entropy and the temperature (O(T·D) and
O(T) per head), and recomputes each block's probabilities from the LSE, as FlashAttention does. No
[T, T] tensor ever outlives one block, so memory for backward is O(T) per head instead of O(T²).

Math, per query row, with s the logits after scale and temperature (s = q·kᵀ·scale / t),
p = softmax(s), LSE = log Σ exp(s) and μ = E_p[s]:

* H = LSE − μ, computed in the shifted form H = log l − Σ p (s − m) with m the row max and
  l = Σ exp(s − m) (no log of zero probabilities, no cancellation of two large terms).
* Given g = ∂L/∂H and dO = ∂L/∂out, with dP = dO·Vᵀ and D = Σ_k p_k dP_k:
  ∂L/∂s_k = p_k (dP_k − D) − g p_k (s_k − μ).
  (The first term is the usual attention backward, the second is dH/ds_k = −p_k (s_k − μ).)
* s = z·scale/t with z = q·kᵀ, so ∂s/∂z = scale/t and ∂s/∂t = −s/t; the temperature gradient is
  −Σ_k (∂L/∂s_k) s_k / t, summed over the batch (and over queries for a per-head temperature [H]).

D is computed as Σ p·dP from the recomputed probabilities rather than from rowsum(dO ⊙ O): that is
exact even when O was rounded to fp16/bf16, and it spares saving O.

Fully masked query rows (no visible key) give output 0, entropy 0, LSE 0 and zero gradients.
"""

from __future__ import annotations

import math

import torch

DEFAULT_CHUNK_SIZE = 128
"""Queries per block. Peak extra memory is a few [B, H, chunk, Tk] fp32 tensors."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stays fp64 (so torch.autograd.gradcheck works); everything else accumulates in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key_end(causal: bool, i1: int, t_q: int, t_k: int) -> int:
    """Number of keys any query in [.., i1) can see (query i sees keys 0..i + t_k - t_q when causal)."""
    if not causal:
        return t_k
    return max(0, min(t_k, i1 + t_k - t_q))


def _block_visible(
    causal: bool,
    i0: int,
    i1: int,
    kend: int,
    t_q: int,
    t_k: int,
    pad: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Bool visibility of keys [0, kend) for queries [i0, i1), broadcastable to [B, H, i1-i0, kend]; None = all."""
    visible = None
    if causal:
        rows = torch.arange(i0, i1, device=device).view(-1, 1)
        cols = torch.arange(kend, device=device).view(1, -1)
        visible = (cols <= rows + (t_k - t_q)).view(1, 1, i1 - i0, kend)
    if pad is not None:
        p = pad[:, :kend].view(pad.shape[0], 1, 1, kend)
        visible = p if visible is None else visible & p
    return visible


def _block_logits(
    q_blk: torch.Tensor,
    k_c: torch.Tensor,
    scale: float,
    temp_blk: torch.Tensor | None,
) -> torch.Tensor:
    s = torch.matmul(q_blk, k_c.transpose(-1, -2)) * scale
    if temp_blk is not None:
        s = s / temp_blk
    return s


def _temperature_block(t: torch.Tensor | None, i0: int, i1: int, heads: int) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dim() == 1:
        return t.view(1, heads, 1, 1)
    return t[:, i0:i1].reshape(1, heads, i1 - i0, 1)


class _ChunkedEntropicAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, temperature, key_padding_mask, causal, scale, chunk_size):
        batch, heads, t_q, _dim = q.shape
        t_k = k.shape[-2]
        cdt = _compute_dtype(q.dtype)
        k_c, v_c = k.to(cdt), v.to(cdt)
        t_c = None if temperature is None else temperature.to(cdt)
        pad = None if key_padding_mask is None else key_padding_mask.to(torch.bool)

        out = torch.zeros(batch, heads, t_q, v.shape[-1], dtype=v.dtype, device=q.device)
        lse = torch.zeros(batch, heads, t_q, dtype=cdt, device=q.device)
        ent = torch.zeros(batch, heads, t_q, dtype=cdt, device=q.device)
        for i0 in range(0, t_q, chunk_size):
            i1 = min(i0 + chunk_size, t_q)
            kend = _key_end(causal, i1, t_q, t_k)
            if kend == 0:
                continue  # no query of this block sees any key
            s = _block_logits(q[:, :, i0:i1].to(cdt), k_c[:, :, :kend], scale, _temperature_block(t_c, i0, i1, heads))
            visible = _block_visible(causal, i0, i1, kend, t_q, t_k, pad, q.device)
            if visible is not None:
                s = s.masked_fill(~visible, float("-inf"))
            m = s.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows: m = 0, e = 0
            shifted = s - m  # -inf where masked
            e = torch.exp(shifted)
            denom = e.sum(dim=-1, keepdim=True)
            l_safe = torch.where(denom > 0, denom, torch.ones_like(denom))
            p = e / l_safe
            # Σ p (s - m): masked entries have p = 0 but shifted = -inf, so zero them explicitly.
            shifted0 = shifted if visible is None else shifted.masked_fill(~visible, 0.0)
            ent_blk = torch.log(l_safe) - (p * shifted0).sum(dim=-1, keepdim=True)
            lse_blk = torch.where(denom > 0, m + torch.log(l_safe), torch.zeros_like(m))
            out[:, :, i0:i1] = torch.matmul(p, v_c[:, :, :kend]).to(v.dtype)
            lse[:, :, i0:i1] = lse_blk.squeeze(-1)
            ent[:, :, i0:i1] = ent_blk.squeeze(-1)
            del s, e, p, shifted, shifted0

        ent_out = ent if cdt == torch.float64 else ent.float()
        ctx.save_for_backward(q, k, v, lse, ent, temperature, key_padding_mask)
        ctx.causal, ctx.scale, ctx.chunk_size = causal, scale, chunk_size
        return out, ent_out

    @staticmethod
    def backward(ctx, d_out, d_ent):
        q, k, v, lse, ent, temperature, key_padding_mask = ctx.saved_tensors
        causal, scale, chunk_size = ctx.causal, ctx.scale, ctx.chunk_size
        _batch, heads, t_q, _ = q.shape
        t_k = k.shape[-2]
        cdt = _compute_dtype(q.dtype)
        k_c, v_c = k.to(cdt), v.to(cdt)
        t_c = None if temperature is None else temperature.to(cdt)
        pad = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
        need_q, need_k, need_v, need_t = ctx.needs_input_grad[:4]

        dq = torch.zeros(q.shape, dtype=cdt, device=q.device) if need_q else None
        dk = torch.zeros(k.shape, dtype=cdt, device=q.device) if need_k else None
        dv = torch.zeros(v.shape, dtype=cdt, device=q.device) if need_v else None
        dt_rows = torch.zeros(heads, t_q, dtype=cdt, device=q.device) if need_t else None  # Σ over batch
        mu = lse - ent  # E_p[s]
        for i0 in range(0, t_q, chunk_size):
            i1 = min(i0 + chunk_size, t_q)
            kend = _key_end(causal, i1, t_q, t_k)
            if kend == 0:
                continue
            q_blk = q[:, :, i0:i1].to(cdt)
            t_blk = _temperature_block(t_c, i0, i1, heads)
            s = _block_logits(q_blk, k_c[:, :, :kend], scale, t_blk)
            visible = _block_visible(causal, i0, i1, kend, t_q, t_k, pad, q.device)
            p = torch.exp(s - lse[:, :, i0:i1, None])
            if visible is not None:
                p = p.masked_fill(~visible, 0.0)
                s = s.masked_fill(~visible, 0.0)  # finite everywhere from here on (p = 0 there)
            ds = torch.zeros_like(p)
            if d_out is not None:
                do_blk = d_out[:, :, i0:i1].to(cdt)
                dp = torch.matmul(do_blk, v_c[:, :, :kend].transpose(-1, -2))
                delta = (p * dp).sum(dim=-1, keepdim=True)
                ds = p * (dp - delta)
                if need_v:
                    dv[:, :, :kend] += torch.matmul(p.transpose(-1, -2), do_blk)
                del dp
            if d_ent is not None:
                g = d_ent[:, :, i0:i1, None].to(cdt)
                ds = ds - g * p * (s - mu[:, :, i0:i1, None])
            if need_t:
                # ∂s/∂t = -s/t: per (b, h, i): -(Σ_k ds·s) / t, then summed over the batch.
                contrib = -(ds * s).sum(dim=-1, keepdim=True) / t_blk
                dt_rows[:, i0:i1] += contrib.sum(dim=0).squeeze(-1)
            dz = ds * scale
            if t_blk is not None:
                dz = dz / t_blk
            if need_q:
                dq[:, :, i0:i1] = torch.matmul(dz, k_c[:, :, :kend])
            if need_k:
                dk[:, :, :kend] += torch.matmul(dz.transpose(-1, -2), q_blk)
            del s, p, ds, dz

        d_temp = None
        if need_t:
            d_temp = dt_rows.sum(dim=1) if temperature.dim() == 1 else dt_rows
            d_temp = d_temp.to(temperature.dtype)
        return (
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None if dv is None else dv.to(v.dtype),
            d_temp,
            None,
            None,
            None,
            None,
        )


def torch_entropic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    temperature: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked exact attention with row entropy; same contract as :func:`reference_entropic_attention`.

    Args:
        q, k, v: [B, H, T, D]; k and v share their length Tk, which may differ from q's Tq (with
            ``causal=True`` query i then sees keys 0..i + Tk − Tq, like the reference).
        causal: mask keys after the query position.
        scale: logit scale; defaults to 1/sqrt(D).
        temperature: [H, Tq] or [H]; divides the scaled logits. Differentiable.
        key_padding_mask: bool [B, Tk], True where the key may be attended.
        chunk_size: queries per block (memory/speed trade-off; any positive value gives the same result).

    Returns:
        out [B, H, Tq, D] in v's dtype and row_entropy [B, H, Tq] in nats, fp32 (fp64 for fp64 inputs).
        Both are differentiable with respect to q, k, v and the temperature. Inputs are used as given
        (no validation): call :func:`entropic.ops.entropic_attention` for checked inputs.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _ChunkedEntropicAttention.apply(q, k, v, temperature, key_padding_mask, bool(causal), scale, int(chunk_size))


__all__ = ["DEFAULT_CHUNK_SIZE", "torch_entropic_attention"]

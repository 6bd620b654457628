"""Flash-attention-style Triton kernels that also return each query row's Shannon entropy.

Forward (one program per block of query rows, looping over key blocks with the online softmax):

    s_ij = q_i·k_j · scale / t_i          (t_i: temperature of the row's head and position, or 1)
    m_i  = running max,  l_i = Σ_j exp(s_ij − m_i),  acc_i = Σ_j exp(s_ij − m_i) v_j
    a_i  = Σ_j exp(s_ij − m_i) (s_ij − m_i)          (the entropy accumulator, shifted by the max)

Both ``l`` and ``a`` are rescaled when the max grows: with α = exp(m_old − m_new),
``l ← α l``, ``a ← α (a + (m_old − m_new) l_old)``. At the end
``out = acc / l``, ``lse = m + log l`` and ``H = log l − a / l`` (= LSE − E_p[s]).

Backward, with g_i = ∂L/∂H_i and μ_i = E_p[s_i] = LSE_i − H_i::

    ds_ij = p_ij (dp_ij − δ_i) − g_i p_ij (s_ij − μ_i) = p_ij (dp_ij − δ'_i − g_i s_ij),
    δ_i = Σ_d dO_id O_id,  δ'_i = δ_i − g_i μ_i   (computed by a small preprocess kernel)

so the entropy gradient costs one extra multiply-add per score. dQ and d(t) come from a kernel
that loops over keys for a block of rows (d t_i = −Σ_j ds_ij s_ij / t_i is a per-row sum there);
dK and dV from a kernel that loops over query rows for a block of keys. No atomics.

Masking never uses −inf: masked scores get probability exactly 0 through ``tl.where``, the
running max starts at a large negative finite number, and a row that sees no key at all gets
out = 0, entropy = 0 and zero gradients (no NaN).

Under ``TRITON_INTERPRET=1`` (CPU) the kernels run in numpy; bf16 arithmetic is wrong there, so
bf16 inputs are upcast to fp32 on the host before the launch and the results cast back.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from entropic.env import env_flag

__all__ = [
    "EntropicAttentionFunction",
    "interpreter_enabled",
    "triton_entropic_attention",
]

_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max (avoids inf − inf and 0·inf)


def _env_interpret() -> bool:
    return env_flag("TRITON_INTERPRET")


# Kernels are JIT-decorated at import time, so the interpreter decision is made then and fixed for the process.
_INTERPRET_AT_IMPORT = _env_interpret()


def interpreter_enabled() -> bool:
    """True when these kernels run in Triton's CPU interpreter.

    That is decided when this module is imported (``TRITON_INTERPRET=1`` must be set before the import);
    setting the variable later has no effect on the already-defined kernels.
    """
    return _INTERPRET_AT_IMPORT


# Block sizes used when no autotuning happens (interpreter). Small blocks keep the tests tiny while
# still exercising sequence lengths that are not multiples of the block.
INTERPRETER_BLOCK_M = 16
INTERPRETER_BLOCK_N = 16


@triton.jit
def _dim_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mask over the head dim; a compile-time all-true splat when the head dim is a power of two."""
    ok = tl.full([BLOCK_D], 1, tl.int1) if BLOCK_D == HEAD_DIM else offs_d < HEAD_DIM
    return ok


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _entropic_attn_fwd(
    Q,
    K,
    V,
    TEMP,
    KPM,
    OUT,
    LSE,
    ENT,
    sm_scale,
    H,
    T_Q,
    T_K,
    HEAD_DIM: tl.constexpr,
    CAUSAL_OFFSET,
    Q_BUCKET,  # autotuning key only (unused by the kernel body)
    K_BUCKET,
    CAUSAL: tl.constexpr,
    HAS_TEMP: tl.constexpr,
    HAS_KPM: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    bh = pid_bh.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T_Q
    d_ok = _dim_mask(offs_d, HEAD_DIM, BLOCK_D)

    q_base = Q + bh * T_Q * HEAD_DIM
    k_base = K + bh * T_K * HEAD_DIM
    v_base = V + bh * T_K * HEAD_DIM

    q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if IEEE_DOT:
        q = q.to(tl.float32)

    # Per-row logit factor r_i = scale / t_i.
    if HAS_TEMP:
        t = tl.load(TEMP + h * T_Q + offs_m, mask=row_ok, other=1.0).to(tl.float32)
        r = sm_scale / t
    else:
        r = tl.zeros([BLOCK_M], dtype=tl.float32) + sm_scale

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG_BIG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # Row i sees keys j <= i + CAUSAL_OFFSET (bottom-right aligned when T_Q != T_K).
        hi = (pid_m + 1) * BLOCK_M + CAUSAL_OFFSET
        hi = tl.minimum(tl.maximum(hi, 0), T_K)
    else:
        hi = T_K

    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < T_K
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        s = qk * r[:, None]

        visible = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + CAUSAL_OFFSET)
        if HAS_KPM:
            kp = tl.load(KPM + b * T_K + cols, mask=col_ok, other=0)
            visible = visible & (kp != 0)[None, :]

        s = tl.where(visible, s, 0.0)
        m_new = tl.maximum(m_i, tl.max(tl.where(visible, s, _NEG_BIG), 1))
        shift = m_i - m_new  # <= 0, finite
        alpha = tl.exp(shift)
        z = s - m_new[:, None]
        p = tl.where(visible, tl.exp(tl.where(visible, z, 0.0)), 0.0)
        l_sum = tl.sum(p, 1)
        a_i = alpha * (a_i + shift * l_i) + tl.sum(p * tl.where(visible, z, 0.0), 1)
        l_i = alpha * l_i + l_sum
        acc = acc * alpha[:, None]
        if IEEE_DOT:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_any = l_i > 0.0
    l_safe = tl.where(has_any, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_any, m_i + tl.log(l_safe), 0.0)
    ent = tl.where(has_any, tl.log(l_safe) - a_i / l_safe, 0.0)

    o_base = OUT + bh * T_Q * HEAD_DIM
    tl.store(
        o_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + bh * T_Q + offs_m, lse, mask=row_ok)
    tl.store(ENT + bh * T_Q + offs_m, ent, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _entropic_attn_bwd_preprocess(
    OUT,
    DO,
    LSE,
    ENT,
    DENT,
    DELTA,
    T_Q,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """δ'_i = Σ_d dO_id O_id − g_i (LSE_i − H_i)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T_Q
    mask = row_ok[:, None] & _dim_mask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    ptrs = bh * T_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(OUT + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = bh * T_Q + offs_m
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    ent = tl.load(ENT + row, mask=row_ok, other=0.0)
    g = tl.load(DENT + row, mask=row_ok, other=0.0)
    tl.store(DELTA + row, delta - g * (lse - ent), mask=row_ok)


@triton.jit
def _entropic_attn_bwd_dkdv(
    Q,
    K,
    V,
    TEMP,
    KPM,
    DO,
    LSE,
    DELTA,
    DENT,
    DK,
    DV,
    sm_scale,
    H,
    T_Q,
    T_K,
    HEAD_DIM: tl.constexpr,
    CAUSAL_OFFSET,
    Q_BUCKET,  # autotuning key only (unused by the kernel body)
    K_BUCKET,
    CAUSAL: tl.constexpr,
    HAS_TEMP: tl.constexpr,
    HAS_KPM: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per block of keys: loops over query rows, works on transposed tiles [N, M]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    bh = pid_bh.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < T_K
    d_ok = _dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    kv_mask = col_ok[:, None] & d_ok[None, :]

    kv_off = bh * T_K * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if IEEE_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = col_ok
    if HAS_KPM:
        kp = tl.load(KPM + b * T_K + offs_n, mask=col_ok, other=0)
        key_ok = key_ok & (kp != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # Rows i with i + CAUSAL_OFFSET >= first key of this block.
        lo = pid_n * BLOCK_N - CAUSAL_OFFSET
        lo = tl.maximum(lo, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    else:
        lo = 0

    q_base = Q + bh * T_Q * HEAD_DIM
    do_base = DO + bh * T_Q * HEAD_DIM
    for start_m in range(lo, T_Q, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T_Q
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        row_idx = bh * T_Q + rows
        lse = tl.load(LSE + row_idx, mask=row_ok, other=0.0)
        dlt = tl.load(DELTA + row_idx, mask=row_ok, other=0.0)
        g = tl.load(DENT + row_idx, mask=row_ok, other=0.0)
        if HAS_TEMP:
            t = tl.load(TEMP + h * T_Q + rows, mask=row_ok, other=1.0).to(tl.float32)
            r = sm_scale / t
        else:
            r = tl.zeros([BLOCK_M], dtype=tl.float32) + sm_scale

        if IEEE_DOT:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            kq = tl.dot(k, tl.trans(q), input_precision="ieee")  # [N, M]
            dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            kq = tl.dot(k, tl.trans(q))
            dpT = tl.dot(v, tl.trans(do))
        sT = kq * r[None, :]

        visible = key_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= rows[None, :] + CAUSAL_OFFSET)
        sT = tl.where(visible, sT, 0.0)
        pT = tl.where(visible, tl.exp(tl.where(visible, sT - lse[None, :], 0.0)), 0.0)
        dsT = pT * (dpT - dlt[None, :] - g[None, :] * sT)
        dqkT = dsT * r[None, :]
        if IEEE_DOT:
            dv += tl.dot(pT, do, input_precision="ieee")
            dk += tl.dot(dqkT, q, input_precision="ieee")
        else:
            dv += tl.dot(pT.to(do.dtype), do)
            dk += tl.dot(dqkT.to(q.dtype), q)

    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _entropic_attn_bwd_dq(
    Q,
    K,
    V,
    TEMP,
    KPM,
    DO,
    LSE,
    DELTA,
    DENT,
    DQ,
    DT,
    sm_scale,
    H,
    T_Q,
    T_K,
    HEAD_DIM: tl.constexpr,
    CAUSAL_OFFSET,
    Q_BUCKET,  # autotuning key only (unused by the kernel body)
    K_BUCKET,
    CAUSAL: tl.constexpr,
    HAS_TEMP: tl.constexpr,
    HAS_KPM: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per block of query rows: loops over keys; also d(t_i) per row when HAS_TEMP."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    bh = pid_bh.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T_Q
    d_ok = _dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_off = bh * T_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    if IEEE_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_idx = bh * T_Q + offs_m
    lse = tl.load(LSE + row_idx, mask=row_ok, other=0.0)
    dlt = tl.load(DELTA + row_idx, mask=row_ok, other=0.0)
    g = tl.load(DENT + row_idx, mask=row_ok, other=0.0)
    if HAS_TEMP:
        t = tl.load(TEMP + h * T_Q + offs_m, mask=row_ok, other=1.0).to(tl.float32)
        r = sm_scale / t
    else:
        t = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        r = tl.zeros([BLOCK_M], dtype=tl.float32) + sm_scale

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dss = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_j ds_ij s_ij (for the temperature)

    if CAUSAL:
        hi = (pid_m + 1) * BLOCK_M + CAUSAL_OFFSET
        hi = tl.minimum(tl.maximum(hi, 0), T_K)
    else:
        hi = T_K

    k_base = K + bh * T_K * HEAD_DIM
    v_base = V + bh * T_K * HEAD_DIM
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < T_K
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        s = qk * r[:, None]

        visible = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + CAUSAL_OFFSET)
        if HAS_KPM:
            kp = tl.load(KPM + b * T_K + cols, mask=col_ok, other=0)
            visible = visible & (kp != 0)[None, :]
        s = tl.where(visible, s, 0.0)
        p = tl.where(visible, tl.exp(tl.where(visible, s - lse[:, None], 0.0)), 0.0)
        ds = p * (dp - dlt[:, None] - g[:, None] * s)
        if HAS_TEMP:
            dss += tl.sum(ds * s, 1)
        dqk = ds * r[:, None]
        if IEEE_DOT:
            dq += tl.dot(dqk, k, input_precision="ieee")
        else:
            dq += tl.dot(dqk.to(k.dtype), k)

    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=q_mask)
    if HAS_TEMP:
        # s = qk·scale/t  =>  ∂s/∂t = −s/t.
        tl.store(DT + row_idx, -dss / t, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


def _cuda_configs() -> list[triton.Config]:
    configs = []
    for bm, bn in ((128, 64), (64, 64), (128, 128), (64, 128)):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                if warps == 8 and bm * bn < 128 * 64:
                    continue
                configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return configs


def _bwd_cuda_configs() -> list[triton.Config]:
    configs = []
    for bm, bn in ((64, 64), (64, 128), (128, 64)):
        for warps in (4, 8):
            for stages in (2, 3):
                configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return configs


# Lengths enter the key as power-of-two buckets: keyed on exact T_Q/T_K, every new length (each step of
# KV-cached generation, every ragged batch) would re-run the whole autotuning sweep.
_AUTOTUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_TEMP", "HAS_KPM", "IEEE_DOT"]


def length_bucket(length: int) -> int:
    """The autotuning bucket of a sequence length: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(length)))


if _INTERPRET_AT_IMPORT:
    # No autotuning under the interpreter: block sizes are passed explicitly at launch.
    _fwd_tuned = None
    _dkdv_tuned = None
    _dq_tuned = None
else:
    _fwd_tuned = triton.autotune(configs=_cuda_configs(), key=_AUTOTUNE_KEY)(_entropic_attn_fwd)
    _dkdv_tuned = triton.autotune(configs=_bwd_cuda_configs(), key=_AUTOTUNE_KEY)(_entropic_attn_bwd_dkdv)
    _dq_tuned = triton.autotune(configs=_bwd_cuda_configs(), key=_AUTOTUNE_KEY)(_entropic_attn_bwd_dq)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton_entropic_attention supports fp16, bf16 and fp32 inputs; got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    if q.device.type == "cuda":
        if _INTERPRET_AT_IMPORT:
            raise RuntimeError(
                "entropic_kernels was imported with TRITON_INTERPRET=1 (CPU interpreter); it cannot launch on CUDA "
                "tensors in this process"
            )
    elif q.device.type == "cpu":
        if not _INTERPRET_AT_IMPORT:
            raise RuntimeError(
                "triton_entropic_attention got CPU tensors but the Triton interpreter is off: set TRITON_INTERPRET=1 "
                "before importing entropic_kernels, use CUDA tensors, or use the PyTorch backend"
            )
    else:
        raise RuntimeError(f"triton_entropic_attention does not support device {q.device}")


def _forward(q, k, v, t_rows, kpm, causal, scale):
    batch, heads, t_q, dim = q.shape
    t_k = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(batch, heads, t_q, device=q.device, dtype=torch.float32)
    ent = torch.empty(batch, heads, t_q, device=q.device, dtype=torch.float32)
    dummy = lse  # any valid pointer for disabled optional inputs
    args = (
        q,
        k,
        v,
        t_rows if t_rows is not None else dummy,
        kpm if kpm is not None else dummy,
        o,
        lse,
        ent,
        scale,
        heads,
        t_q,
        t_k,
        dim,
        t_k - t_q,
        length_bucket(t_q),
        length_bucket(t_k),
    )
    flags = dict(
        CAUSAL=causal,
        HAS_TEMP=t_rows is not None,
        HAS_KPM=kpm is not None,
        IEEE_DOT=q.dtype == torch.float32,
        BLOCK_D=_block_d(dim),
    )
    bh = batch * heads
    if _fwd_tuned is None:
        grid = (triton.cdiv(t_q, INTERPRETER_BLOCK_M), bh)
        _entropic_attn_fwd[grid](*args, **flags, BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=INTERPRETER_BLOCK_N)
    else:
        _fwd_tuned[lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), bh)](*args, **flags)
    return o, lse, ent


def _backward(q, k, v, o, lse, ent, do, dent, t_rows, kpm, causal, scale):
    batch, heads, t_q, dim = q.shape
    t_k = k.shape[2]
    block_d = _block_d(dim)
    do = do.contiguous()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    dent = dent.to(torch.float32).contiguous()
    delta = torch.empty_like(lse)
    pre_block = INTERPRETER_BLOCK_M if _INTERPRET_AT_IMPORT else 64
    _entropic_attn_bwd_preprocess[(triton.cdiv(t_q, pre_block), batch * heads)](
        o, do, lse, ent, dent, delta, t_q, dim, BLOCK_M=pre_block, BLOCK_D=block_d
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    has_temp = t_rows is not None
    dt_rows = torch.empty(batch, heads, t_q, device=q.device, dtype=torch.float32) if has_temp else lse
    temp_arg = t_rows if has_temp else lse
    kpm_arg = kpm if kpm is not None else lse
    common = (scale, heads, t_q, t_k, dim, t_k - t_q, length_bucket(t_q), length_bucket(t_k))
    flags = dict(
        CAUSAL=causal, HAS_TEMP=has_temp, HAS_KPM=kpm is not None, IEEE_DOT=q.dtype == torch.float32, BLOCK_D=block_d
    )
    if _dkdv_tuned is None:
        grid_n = (triton.cdiv(t_k, INTERPRETER_BLOCK_N), batch * heads)
        _entropic_attn_bwd_dkdv[grid_n](
            q,
            k,
            v,
            temp_arg,
            kpm_arg,
            do,
            lse,
            delta,
            dent,
            dk,
            dv,
            *common,
            **flags,
            BLOCK_M=INTERPRETER_BLOCK_M,
            BLOCK_N=INTERPRETER_BLOCK_N,
        )
        grid_m = (triton.cdiv(t_q, INTERPRETER_BLOCK_M), batch * heads)
        _entropic_attn_bwd_dq[grid_m](
            q,
            k,
            v,
            temp_arg,
            kpm_arg,
            do,
            lse,
            delta,
            dent,
            dq,
            dt_rows,
            *common,
            **flags,
            BLOCK_M=INTERPRETER_BLOCK_M,
            BLOCK_N=INTERPRETER_BLOCK_N,
        )
    else:
        bh = batch * heads
        _dkdv_tuned[lambda meta: (triton.cdiv(t_k, meta["BLOCK_N"]), bh)](
            q, k, v, temp_arg, kpm_arg, do, lse, delta, dent, dk, dv, *common, **flags
        )
        _dq_tuned[lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), bh)](
            q, k, v, temp_arg, kpm_arg, do, lse, delta, dent, dq, dt_rows, *common, **flags
        )
    return dq, dk, dv, (dt_rows if has_temp else None)


class EntropicAttentionFunction(torch.autograd.Function):
    """Autograd wrapper. Inputs are contiguous [B, H, T, D]; ``t_rows`` is fp32 [H, Tq] or None."""

    @staticmethod
    def forward(ctx, q, k, v, t_rows, kpm, causal, scale):
        o, lse, ent = _forward(q, k, v, t_rows, kpm, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, ent, t_rows, kpm)
        ctx.causal = causal
        ctx.scale = scale
        return o, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dent):
        q, k, v, o, lse, ent, t_rows, kpm = ctx.saved_tensors
        dq, dk, dv, dt_rows = _backward(q, k, v, o, lse, ent, do, dent, t_rows, kpm, ctx.causal, ctx.scale)
        dt = dt_rows.sum(0) if (dt_rows is not None and ctx.needs_input_grad[3]) else None
        return dq, dk, dv, dt, None, None, None


def triton_entropic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    temperature: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention plus per-row entropy (nats); same contract as ``reference_entropic_attention``.

    Args:
        q, k, v: [B, H, T, D] in fp16, bf16 or fp32 (k/v may have another length when ``causal=False``;
            with ``causal=True`` and Tq != Tk the mask is bottom-right aligned like the reference).
        causal: query i attends to keys 0..i.
        scale: logit scale, default 1/sqrt(D).
        temperature: [H, Tq] or [H]; logits are divided by it. Differentiable.
        key_padding_mask: bool [B, Tk], True = attend.

    Returns:
        (out [B, H, Tq, D] in the input dtype, row_entropy [B, H, Tq] fp32). A row with no visible key gives
        out 0 and entropy 0.
    """
    _check_inputs(q, k, v, causal)
    batch, heads, t_q, dim = q.shape
    t_k = k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)

    t_rows = None
    if temperature is not None:
        t32 = temperature.to(device=q.device, dtype=torch.float32)
        if t32.dim() == 1 and t32.shape[0] == heads:
            t_rows = t32.view(heads, 1).expand(heads, t_q)  # autograd sums over queries for [H]
        elif t32.dim() == 2 and tuple(t32.shape) == (heads, t_q):
            t_rows = t32
        else:
            raise ValueError(
                f"temperature must be [H] or [H, Tq] = [{heads}] or [{heads}, {t_q}]; got {tuple(t32.shape)}"
            )
        t_rows = t_rows.contiguous()

    kpm = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, t_k):
            raise ValueError(
                f"key_padding_mask must be [B, Tk] = [{batch}, {t_k}]; got {tuple(key_padding_mask.shape)}"
            )
        kpm = key_padding_mask.to(device=q.device, dtype=torch.bool).to(torch.uint8).contiguous()

    in_dtype = q.dtype
    if _INTERPRET_AT_IMPORT and in_dtype == torch.bfloat16:
        # bf16 arithmetic is wrong in the interpreter: run the fp32 kernels on upcast inputs.
        q, k, v = q.float(), k.float(), v.float()

    out, ent = EntropicAttentionFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), t_rows, kpm, bool(causal), scale
    )
    if out.dtype != in_dtype:
        out = out.to(in_dtype)
    return out, ent

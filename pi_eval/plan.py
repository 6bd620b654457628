"""Plaintext "layer plan": the model as a list of blocks with numpy weights, plus an exact float64 reference forward.

The plan is what the protocol evaluates.  It is built from an ``entropic.models.EntropicForCausalLM`` by
:func:`pi_eval.extract.plan_from_model`, or by hand (tests, :func:`random_plan`).  Weights are stored as
``x @ W + b`` matrices (in_features x out_features).

Semantics of one block (pre-LN GPT-2 with the paper's switches)::

    h   = LN1(x)               (or x when LN1 is off)
    x   = x + Attn(h)          (causal softmax attention; scores * attn_scale per head [and query])
    h   = LN2(x)               (or x)
    x   = beta * x + (1/alpha) * FFN(h)
    FFN = fc_out(act(fc_in(h)))  |  fused(h) = h @ W + b  |  none

and after the last block ``logits = LNf(x) @ W_head + b_head``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "identity")


def act_fn(name: str, x: np.ndarray) -> np.ndarray:
    if name == "gelu":
        from math import sqrt

        try:
            from scipy.special import erf  # type: ignore
        except Exception:  # pragma: no cover - scipy optional
            erf = np.vectorize(math.erf)
        return 0.5 * x * (1.0 + erf(x / sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "identity":
        return x
    raise ValueError(f"unknown activation {name!r}; known: {ACTIVATIONS}")


def layernorm(x: np.ndarray, eps: float, gamma: np.ndarray | None = None, beta: np.ndarray | None = None):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def causal_attention(q, k, v, n_head: int, attn_scale: np.ndarray | None = None) -> np.ndarray:
    """q, k, v: [T, d] -> [T, d].  attn_scale: None, [H] or [H, T] (per head and query), multiplies the scores."""
    t, d = q.shape
    dh = d // n_head
    qh = q.reshape(t, n_head, dh).transpose(1, 0, 2)
    kh = k.reshape(t, n_head, dh).transpose(1, 0, 2)
    vh = v.reshape(t, n_head, dh).transpose(1, 0, 2)
    s = qh @ kh.transpose(0, 2, 1) / math.sqrt(dh)  # [H, T, T]
    if attn_scale is not None:
        a = np.asarray(attn_scale, dtype=np.float64)
        s = s * (a[:, None, None] if a.ndim == 1 else a[:, :t, None])
    s = np.where(np.tril(np.ones((t, t), dtype=bool)), s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(1, 0, 2).reshape(t, d)


@dataclass
class LN:
    gamma: np.ndarray
    beta: np.ndarray
    eps: float = 1e-5


@dataclass
class Block:
    n_head: int
    w_qkv: np.ndarray
    b_qkv: np.ndarray
    w_o: np.ndarray
    b_o: np.ndarray
    ln1: LN | None = None
    ln2: LN | None = None
    attn_scale: np.ndarray | None = None
    ffn: str = "mlp"  # "mlp" | "fused" | "none"
    act: str = "gelu"
    w_in: np.ndarray | None = None
    b_in: np.ndarray | None = None
    w_out: np.ndarray | None = None
    b_out: np.ndarray | None = None
    alpha: float = 1.0
    beta: float = 1.0

    def ffn_forward(self, h: np.ndarray, act_override=None) -> np.ndarray:
        if self.ffn == "none":
            return np.zeros_like(h)
        if self.ffn == "fused":
            return h @ self.w_in + self.b_in
        z = h @ self.w_in + self.b_in
        z = act_override(self.act, z) if act_override else act_fn(self.act, z)
        return z @ self.w_out + self.b_out


@dataclass
class ModelPlan:
    wte: np.ndarray  # [V, d]
    wpe: np.ndarray  # [P, d]
    blocks: list[Block]
    ln_f: LN | None
    w_head: np.ndarray  # [d, V]
    b_head: np.ndarray | None = None
    name: str = "custom"
    info: dict = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return self.wte.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.w_head.shape[1]

    def embed(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"input ids must be 1-D (one sequence), got shape {ids.shape}")
        if len(ids) > self.wpe.shape[0]:
            raise ValueError(f"sequence length {len(ids)} exceeds the context size {self.wpe.shape[0]}")
        return self.wte[ids].astype(np.float64) + self.wpe[: len(ids)].astype(np.float64)

    def forward(self, ids, act_override=None) -> np.ndarray:
        """Exact float64 plaintext forward -> logits [T, V]."""
        x = self.embed(ids)
        for b in self.blocks:
            h = layernorm(x, b.ln1.eps, b.ln1.gamma, b.ln1.beta) if b.ln1 else x
            qkv = h @ b.w_qkv + b.b_qkv
            d = x.shape[1]
            a = causal_attention(qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :], b.n_head, b.attn_scale)
            x = x + a @ b.w_o + b.b_o
            h = layernorm(x, b.ln2.eps, b.ln2.gamma, b.ln2.beta) if b.ln2 else x
            x = b.beta * x + b.ffn_forward(h, act_override) / b.alpha
        if self.ln_f:
            x = layernorm(x, self.ln_f.eps, self.ln_f.gamma, self.ln_f.beta)
        out = x @ self.w_head
        return out + self.b_head if self.b_head is not None else out


def random_plan(
    *,
    n_layer=1,
    d=32,
    n_head=2,
    vocab=64,
    n_pos=32,
    ln=True,
    act="gelu",
    ffn="mlp",
    ln_f=True,
    scaled=False,
    seed=0,
    std=0.2,
) -> ModelPlan:
    """A small random plan (used by tests and as a fallback when entropic.models is unavailable)."""
    rng = np.random.default_rng(seed)

    def w(*s):
        return rng.normal(0.0, std, size=s)

    def mk_ln():
        return LN(1.0 + 0.1 * rng.normal(size=d), 0.1 * rng.normal(size=d)) if ln else None

    blocks = []
    for _ in range(n_layer):
        blk = Block(n_head, w(d, 3 * d), w(3 * d), w(d, d) / 2, w(d), ln1=mk_ln(), ln2=mk_ln(), ffn=ffn, act=act)
        if ffn == "mlp":
            blk.w_in, blk.b_in, blk.w_out, blk.b_out = w(d, 4 * d), w(4 * d), w(4 * d, d) / 2, w(d)
        elif ffn == "fused":
            blk.w_in, blk.b_in = w(d, d), w(d)
        if scaled:
            blk.alpha, blk.beta = float(1.5 + rng.random()), float(0.5 + 0.5 * rng.random())
        blocks.append(blk)
    lnf = LN(1.0 + 0.1 * rng.normal(size=d), 0.1 * rng.normal(size=d)) if ln_f else None
    return ModelPlan(w(vocab, d), w(n_pos, d) / 2, blocks, lnf, w(d, vocab), w(vocab), name="random")

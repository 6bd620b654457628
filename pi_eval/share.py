"""What the client holds of the model (its *share*), and the schedule both parties must agree on.

The model owner (the server) exports a :class:`ClientShare` (``python -m pi_eval serve --client-share PATH``):

* the embedding tables ``wte`` [V, d] and ``wpe`` [P, d] (the client embeds its own tokens);
* per block, the public parameters of the nonlinear operations the client computes in mode A: the number of heads,
  the attention temperature scales (if any), the LayerNorm epsilons, the activation's name, and the residual-stream
  scale ``s`` by which it divides before a LayerNorm (the product of the FFN scales ``beta``);
* the architecture's shape: which blocks have LayerNorms, the FFN kind and width, whether there is a final
  LayerNorm, the vocabulary size.

It holds **no** linear weight, bias, LayerNorm gamma/beta (folded into the server's weights) nor the FFN scale
``alpha``.  :meth:`ClientShare.skeleton` is a :class:`~pi_eval.plan.ModelPlan` with these parameters and zero
weights: :func:`pi_eval.schedule.compile_schedule` gives it the same schedule as the full model (layouts, levels and
modes depend on shapes only), which the server checks step by step (:func:`schedule_digests`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .plan import LN, Block, ModelPlan
from .schedule import Schedule

SHARE_FORMAT = "pi_eval.client_share/1"


@dataclass
class ClientShare:
    wte: np.ndarray
    wpe: np.ndarray
    blocks: list[dict]  # n_head, ln1_eps, ln2_eps, ffn, act, d_ff, beta (ln*_eps None: no LayerNorm)
    attn_scales: list[np.ndarray | None]
    ln_f_eps: float | None
    vocab_size: int
    name: str = "model"
    info: dict = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: ModelPlan) -> ClientShare:
        blocks, scales = [], []
        for b in plan.blocks:
            blocks.append(
                {
                    "n_head": int(b.n_head),
                    "ln1_eps": None if b.ln1 is None else float(b.ln1.eps),
                    "ln2_eps": None if b.ln2 is None else float(b.ln2.eps),
                    "ffn": b.ffn,
                    "act": b.act,
                    "d_ff": None if b.w_in is None else int(b.w_in.shape[1]),
                    "beta": float(b.beta),
                }
            )
            scales.append(None if b.attn_scale is None else np.asarray(b.attn_scale, np.float64))
        return cls(
            np.asarray(plan.wte, np.float64),
            np.asarray(plan.wpe, np.float64),
            blocks,
            scales,
            None if plan.ln_f is None else float(plan.ln_f.eps),
            int(plan.vocab_size),
            plan.name,
            dict(plan.info),
        )

    def skeleton(self) -> ModelPlan:
        """The model with the client's parameters and zero weights (enough to compile the schedule)."""
        d = self.wte.shape[1]
        z = np.zeros
        blocks = []
        for spec, scale in zip(self.blocks, self.attn_scales, strict=True):
            ln = [None if spec[k] is None else LN(np.ones(d), z(d), spec[k]) for k in ("ln1_eps", "ln2_eps")]
            b = Block(spec["n_head"], z((d, 3 * d)), z(3 * d), z((d, d)), z(d), ln[0], ln[1], scale)
            b.ffn, b.act, b.beta = spec["ffn"], spec["act"], spec["beta"]
            if spec["ffn"] != "none":
                b.w_in, b.b_in = z((d, spec["d_ff"])), z(spec["d_ff"])
            if spec["ffn"] == "mlp":
                b.w_out, b.b_out = z((spec["d_ff"], d)), z(d)
            blocks.append(b)
        ln_f = None if self.ln_f_eps is None else LN(np.ones(d), z(d), self.ln_f_eps)
        return ModelPlan(self.wte, self.wpe, blocks, ln_f, z((d, self.vocab_size)), None, self.name, self.info)

    # ------------------------------------------------------------------ file format (npz, no pickle)
    def to_bytes(self) -> bytes:
        spec = {
            "format": SHARE_FORMAT,
            "blocks": self.blocks,
            "ln_f_eps": self.ln_f_eps,
            "vocab_size": self.vocab_size,
            "name": self.name,
            "info": self.info,
            "attn_scale": [s is not None for s in self.attn_scales],
        }
        arrays = {"wte": self.wte, "wpe": self.wpe, "spec": np.frombuffer(json.dumps(spec).encode(), np.uint8)}
        arrays.update({f"attn_scale_{i}": s for i, s in enumerate(self.attn_scales) if s is not None})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> Path:
        from entropic.io import atomic_write_bytes

        atomic_write_bytes(Path(path), self.to_bytes())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClientShare:
        try:
            with np.load(path, allow_pickle=False) as z:
                spec = json.loads(z["spec"].tobytes())
                if spec.get("format") != SHARE_FORMAT:
                    raise ValueError(f"format {spec.get('format')!r}, expected {SHARE_FORMAT!r}")
                scales = [z[f"attn_scale_{i}"] if has else None for i, has in enumerate(spec["attn_scale"])]
                return cls(
                    z["wte"],
                    z["wpe"],
                    spec["blocks"],
                    scales,
                    spec["ln_f_eps"],
                    spec["vocab_size"],
                    spec["name"],
                    spec.get("info", {}),
                )
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{os.fspath(path)!r} is not a pi_eval client share ({e})") from None


# ---------------------------------------------------------------------------------------------- schedule agreement
def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not serializable: {type(x).__name__}")


def schedule_digests(sched: Schedule) -> list[str]:
    """One SHA-256 (hex, 32 chars) per schedule entry: the header, then every step with its layouts and function.

    Equal lists mean both parties run the same protocol: same parameter set, sequence length, packing, modes, levels,
    and the same client functions (LayerNorm eps and stream scale, heads, attention scales, polynomials, masks).
    """
    head = {"params": sched.params.describe(), "seq_len": sched.seq_len, "g": sched.g, "groups": sched.groups}
    entries = [("schedule", head)]
    for st in sched.steps:
        d = {k: getattr(st, k) for k in ("name", "layer", "kind", "mode", "op", "src", "dst", "residual")}
        d.update(level_in=st.level_in, level_out=st.level_out, fn=st.fn)
        for k in ("src_layout", "dst_layout"):
            lay = getattr(st, k)
            d[k] = None if lay is None else {**lay.to_dict(), "size": lay.size}
        entries.append((st.name, d))
    out = []
    for name, d in entries:
        blob = json.dumps(d, sort_keys=True, default=_jsonable).encode()
        out.append(f"{name}:{hashlib.sha256(blob).hexdigest()[:32]}")
    return out


class ScheduleMismatchError(ValueError):
    """The client's schedule is not the one the server's model gives for the same request."""


def check_digests(mine: list[str], theirs: object) -> None:
    if not isinstance(theirs, list) or not all(isinstance(x, str) for x in theirs):
        raise ScheduleMismatchError("the hello carries no schedule digest list")
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            raise ScheduleMismatchError(
                f"schedule differs from the server's model at entry {i} ({b.split(':')[0]!r} vs the server's "
                f"{a.split(':')[0]!r}): the client's share does not match the served model (architecture, LayerNorm "
                "eps, residual scales, heads or attention scales) or the request differs"
            )
    if len(mine) != len(theirs):
        raise ScheduleMismatchError(
            f"schedule has {len(theirs)} entries, the server's model gives {len(mine)} for this request"
        )

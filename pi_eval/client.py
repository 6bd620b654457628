"""The client: holds the CKKS secret key and the input.

It embeds its tokens (it holds the embedding tables), encrypts them token-packed, performs the client-aided
operations of mode A (decrypt -> exact function in float64 -> re-encrypt) and the hiding refreshes of mode B
(:mod:`pi_eval.refresh`: it decrypts the masked polynomial as exact integers, never decoded to slot values, and
re-encrypts it; the flooding mask keeps the value statistically hidden), and decrypts the logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import tenseal as ts

from .bsgs import public_context
from .channel import Channel, Message
from .diagonal import schedule_galois_steps
from .layout import Layout
from .limits import data_limits
from .ops import Op
from .params import ParamSet
from .plan import act_fn, causal_attention, layernorm
from .rawpoly import RawCKKS
from .refresh import ClientRefresher, MaskSpec
from .rss import peak_rss_bytes
from .schedule import Schedule, Step
from .share import schedule_digests
from .stats import ClientStepStats

_POWER_OF_TWO_BYTES: dict[str, int] = {}  # per parameter set: Client.power_of_two_context_bytes, once per process


def pack(X: np.ndarray, lay: Layout, groups: int) -> list[list[np.ndarray]]:
    """[T, D] -> groups x chunks of flat vectors in the (piece, token, feature) order."""
    T, D = X.shape
    Xp = np.zeros((groups * lay.g, lay.pieces * lay.w))
    Xp[:T, :D] = X
    out = []
    for j in range(groups):
        G = Xp[j * lay.g : (j + 1) * lay.g].reshape(lay.g, lay.pieces, lay.w).transpose(1, 0, 2)
        out.append([lay.replicate(G[list(lay.chunk_pieces(c))].reshape(-1)) for c in range(lay.chunks)])
    return out


def unpack(vecs: list[list[np.ndarray]], lay: Layout, T: int) -> np.ndarray:
    rows = []
    for grp in vecs:
        G = np.concatenate(
            [
                np.asarray(v)[: len(lay.chunk_pieces(c)) * lay.g * lay.w].reshape(-1, lay.g, lay.w)
                for c, v in enumerate(grp)
            ],
            axis=0,
        )  # [pieces, g, w]
        rows.append(G.transpose(1, 0, 2).reshape(lay.g, lay.pieces * lay.w))
    return np.concatenate(rows, axis=0)[:T, : lay.dim]


class Client:
    def __init__(self, params: ParamSet, wte: np.ndarray, wpe: np.ndarray, *, threads: int = 1):
        self.params = params.check()
        self.wte, self.wpe = np.asarray(wte, np.float64), np.asarray(wpe, np.float64)
        self.he = 0.0
        t0 = time.perf_counter()
        self.ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            n_threads=threads,
        )
        self.ctx.global_scale = 2.0**params.scale_bits
        self.keygen_s = time.perf_counter() - t0  # Galois keys are added per schedule, in public_context(steps)
        self.galois_steps: tuple[int, ...] | None = None  # the steps of the last public context built
        self.step_stats: dict[str, ClientStepStats] = {}
        self.refresher: ClientRefresher | None = None
        self.timing: dict[str, float] = {}  # wall time of the last run: setup (hello + context), online (input..logits)
        self.progress: Callable[[str], None] | None = None  # called with one line per layer reached (e.g. stderr)

    def public_context(self, steps: Sequence[int] | None = None) -> bytes:
        """Public, relinearization and Galois keys only (no secret key).

        ``steps``: the rotation steps to carry Galois keys for (:func:`pi_eval.diagonal.schedule_galois_steps`
        of the schedule, what :meth:`run` sends); ``None``: TenSEAL's default power-of-two set (the comparison
        :meth:`power_of_two_context_bytes` measures).
        """
        t0 = time.perf_counter()
        if steps is None:
            ctx = self.ctx.copy()
            ctx.generate_galois_keys()
            blob = ctx.serialize(
                save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True
            )
        else:
            self.galois_steps = tuple(steps)
            blob = public_context(self.ctx, self.galois_steps)
        dt = time.perf_counter() - t0
        self.keygen_s += dt
        self.he += dt
        return blob

    def power_of_two_context_bytes(self) -> int:
        """Bytes of this client's public context with TenSEAL's default power-of-two Galois keys (2 log2(N/2) - 1
        rotations and the conjugation): the setup pi_eval sent before the schedule's own key list.  Measured on a
        copy of the context, once per parameter set and process; not sent."""
        name = self.params.name
        if name not in _POWER_OF_TWO_BYTES:
            he, kg = self.he, self.keygen_s
            _POWER_OF_TWO_BYTES[name] = len(self.public_context(None))
            self.he, self.keygen_s = he, kg
        return _POWER_OF_TWO_BYTES[name]

    # ------------------------------------------------------------------ HE helpers (timed)
    def _enc(self, vecs):
        t0 = time.perf_counter()
        out = [ts.ckks_vector(self.ctx, v.tolist()).serialize() for grp in vecs for v in grp]
        self.he += time.perf_counter() - t0
        return out

    def _dec(self, blobs, lay: Layout, groups: int):
        t0 = time.perf_counter()
        flat = [np.asarray(ts.ckks_vector_from(self.ctx, b).decrypt()) for b in blobs]
        self.he += time.perf_counter() - t0
        per = lay.chunks if lay is not None else 1
        return [flat[j * per : (j + 1) * per] for j in range(groups)]

    def _refresher(self) -> ClientRefresher:
        if self.refresher is None:
            self.refresher = ClientRefresher(RawCKKS(self.params, self.ctx), 2.0**self.params.scale_bits)
        return self.refresher

    def _stat(self, name: str) -> ClientStepStats:
        return self.step_stats.setdefault(name, ClientStepStats())

    # ------------------------------------------------------------------ protocol
    def run(self, channel: Channel, sched: Schedule, ids, request: dict) -> np.ndarray:
        """One inference.  ``request``: what the server compiles its schedule from (params, seq_len, modes,
        allow_refresh, poly_degree); the server checks that it gives this schedule, step by step."""
        ids = np.asarray(ids)
        T = len(ids)
        if sched.seq_len != T:
            raise ValueError(f"input has {T} tokens, the schedule was compiled for {sched.seq_len}")
        by_name = {s.name: s for s in sched.steps}
        t_setup = time.perf_counter()
        channel.handshake(request, schedule_digests(sched))
        channel.codec.recv_limit, channel.codec.phase = data_limits(sched)[1], "a data frame"
        steps = schedule_galois_steps(sched)  # the server derives the same list from its schedule and checks it
        ack = channel.exchange(Message("setup", "setup", {}, [self.public_context(steps)]), bucket="setup")
        if ack.meta.get("server_has_secret_key"):
            raise RuntimeError("server reports holding a secret key")
        # input: embedding lookup happens here, on the client; the online phase starts
        t_online = time.perf_counter()
        self.timing = {"setup_wall_s": t_online - t_setup}
        first = sched.steps[0]
        rec, t0, h0 = self._stat("input"), time.perf_counter(), self.he
        x = self.wte[ids] + self.wpe[:T]
        blobs = self._enc(pack(x, first.dst_layout, sched.groups))
        rec.client_s += time.perf_counter() - t0
        rec.he_s += self.he - h0
        reply = channel.exchange(Message("data", "input", {}, blobs))
        n_layer, reached = max(s.layer for s in sched.steps), -1
        while True:
            st = by_name.get(reply.label)
            if st is None:
                raise ValueError(f"server sent an unknown step {reply.label!r}")
            if self.progress is not None and st.layer > reached:
                reached = st.layer
                where = "head" if st.layer >= n_layer else f"layer {st.layer + 1}/{n_layer}"
                self.progress(
                    f"{where} ({st.name}, mode {st.mode}) after {time.perf_counter() - t_online:.1f} s online; "
                    f"client peak RSS {peak_rss_bytes() / 1e9:.2f} GB"
                )
            rec, t0, h0 = self._stat(st.name), time.perf_counter(), self.he
            if reply.kind == "result":
                if not st.spec.final:
                    raise ValueError(f"server sent a result for step {st.name!r} of op {st.op}")
                logits = unpack(self._dec(reply.blobs, st.src_layout, sched.groups), st.src_layout, T)
                rec.client_s += time.perf_counter() - t0
                rec.he_s += self.he - h0
                self.timing["online_wall_s"] = time.perf_counter() - t_online
                return logits
            answer = self._answers.get(st.op) if st.spec.sends_down else None
            if answer is None:
                raise ValueError(f"server asked the client for step {st.name!r} of op {st.op}")
            blobs = answer(st, reply.blobs, sched.groups, T)
            rec.client_s += time.perf_counter() - t0
            rec.he_s += self.he - h0
            reply = channel.exchange(Message("data", st.name, {}, blobs))

    @property
    def _answers(self) -> dict[Op, Callable[[Step, list[bytes], int, int], list[bytes]]]:
        """The client's reply to each op whose register the server sends down and answers (:data:`pi_eval.ops.OPS`:
        ``sends_down`` and ``client_replies``)."""
        return {Op.CLIENT_AIDED: self._client_aided, Op.REFRESH: self._refresh}

    def _client_aided(self, st: Step, blobs: list[bytes], groups: int, T: int) -> list[bytes]:
        """Mode A: decrypt, the exact function, re-encrypt in the destination layout."""
        X = unpack(self._dec(blobs, st.src_layout, groups), st.src_layout, T)
        return self._enc(pack(self.apply(st.fn, X), st.dst_layout, groups))

    def _refresh(self, st: Step, blobs: list[bytes], groups: int, T: int) -> list[bytes]:
        """Mode B: re-encrypt the masked polynomial exactly, never decoding it (:mod:`pi_eval.refresh`)."""
        spec = MaskSpec(st.fn["value_bound"], st.fn["sigma"])
        th = time.perf_counter()
        out = [self._refresher().refresh(b, spec) for b in blobs]
        self.he += time.perf_counter() - th
        return out

    @staticmethod
    def apply(fn: dict, X: np.ndarray) -> np.ndarray:
        """Exact plaintext functions of mode A (affine LN parameters are folded into the next linear layer)."""
        name = fn["name"]
        if name == "layernorm":
            return layernorm(X * fn["scale"], fn["eps"])
        if name == "attention":
            d = X.shape[1] // 3
            scale = fn.get("attn_scale")
            return causal_attention(
                X[:, :d], X[:, d : 2 * d], X[:, 2 * d :], fn["n_head"], None if scale is None else np.asarray(scale)
            )
        return act_fn(name, X)

"""Compile a ModelPlan into the protocol's schedule: packing layouts, modes, level plan, server weights.

Packing (private-inference notes §1.5, block-diagonal / multi-token).  A *register* holds an activation [T, D] as
ciphertexts: tokens are split into groups of ``g``; features are cut into *pieces* of width ``w = d_model``; a chunk
holds ``cp`` consecutive pieces of one group in the order (piece, token, feature), and a ciphertext stores its chunk
``copies`` times back to back::

    slot index = copy * n_c + (piece - first_piece) * g * w + token_in_group * w + feature_in_piece

A linear layer maps an input chunk to an output chunk with one diagonal product (the semantics of TenSEAL's ``mm``;
the server runs it as BSGS on the generalized diagonals, :mod:`pi_eval.diagonal`, :mod:`pi_eval.bsgs`) on a matrix
that is block diagonal over tokens, ``M[(m,k,t,e), (q,k',t',e')] = [t == t'] * W[k*w+e, k'*w+e']`` for one chosen
input copy ``m`` per output block.  ``mm`` on a vector of declared size ``n`` computes output ``j`` from slot
``j + ((row - j) mod n)`` and rotations are cyclic over *all* slots, so entry (row, j) reads slot ``row`` when either
``row >= j`` or ``n`` is the whole slot vector.  A fresh TenSEAL ciphertext is replicated over all slots, an ``mm``
output is not, so a register is declared one of two ways:

* *compact* (size ``copies * n_c`` < slots): every non-zero entry needs ``row >= col``; choosing for each output
  block the first input copy that lies "below" it satisfies this and keeps all blocks on the same few diagonals
  (about ``cp_in * (2w - 1)`` non-zero diagonals, TenSEAL skips zero ones, instead of ``g * d_in`` for naive token
  packing).  A server-side linear whose input is not fresh loses copies like it loses levels; the planner tracks
  both and inserts a refresh (mode B) when either runs out.
* *cyclic* (declared size = slots, ``copies = slots // n_c``, zero tail): any entry is exact, so no copy is ever
  lost.  Used when the copies a compact register would need do not fit.  The BSGS product encodes only the
  diagonals its weight placements occupy, so it does not pay TenSEAL ``mm``'s scan of all ``n_in`` candidates.

Token groups are as large as the slots allow (``g = min(T, slots // w)``, then balanced), so every register goes
in the fewest ciphertexts its payload allows (see :mod:`pi_eval.slots` for the slot-use accounting).

Modes (labels on every operation, :class:`pi_eval.ops.Mode`):  A client-aided (decrypt, exact function, re-encrypt;
1 round trip), B masked refresh (level reset; 1 round trip), C polynomial under encryption (levels, no traffic),
D removed (the architecture has none), and "HE" for linear layers on the server.  What each operation does for each
party: :data:`pi_eval.ops.OPS`.

:class:`ScheduleBuilder` compiles one model for one request, one method per part of a block (input embeddings,
attention, FFN with its norm and activation, LM head, output) on a set of :class:`Register` s whose level, valid
copies and layout it tracks; :func:`compile_schedule` runs it, retries with cyclic registers or refreshable linear
outputs when the hiding refresh needs them, and raises the level-budget errors before any key exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .layout import Layout, LinearWeights, req_copies, valid_out_copies
from .ops import OPS, Direction, Kind, Mode, Op, OpSpec, activation_kind, parse_modes
from .params import LevelBudgetError, ParamSet, secure_sets, sets_with_levels
from .plan import LN, Block, ModelPlan
from .refresh import MaskSpec, min_refresh_level

__all__ = ["Layout", "LinearWeights", "MaskHeadroomError", "Schedule", "ScheduleBuilder", "Step", "compile_schedule"]


class MaskHeadroomError(LevelBudgetError):
    """The parameter set has no level with room for the hiding refresh's flooding mask where the circuit needs one."""


@dataclass
class Step:
    name: str  # unique label, e.g. "L0.attn"
    layer: int  # -1: embedding/input, n_layer: head
    kind: Kind
    mode: Mode
    op: Op
    src: str | None = None
    dst: str | None = None
    residual: str | None = None
    fn: dict = field(default_factory=dict)  # client function / polynomial / mask description
    level_in: int | None = None
    level_out: int | None = None
    src_layout: Layout | None = None
    dst_layout: Layout | None = None

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    def messages(self) -> list[tuple[Direction, Layout]]:
        """The registers this step sends, in order: the source down to the client, the destination up to the server."""
        out = []
        if self.spec.sends_down:
            out.append((Direction.DOWN, self.src_layout))
        if self.spec.client_replies:
            out.append((Direction.UP, self.dst_layout))
        return out


@dataclass
class Schedule:
    steps: list[Step]
    params: ParamSet
    seq_len: int
    g: int  # tokens per group
    groups: int
    w: int  # piece width (d_model)
    server_weights: dict[str, LinearWeights]  # linear step name -> weights
    modes: dict[Kind, Mode]  # the mode of each nonlinearity the model has


def fit_poly(act: str, degree: int, interval: float) -> list[float]:
    """Least-squares polynomial (coefficients low->high) for an activation on [-interval, interval]."""
    from .plan import act_fn

    xs = np.linspace(-interval, interval, 2001)
    coef = np.polynomial.polynomial.polyfit(xs, act_fn(act, xs), degree)
    return [float(c) for c in coef]


def poly_act_override(sched: Schedule):
    """``act_override`` for :meth:`ModelPlan.forward` that applies the schedule's mode-C polynomials (None if none).

    The plaintext reference of a run with polynomial activations is the model with those polynomials.
    """
    from .plan import act_fn

    polys = {st.fn["name"]: st.fn["coeffs"] for st in sched.steps if st.mode is Mode.POLYNOMIAL}
    if not polys:
        return None
    return lambda name, z: np.polynomial.polynomial.polyval(z, polys[name]) if name in polys else act_fn(name, z)


def poly_depth(degree: int) -> int:
    """TenSEAL polyval depth: floor(log2 d) + 1 (the coefficient multiplication costs a level)."""
    return math.floor(math.log2(degree)) + 1 if degree >= 1 else 0


def residual_copies(plan: ModelPlan) -> int:
    """Copies the residual stream x needs: the most output pieces a server linear reading x directly computes."""
    r = 2
    for b in plan.blocks:
        if b.ln1 is None:
            r = max(r, 4)  # qkv reads x: 3 output pieces
        if b.ln2 is None and b.ffn == "mlp":
            r = max(r, 1 + math.ceil(b.w_in.shape[1] / plan.d_model))
        if b.ln2 is None and b.ffn == "fused":
            r = max(r, 3)
    return r


def choose_group(plan: ModelPlan, seq_len: int, slots: int) -> int:
    """Tokens per group: as many as one ciphertext holds (``slots // d_model``), balanced over the groups.

    Copies never limit the group: a register whose copies do not fit is declared cyclic instead.
    """
    w = plan.d_model
    if w > slots:
        raise LevelBudgetError(
            f"d_model={w} does not fit one ciphertext of {slots} slots; use a parameter set with more slots: "
            f"{[p.name for p in sets_with_levels(1, w)]}"
        )
    groups = math.ceil(seq_len / min(seq_len, slots // w))
    return math.ceil(seq_len / groups)


@dataclass
class Register:
    """What the compiler knows of a register (``x``, ``h``, ``qkv``, ``a``, ``z``, ``logits``) at a point."""

    layout: Layout
    level: int
    valid_copies: int  # copies holding correct values (a server linear's output may hold fewer than declared)
    consumed: int = 0  # levels used since the register was last fresh (the depth bound without refreshes)


class ScheduleBuilder:
    """Compiles one :class:`ModelPlan` for one request into a :class:`Schedule` (call :meth:`compile`).

    The residual stream ``x`` is held on the server divided by a running scale ``s`` (products of the FFN scales
    beta), folded into the plaintext weights; LayerNorm gamma/beta and the FFN's alpha are folded the same way.
    Problems are collected, not raised: :func:`compile_schedule` reads :attr:`level_failures`,
    :attr:`mask_failures` and :attr:`copy_short` to retry or to raise.
    """

    def __init__(
        self,
        plan: ModelPlan,
        params: ParamSet,
        seq_len: int,
        modes: dict[Kind, Mode],
        *,
        allow_refresh: bool,
        poly_degree: int,
        poly_interval: float,
        mask: MaskSpec,
        cyclic: frozenset[str] = frozenset(),
        linear_outputs_below_floor: bool = True,
    ):
        self.plan, self.params, self.seq_len, self.modes = plan, params, seq_len, modes
        self.allow_refresh, self.mask = allow_refresh, mask
        self.poly_degree, self.poly_interval = poly_degree, poly_interval
        self.cyclic = cyclic  # registers declared cyclic (a refresh would have had to restore their copies)
        # first attempt: a linear's output may drop below the refresh floor (it is refreshed only if it must be)
        self.linear_outputs_below_floor = linear_outputs_below_floor
        self.w, self.top_level, self.slots = plan.d_model, params.levels, params.slots
        self.g = choose_group(plan, seq_len, self.slots)
        self.groups = math.ceil(seq_len / self.g)
        self.pieces_per_ciphertext = max(1, self.slots // (self.w * self.g))
        self.refresh_floor = 0  # the lowest level a hiding refresh can mask (above the top: none can)
        if allow_refresh:
            lowest = min_refresh_level(params, mask)
            self.refresh_floor = self.top_level + 1 if lowest is None else lowest
        self.regs: dict[str, Register] = {}
        self.steps: list[Step] = []
        self.weights: dict[str, LinearWeights] = {}
        self.depth_needed = 0  # the most levels used between two fresh ciphertexts
        self.level_failures: list[str] = []  # refreshes disabled and levels or copies ran out
        self.mask_failures: list[str] = []  # a refresh the mask has no room for
        self.copy_short: set[str] = set()  # registers a refresh would have to re-replicate
        self.stream_scale = 1.0  # the server's residual ciphertext holds x / s

    # ------------------------------------------------------------------ the model, part by part
    def compile(self) -> ScheduleBuilder:
        self.input_embeddings()
        for i, blk in enumerate(self.plan.blocks):
            self.attention(i, blk)
            self.ffn(i, blk)
        self.lm_head()
        self.output()
        return self

    def schedule(self) -> Schedule:
        used = {
            st.kind: st.mode for st in self.steps if st.kind in (Kind.LAYERNORM, Kind.ATTENTION, Kind.GELU, Kind.RELU)
        }
        return Schedule(self.steps, self.params, self.seq_len, self.g, self.groups, self.w, self.weights, used)

    def input_embeddings(self) -> None:
        """The client's embedded tokens, encrypted into ``x`` with the copies every server read of x needs."""
        self._fresh("x", self._layout(self.w, 1, residual_copies(self.plan), "x"))
        self.steps.append(
            Step(
                "input",
                -1,
                Kind.INPUT,
                Mode.SERVER_HE,
                Op.INPUT,
                dst="x",
                level_out=self.top_level,
                dst_layout=self.regs["x"].layout,
            )
        )

    def attention(self, i: int, blk: Block) -> None:
        """``x = x + o_proj(Attn(qkv(LN1(x))))``: LN1 and attention on the client (mode A), qkv and o_proj on the
        server; LN1's gamma/beta and the stream scale are folded into qkv."""
        d, s = self.w, self.stream_scale
        if blk.ln1 is not None:
            self._layernorm(f"L{i}.ln1", i, blk.ln1, self._copies_needed(1, self._pieces_per_chunk(3 * d)))
            W = blk.ln1.gamma[:, None] * blk.w_qkv
            b = blk.ln1.beta @ blk.w_qkv + blk.b_qkv
            self._linear(f"L{i}.qkv", i, "h", "qkv", W, b, to_client=True)
        else:
            self._linear(f"L{i}.qkv", i, "x", "qkv", s * blk.w_qkv, blk.b_qkv, to_client=True)
        fn = {"name": "attention", "n_head": blk.n_head}
        if blk.attn_scale is not None:
            fn["attn_scale"] = np.asarray(blk.attn_scale, dtype=np.float64).tolist()
        copies = self._copies_needed(1, 1, self.regs["x"].layout.copies)
        self._client_aided(f"L{i}.attn", i, Kind.ATTENTION, "qkv", "a", fn, d, 1, copies)
        self._linear(f"L{i}.o_proj", i, "a", "x", blk.w_o / s, blk.b_o / s, residual="x")

    def ffn(self, i: int, blk: Block) -> None:
        """``x = beta * x + FFN(LN2(x)) / alpha``; the stream scale becomes ``beta * s`` (folded into the weights)."""
        s_new = blk.beta * self.stream_scale
        k_out = 1.0 / (blk.alpha * s_new)  # what the FFN's output weights are multiplied by
        if blk.ffn == "mlp":
            z_layout, z_on_server = self._ffn_hidden_layout(blk)
            fc_in_copies = z_layout.copies if (z_on_server and not z_layout.cyclic) else 1
            src, W_in, ln_beta = self._ffn_input(i, blk, self._copies_needed(1, z_layout.cp, fc_in_copies))
            self._mlp(i, blk, src, W_in, ln_beta, k_out, z_layout, z_on_server)
        else:
            src, W_in, ln_beta = self._ffn_input(i, blk, self._copies_needed(1, 1, self.regs["x"].layout.copies))
            if blk.ffn == "fused":
                self._fused_ffn(i, blk, src, W_in, ln_beta, k_out)
        self.stream_scale = s_new

    def activation(self, i: int, blk: Block) -> None:
        """The FFN's activation on ``z``: nothing (identity, mode D), the client (mode A) or a polynomial (mode C)."""
        kind = activation_kind(blk.act)
        z = self.regs["z"]
        if kind is None:
            self.steps.append(
                Step(
                    f"L{i}.act",
                    i,
                    Kind.IDENTITY,
                    Mode.REMOVED,
                    Op.SKIP,
                    src="z",
                    dst="z",
                    level_in=z.level,
                    level_out=z.level,
                )
            )
        elif self.modes[kind] is Mode.CLIENT_AIDED:
            copies = self._copies_needed(z.layout.cp, 1, self.regs["x"].layout.copies)
            self._client_aided(
                f"L{i}.act", i, kind, "z", "z", {"name": blk.act}, blk.w_in.shape[1], z.layout.cp, copies
            )
        else:
            self._polynomial(f"L{i}.act", i, kind, blk.act)

    def lm_head(self) -> None:
        """``logits = LNf(x) @ W_head + b``: LNf on the client, its gamma/beta folded into the head; without LNf the
        head reads the residual stream, with as many logit pieces per chunk as x's copies allow."""
        plan, head, s = self.plan, len(self.plan.blocks), self.stream_scale
        if plan.ln_f is not None:
            head_cp = self._pieces_per_chunk(plan.vocab_size)
            self._layernorm("ln_f", head, plan.ln_f, self._copies_needed(1, head_cp))
            W = plan.ln_f.gamma[:, None] * plan.w_head
            b = plan.ln_f.beta @ plan.w_head + (plan.b_head if plan.b_head is not None else 0)
            self._linear("lm_head", head, "h", "logits", W, b, out_cp=head_cp, to_client=True, at_lowest_level=True)
        else:
            x = self.regs["x"].layout
            fits = [
                c
                for c in range(1, self._pieces_per_chunk(plan.vocab_size) + 1)
                if x.cyclic or self._copies_needed(1, c) <= x.copies
            ]
            head_cp = max(fits or [1])
            W, b = s * plan.w_head, plan.b_head
            self._linear("lm_head", head, "x", "logits", W, b, out_cp=head_cp, to_client=True, at_lowest_level=True)

    def output(self) -> None:
        logits = self.regs["logits"]
        self.steps.append(
            Step(
                "logits",
                len(self.plan.blocks),
                Kind.OUTPUT,
                Mode.SERVER_HE,
                Op.OUTPUT,
                src="logits",
                level_in=logits.level,
                src_layout=logits.layout,
            )
        )

    # ------------------------------------------------------------------ parts of a part
    def _ffn_hidden_layout(self, blk: Block) -> tuple[Layout, bool]:
        """The layout of the MLP's hidden register ``z`` and whether it stays on the server between fc_in and fc_out
        (identity or mode-C activation: then it carries the copies fc_out needs)."""
        on_server = blk.act == "identity" or self.modes[activation_kind(blk.act)] is not Mode.CLIENT_AIDED
        d_ff = blk.w_in.shape[1]
        copies = self._copies_needed(self._pieces_per_chunk(d_ff), 1, self.regs["x"].layout.copies) if on_server else 1
        return self._layout(d_ff, None, copies, "z"), on_server

    def _ffn_input(self, i: int, blk: Block, copies: int) -> tuple[str, np.ndarray | None, np.ndarray | None]:
        """(register the FFN reads, its first weight with what is folded into it, LN2's beta for the bias): LN2(x) from
        the client in ``h`` with ``copies`` copies (gamma folded), or the stream x itself (held as x / s: s folded)."""
        if blk.ln2 is not None:
            self._layernorm(f"L{i}.ln2", i, blk.ln2, copies)
            return "h", (blk.ln2.gamma[:, None] * blk.w_in if blk.ffn != "none" else None), blk.ln2.beta
        return "x", (self.stream_scale * blk.w_in if blk.ffn != "none" else None), None

    def _mlp(
        self,
        i: int,
        blk: Block,
        src: str,
        W_in: np.ndarray,
        ln_beta: np.ndarray | None,
        k_out: float,
        z_layout: Layout,
        z_on_server: bool,
    ) -> None:
        """fc_in -> activation -> fc_out, the residual added by fc_out."""
        b_in = (ln_beta @ blk.w_in if ln_beta is not None else 0) + blk.b_in
        self._linear(f"L{i}.fc_in", i, src, "z", W_in, b_in, out_layout=z_layout, to_client=not z_on_server)
        self.activation(i, blk)
        self._linear(f"L{i}.fc_out", i, "z", "x", blk.w_out * k_out, blk.b_out * k_out, residual="x")

    def _fused_ffn(self, i: int, blk: Block, src: str, W_in: np.ndarray, ln_beta: np.ndarray | None, k_out: float):
        """One linear for the whole FFN; reading x itself, the residual is folded into the matrix:
        x~' = x~ + (s x~ W + b) / (alpha beta s)."""
        b = ((ln_beta @ blk.w_in if ln_beta is not None else 0) + blk.b_in) * k_out
        if src == "x":
            self._linear(f"L{i}.ffn", i, "x", "x", np.eye(self.w) + W_in * k_out, b, out_layout=self.regs["x"].layout)
        else:
            self._linear(f"L{i}.ffn", i, src, "x", W_in * k_out, b, residual="x")

    def _layernorm(self, name: str, layer: int, ln: LN, copies: int) -> None:
        """LayerNorm of x (held as x / s) on the client into ``h``; gamma/beta go into the next linear."""
        fn = {"name": "layernorm", "eps": ln.eps, "scale": self.stream_scale}
        self._client_aided(name, layer, Kind.LAYERNORM, "x", "h", fn, self.w, 1, copies)

    def _polynomial(self, name: str, layer: int, kind: Kind, act: str) -> None:
        """Mode C: the activation's least-squares polynomial on ``z`` under encryption (refreshed first if needed)."""
        coeffs = fit_poly(act, self.poly_degree, self.poly_interval)
        depth = poly_depth(self.poly_degree)
        self._make_ready("z", depth, layer, name)
        z = self.regs["z"]
        fn = {"name": act, "degree": self.poly_degree, "interval": self.poly_interval, "coeffs": coeffs}
        self.steps.append(
            Step(
                name,
                layer,
                kind,
                Mode.POLYNOMIAL,
                Op.POLYNOMIAL,
                src="z",
                dst="z",
                fn=fn,
                level_in=z.level,
                level_out=z.level - depth,
            )
        )
        z.level -= depth
        z.consumed += depth

    def _client_aided(
        self,
        name: str,
        layer: int,
        kind: Kind,
        src: str,
        dst: str,
        fn: dict,
        dst_dim: int,
        dst_cp: int | None,
        copies: int,
    ) -> None:
        """Mode A: the client computes ``fn`` of ``src``; ``dst`` comes back fresh with ``copies`` copies."""
        lay = self._layout(dst_dim, dst_cp, copies, dst)
        source = self.regs[src]
        self.steps.append(
            Step(
                name,
                layer,
                kind,
                Mode.CLIENT_AIDED,
                Op.CLIENT_AIDED,
                src=src,
                dst=dst,
                fn=fn,
                level_in=source.level,
                level_out=self.top_level,
                src_layout=source.layout,
                dst_layout=lay,
            )
        )
        self._fresh(dst, lay)

    def _linear(
        self,
        name: str,
        layer: int,
        src: str,
        dst: str,
        W: np.ndarray,
        b: np.ndarray | None,
        *,
        residual: str | None = None,
        out_cp: int | None = None,
        out_layout: Layout | None = None,
        to_client: bool = False,
        at_lowest_level: bool = False,
    ) -> None:
        """A server linear ``dst = src @ W + b (+ residual)``; the output takes the residual's layout, or
        ``out_layout``, or a new one with ``out_cp`` pieces per chunk.  ``to_client``: the output goes to the client
        (it may use the lowest levels); ``at_lowest_level``: it is only decrypted (the logits), so the server
        computes it at level 1 (input mod-switched down) and it arrives at level 0: fewer primes in every plaintext,
        product, rotation and downloaded ciphertext."""
        lin0 = self.regs[src].layout
        lout = self.regs[residual].layout if residual is not None else (out_layout or self._layout(W.shape[1], out_cp))
        need_copies = 1 if lin0.cyclic else self._copies_needed(lin0.cp, lout.cp)
        self._make_ready(src, 1, layer, name, need_copies, to_client or self.linear_outputs_below_floor)
        source = self.regs[src]
        lin = source.layout
        q_valid = valid_out_copies(lin, lout.cp, lout.copies, source.valid_copies)
        self.weights[name] = LinearWeights(np.asarray(W, np.float64), b, lin, lout, q_valid, source.valid_copies)
        level, consumed = (0 if at_lowest_level else source.level - 1), source.consumed + 1
        if residual is not None:
            res = self.regs[residual]
            level, consumed = min(level, res.level), max(consumed, res.consumed)
            q_valid = min(q_valid, res.valid_copies)
        self.steps.append(
            Step(
                name,
                layer,
                Kind.LINEAR,
                Mode.SERVER_HE,
                Op.LINEAR,
                src=src,
                dst=dst,
                residual=residual,
                level_in=source.level,
                level_out=level,
                src_layout=lin,
                dst_layout=lout,
            )
        )
        self.regs[dst] = Register(lout, level, q_valid, consumed)

    # ------------------------------------------------------------------ registers: layouts, levels, refreshes
    def _pieces_per_chunk(self, dim: int) -> int:
        """Pieces per chunk of a register of ``dim`` features: as many as fit (fewest ciphertexts)."""
        return min(math.ceil(dim / self.w), self.pieces_per_ciphertext)

    def _layout(self, dim: int, cp: int | None = None, copies: int = 1, reg: str | None = None) -> Layout:
        """A register of ``dim`` features with ``cp`` pieces per chunk (default: as many as fit) and ``copies``;
        cyclic when the copies do not fit or ``reg`` was made cyclic by a retry."""
        w, g, slots = self.w, self.g, self.slots
        cp = max(1, min(self._pieces_per_chunk(dim), cp or self.pieces_per_ciphertext))
        n_c = cp * g * w
        if copies * n_c >= slots or reg in self.cyclic:
            return Layout(dim, math.ceil(dim / w), cp, g, w, slots // n_c, slots)
        return Layout(dim, math.ceil(dim / w), cp, g, w, copies)

    def _copies_needed(self, src_cp: int, dst_cp: int, r_out: int = 1) -> int:
        """Copies a compact register read by a linear needs for ``r_out`` output copies of ``dst_cp`` pieces."""
        return req_copies(src_cp, dst_cp, r_out, self.g, self.w)

    def _fresh(self, reg: str, lay: Layout) -> None:
        self.regs[reg] = Register(lay, self.top_level, lay.copies, 0)

    def _make_ready(self, reg: str, cost: int, layer: int, who: str, copies: int = 1, to_client: bool = False) -> None:
        """Make ``reg`` ready for an HE op of depth ``cost``: refresh (mode B) when levels or copies run short.

        The op's output must stay at or above the refresh floor (the lowest level a hiding refresh can mask) unless
        it goes straight to the client or the output (``to_client``), which never needs a refresh.
        """
        r = self.regs[reg]
        self.depth_needed = max(self.depth_needed, r.consumed + cost)
        low = 0 if to_client else self.refresh_floor
        if r.level - cost >= low and r.valid_copies >= copies:
            return
        if not self.allow_refresh:
            if r.level < cost:
                self.level_failures.append(f"{who} needs {cost} level(s), {reg!r} has {r.level}")
            else:
                self.level_failures.append(
                    f"{who} needs {copies} replicated copies of {reg!r}, {r.valid_copies} are valid"
                )
            r.level, r.valid_copies = self.top_level, r.layout.copies
            return
        self._refresh(reg, layer, who, cost, copies, low)

    def _refresh(self, reg: str, layer: int, who: str, cost: int, copies: int, low: int) -> None:
        """Mode B before ``who``: the register back at the top level, same slots (so no copy is restored)."""
        r = self.regs[reg]
        if r.level < self.refresh_floor:
            self.mask_failures.append(f"{who}: {reg!r} would be refreshed at level {r.level} < {self.refresh_floor}")
        if self.top_level - cost < low:
            self.mask_failures.append(
                f"{who} needs {cost} level(s) above level {low}, a fresh ciphertext has {self.top_level - low}"
            )
        if r.valid_copies < copies:
            self.copy_short.add(reg)
            self.mask_failures.append(f"{who} needs {copies} replicated copies of {reg!r}, {r.valid_copies} are valid")
        self.steps.append(
            Step(
                f"{who}.refresh",
                layer,
                Kind.REFRESH,
                Mode.HIDING_REFRESH,
                Op.REFRESH,
                src=reg,
                dst=reg,
                fn={"name": "refresh", **self.mask.to_dict()},
                level_in=r.level,
                level_out=self.top_level,
                src_layout=r.layout,
                dst_layout=r.layout,
            )
        )
        r.level, r.consumed = self.top_level, 0


# ---------------------------------------------------------------------------------------------- entry point
def compile_schedule(
    plan: ModelPlan,
    params: ParamSet,
    seq_len: int,
    modes: dict | None = None,
    *,
    allow_refresh: bool = True,
    poly_degree: int = 2,
    poly_interval: float = 4.0,
    mask: MaskSpec | None = None,
) -> Schedule:
    """Build the schedule and check the level budget before anything is encrypted.

    ``modes``: ``{kind: mode}`` overrides of :data:`pi_eval.ops.DEFAULT_MODES` (strings, e.g. ``{"gelu": "C"}``).
    Raises LevelBudgetError when some operation needs more levels than ``params`` provide and refreshes (mode B)
    are disabled, MaskHeadroomError when the hiding refresh has no room where the circuit needs one; both name the
    secure parameter sets that would fit.
    """
    return _compile(plan, params, seq_len, modes, allow_refresh, poly_degree, poly_interval, mask or MaskSpec(), True)


def _compile(plan, params, seq_len, modes, allow_refresh, poly_degree, poly_interval, mask, suggest) -> Schedule:
    table = parse_modes(modes)
    if seq_len < 1 or seq_len > plan.wpe.shape[0]:
        raise ValueError(f"seq_len={seq_len} must be in [1, {plan.wpe.shape[0]}] (the model's context)")
    cyclic, below_floor = frozenset(), True
    while True:
        b = ScheduleBuilder(
            plan,
            params,
            seq_len,
            table,
            allow_refresh=allow_refresh,
            poly_degree=poly_degree,
            poly_interval=poly_interval,
            mask=mask,
            cyclic=cyclic,
            linear_outputs_below_floor=below_floor,
        ).compile()
        if b.level_failures:
            raise _level_budget_error(b)
        if not b.mask_failures:
            return b.schedule()
        # Retries: registers a refresh would have to re-replicate become cyclic (they never lose copies); then, if a
        # register was refreshed below the mask's level, plan again keeping every linear's output refreshable.
        more = b.copy_short - cyclic
        if not (more or below_floor):
            break
        cyclic, below_floor = cyclic | more, below_floor and bool(more)
    can = []
    if suggest:
        for p in secure_sets():
            if p.name == params.name:
                continue
            try:
                _compile(plan, p, seq_len, modes, True, poly_degree, poly_interval, mask, False)
                can.append(p.name)
            except (LevelBudgetError, ValueError):
                pass
    lowest = min_refresh_level(params, mask)
    L = params.levels
    raise MaskHeadroomError(
        f"parameter set {params.name!r} cannot carry the hiding refresh (mode B) this circuit needs: the "
        f"flooding mask (sigma={mask.sigma}, |values| <= {mask.value_bound}) fits only at level "
        f"{'none' if lowest is None else f'>= {lowest}'} of {L}, leaving {max(0, L - (lowest or L))} level(s) "
        f"between refreshes; first problems: {b.mask_failures[:3]}. "
        + (f"Parameter sets that can: {can}." if can else "No built-in secure parameter set can; use mode A.")
    )


def _level_budget_error(b: ScheduleBuilder) -> LevelBudgetError:
    fits = [p.name for p in sets_with_levels(b.depth_needed, 2 * b.w)]
    return LevelBudgetError(
        f"circuit needs {b.depth_needed} levels between refreshes but parameter set {b.params.name!r} provides "
        f"{b.top_level} and refreshes (mode B) are disabled; first problems: {b.level_failures[:3]}. "
        + (
            f"Parameter sets that fit: {fits}."
            if fits
            else "No secure built-in parameter set fits; allow refreshes (mode B) or use client-aided modes."
        )
    )

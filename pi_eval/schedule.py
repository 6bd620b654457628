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

Modes (labels on every operation):  A client-aided (decrypt, exact function, re-encrypt; 1 round trip),
B masked refresh (level reset; 1 round trip), C polynomial under encryption (levels, no traffic),
D removed (the architecture has none), and "HE" for linear layers on the server.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .params import LevelBudgetError, ParamSet, secure_sets, sets_with_levels
from .plan import ModelPlan
from .refresh import MaskSpec, min_refresh_level


class MaskHeadroomError(LevelBudgetError):
    """The parameter set has no level with room for the hiding refresh's flooding mask where the circuit needs one."""


NONLINEAR_DEFAULT_MODES = {"layernorm": "A", "attention": "A", "gelu": "A", "relu": "A"}
ALLOWED_MODES = {"layernorm": {"A"}, "attention": {"A"}, "gelu": {"A", "C"}, "relu": {"A", "C"}}


@dataclass(frozen=True)
class Layout:
    dim: int  # true feature count D
    pieces: int  # ceil(D / w)
    cp: int  # pieces per ciphertext chunk
    g: int  # tokens per group
    w: int  # piece width
    copies: int = 1  # the chunk is stored `copies` times back to back
    slots: int = 0  # > 0: cyclic register, declared size = all slots (zero tail after the copies)

    @property
    def chunks(self) -> int:
        return math.ceil(self.pieces / self.cp)

    @property
    def n_c(self) -> int:
        return self.cp * self.g * self.w

    @property
    def cyclic(self) -> bool:
        return self.slots > 0

    @property
    def size(self) -> int:
        """Declared vector size of each ciphertext (the ``mm`` input/output length)."""
        return self.slots if self.cyclic else self.copies * self.n_c

    def chunk_pieces(self, c: int) -> range:
        return range(c * self.cp, min(self.pieces, (c + 1) * self.cp))

    def replicate(self, chunk: np.ndarray) -> np.ndarray:
        """One chunk's values [<= n_c] -> the declared vector [size]: ``copies`` copies, zeros elsewhere."""
        out = np.zeros(self.size)
        one = np.zeros(self.n_c)
        one[: len(chunk)] = chunk
        out[: self.copies * self.n_c] = np.tile(one, self.copies)
        return out

    def to_dict(self):
        return {
            "dim": self.dim,
            "pieces": self.pieces,
            "cp": self.cp,
            "g": self.g,
            "w": self.w,
            "copies": self.copies,
            "cyclic": self.cyclic,
        }


@dataclass
class Step:
    name: str  # unique label, e.g. "L0.attn"
    layer: int  # -1: embedding/input, n_layer: head
    kind: str  # linear | attention | layernorm | gelu | relu | refresh | input | output
    mode: str  # HE | A | B | C | D
    op: str  # input | linear | client | refresh | poly | output | skip
    src: str | None = None
    dst: str | None = None
    residual: str | None = None
    fn: dict = field(default_factory=dict)  # client function / polynomial description
    level_in: int | None = None
    level_out: int | None = None
    src_layout: Layout | None = None
    dst_layout: Layout | None = None

    def public(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "layer", "kind", "mode", "op", "level_in", "level_out")}
        d["fn"] = {k: v for k, v in self.fn.items() if k in ("name", "degree", "interval")}
        return d


@dataclass
class Schedule:
    steps: list[Step]
    params: ParamSet
    seq_len: int
    g: int
    groups: int
    w: int
    server_weights: dict  # name -> LinearWeights
    client_info: dict  # per client step: extra public parameters (eps, n_head, attention scale, stream scale)
    modes: dict


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

    polys = {st.fn["name"]: st.fn["coeffs"] for st in sched.steps if st.mode == "C"}
    if not polys:
        return None
    return lambda name, z: np.polynomial.polynomial.polyval(z, polys[name]) if name in polys else act_fn(name, z)


def poly_depth(degree: int) -> int:
    """TenSEAL polyval depth: floor(log2 d) + 1 (the coefficient multiplication costs a level)."""
    return math.floor(math.log2(degree)) + 1 if degree >= 1 else 0


def req_copies(cp_in: int, cp_out: int, r_out: int, g: int, w: int) -> int:
    """Compact input copies needed so that r_out output copies of cp_out pieces are computed without wrap-around."""
    n_cin, n_cout = cp_in * g * w, cp_out * g * w
    m_max = max(-(-(q * n_cout + b * g * w + w - 1) // n_cin) for q in range(r_out) for b in range(cp_out))
    return m_max + 1


def valid_out_copies(lin: Layout, cp_out: int, r_decl: int, valid_in: int) -> int:
    """Output copies an ``mm`` computes correctly from ``valid_in`` valid input copies (all of them if cyclic)."""
    if lin.cyclic:
        return r_decl
    q = 0
    while q < r_decl and req_copies(lin.cp, cp_out, q + 1, lin.g, lin.w) <= valid_in:
        q += 1
    return q


def block_matrix(
    W: np.ndarray, lin: Layout, lout: Layout, cin: int, cout: int, q_valid: int, valid_in: int
) -> np.ndarray:
    """Block-diagonal-over-tokens matrix [lin.size, lout.size] for input chunk cin -> output chunk cout.

    Fills the first ``q_valid`` output copies, reading only the first ``valid_in`` input copies.  The **dense
    reference** of a layer's packing: the server never builds it (it runs :mod:`pi_eval.diagonal`'s placements, which
    the tests check against this), the tests' plaintext model of ``mm`` and the dense baseline of
    ``benchmarks/pi_eval_scale.py`` do.
    """
    w, g = lin.w, lin.g
    pin, pout = lin.chunk_pieces(cin), lout.chunk_pieces(cout)
    n_cin, n_cout = lin.n_c, lout.n_c
    Wp = np.zeros((lin.pieces * w, lout.pieces * w))
    Wp[: W.shape[0], : W.shape[1]] = W
    M = np.zeros((lin.size, lout.size))
    for q in range(q_valid):
        for bb, ko in enumerate(pout):
            c0 = q * n_cout + bb * g * w
            for aa, ki in enumerate(pin):
                blk = Wp[ki * w : (ki + 1) * w, ko * w : (ko + 1) * w]
                if not blk.any():
                    continue
                if lin.cyclic:  # any copy is exact; the nearest one at or after the block keeps diagonals shared
                    m = min(range(valid_in), key=lambda m: (m * n_cin + aa * g * w - c0) % lin.size)
                else:
                    m = max(0, -(-(c0 + w - 1 - aa * g * w) // n_cin))
                    if m >= valid_in:
                        raise AssertionError("not enough valid input copies (planner bug)")
                r0 = m * n_cin + aa * g * w
                for t in range(g):
                    M[r0 + t * w : r0 + (t + 1) * w, c0 + t * w : c0 + (t + 1) * w] = blk
    return M


def tile_bias(b: np.ndarray | None, lout: Layout, cout: int, q_valid: int) -> np.ndarray:
    pout = lout.chunk_pieces(cout)
    w, g = lout.w, lout.g
    bp = np.zeros(lout.pieces * w)
    if b is not None:
        bp[: len(b)] = b
    chunk = np.concatenate([np.tile(bp[k * w : (k + 1) * w], g) for k in pout])
    out = np.zeros(lout.size)
    out[: q_valid * lout.n_c] = np.tile(np.pad(chunk, (0, lout.n_c - len(chunk))), q_valid)
    return out


@dataclass
class LinearWeights:
    """What the server needs for one linear layer: the weights in numpy and the layouts they map between.

    The server turns them into BSGS diagonals when the layer runs (:class:`pi_eval.diagonal.DiagonalLinear`);
    :meth:`matrices` is the dense reference (tests, the benchmark's baseline).
    """

    W: np.ndarray
    b: np.ndarray | None
    lin: Layout
    lout: Layout
    q_valid: int  # output copies computed
    valid_in: int  # input copies that may be read

    def matrices(self) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """((input chunk, output chunk), dense matrix) for every non-zero pair, one at a time (slots x slots each:
        the dense reference, see :func:`block_matrix`)."""
        for ci in range(self.lin.chunks):
            for co in range(self.lout.chunks):
                M = block_matrix(self.W, self.lin, self.lout, ci, co, self.q_valid, self.valid_in)
                if M.any():
                    yield (ci, co), M

    def biases(self) -> list[np.ndarray]:
        return [tile_bias(self.b, self.lout, co, self.q_valid) for co in range(self.lout.chunks)]


def _x_copies(plan: ModelPlan) -> int:
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


def kind_of(act: str) -> str | None:
    return "relu" if act == "relu" else ("gelu" if act.startswith("gelu") else None)


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
    _suggest: bool = True,
    _cyclic: frozenset = frozenset(),
    _relaxed: bool = True,
) -> Schedule:
    """Build the schedule and check the level budget before anything is encrypted.

    Raises LevelBudgetError when some operation needs more levels than ``params`` provide and refreshes (mode B)
    are disabled; the message names the depth needed and the secure parameter sets that would fit.
    """
    modes = {**NONLINEAR_DEFAULT_MODES, **(modes or {})}
    for k, m in modes.items():
        if k not in ALLOWED_MODES:
            raise ValueError(f"unknown operation kind {k!r} in modes; known: {sorted(ALLOWED_MODES)}")
        if m not in ALLOWED_MODES[k]:
            raise ValueError(f"mode {m!r} not supported for {k}; allowed: {sorted(ALLOWED_MODES[k])}")
    if seq_len < 1 or seq_len > plan.wpe.shape[0]:
        raise ValueError(f"seq_len={seq_len} must be in [1, {plan.wpe.shape[0]}] (the model's context)")
    w, L, slots = plan.d_model, params.levels, params.slots
    g = choose_group(plan, seq_len, slots)
    groups = math.ceil(seq_len / g)
    rx = _x_copies(plan)
    cap = max(1, slots // (w * g))  # pieces one ciphertext holds

    def pc(dim: int) -> int:
        """Pieces per chunk of a register of ``dim`` features: as many as fit (fewest ciphertexts)."""
        return min(math.ceil(dim / w), cap)

    def layout(dim: int, cp: int | None = None, copies: int = 1, reg: str | None = None) -> Layout:
        cp = max(1, min(pc(dim), cp or cap))
        n_c = cp * g * w
        if copies * n_c >= slots or reg in _cyclic:  # the copies a compact register needs do not fit: declare it cyclic
            return Layout(dim, math.ceil(dim / w), cp, g, w, slots // n_c, slots)
        return Layout(dim, math.ceil(dim / w), cp, g, w, copies)

    def copies_for(src_cp: int, dst_cp: int, r_out: int = 1) -> int:
        """Copies a compact register read by an ``mm`` needs for ``r_out`` output copies of ``dst_cp`` pieces."""
        return req_copies(src_cp, dst_cp, r_out, g, w)

    steps: list[Step] = []
    weights: dict = {}
    client: dict = {}
    levels: dict[str, int] = {}
    valid: dict[str, int] = {}  # copies that hold correct values
    consumed: dict[str, int] = {}  # levels consumed since the register was last fresh (for the no-refresh bound)
    layouts: dict[str, Layout] = {}
    need = [0]
    failures: list[str] = []
    mask_failures: list[str] = []
    copy_short: set[str] = set()  # registers a refresh would have to re-replicate: retried as cyclic registers
    mask = mask or MaskSpec()
    floor = 0
    if allow_refresh:
        lowest = min_refresh_level(params, mask)
        floor = L + 1 if lowest is None else lowest

    def fresh(reg: str, lay: Layout):
        levels[reg], consumed[reg], layouts[reg], valid[reg] = L, 0, lay, lay.copies

    def ensure(reg: str, cost: int, layer: int, who: str, copies: int = 1, to_client: bool = False):
        """Make ``reg`` ready for an HE op of depth ``cost``: refresh (mode B) when levels or copies run short.

        The op's output must stay at or above ``floor`` (the lowest level a hiding refresh can mask) unless it goes
        straight to the client or the output (``to_client``), which never needs a refresh.
        """
        need[0] = max(need[0], consumed[reg] + cost)
        low = 0 if to_client else floor
        if levels[reg] - cost >= low and valid[reg] >= copies:
            return
        if not allow_refresh:
            if levels[reg] < cost:
                failures.append(f"{who} needs {cost} level(s), {reg!r} has {levels[reg]}")
            else:
                failures.append(f"{who} needs {copies} replicated copies of {reg!r}, {valid[reg]} are valid")
            levels[reg], valid[reg] = L, layouts[reg].copies
            return
        if levels[reg] < floor:
            mask_failures.append(f"{who}: {reg!r} would be refreshed at level {levels[reg]} < {floor}")
        if L - cost < low:
            mask_failures.append(f"{who} needs {cost} level(s) above level {low}, a fresh ciphertext has {L - low}")
        if valid[reg] < copies:  # the hiding refresh returns the same slots: it cannot restore replicated copies
            copy_short.add(reg)
            mask_failures.append(f"{who} needs {copies} replicated copies of {reg!r}, {valid[reg]} are valid")
        steps.append(
            Step(
                f"{who}.refresh",
                layer,
                "refresh",
                "B",
                "refresh",
                src=reg,
                dst=reg,
                fn={"name": "refresh", **mask.to_dict()},
                level_in=levels[reg],
                level_out=L,
                src_layout=layouts[reg],
                dst_layout=layouts[reg],
            )
        )
        levels[reg], consumed[reg] = L, 0

    def linear(name, layer, src, dst, W, b, residual=None, out_cp=None, out_layout=None, to_client=False):
        lin0 = layouts[src]
        lout = layouts[residual] if residual is not None else (out_layout or layout(W.shape[1], out_cp))
        need_copies = 1 if lin0.cyclic else copies_for(lin0.cp, lout.cp)
        ensure(src, 1, layer, name, need_copies, to_client or _relaxed)
        lin = layouts[src]
        q_valid = valid_out_copies(lin, lout.cp, lout.copies, valid[src])
        weights[name] = LinearWeights(np.asarray(W, np.float64), b, lin, lout, q_valid, valid[src])
        lvl = levels[src] - 1
        cons = consumed[src] + 1
        if residual is not None:
            lvl, cons = min(lvl, levels[residual]), max(cons, consumed[residual])
            q_valid = min(q_valid, valid[residual])
        steps.append(
            Step(
                name,
                layer,
                "linear",
                "HE",
                "linear",
                src=src,
                dst=dst,
                residual=residual,
                level_in=levels[src],
                level_out=lvl,
                src_layout=lin,
                dst_layout=lout,
            )
        )
        levels[dst], consumed[dst], layouts[dst], valid[dst] = lvl, cons, lout, q_valid

    def client_step(name, layer, kind, src, dst, fn, dst_dim, dst_cp=None, copies=1):
        lay = layout(dst_dim, dst_cp, copies, dst)
        steps.append(
            Step(
                name,
                layer,
                kind,
                "A",
                "client",
                src=src,
                dst=dst,
                fn=fn,
                level_in=levels[src],
                level_out=L,
                src_layout=layouts[src],
                dst_layout=lay,
            )
        )
        client[name] = fn
        fresh(dst, lay)

    fresh("x", layout(w, 1, rx, "x"))
    steps.append(Step("input", -1, "input", "HE", "input", dst="x", level_out=L, dst_layout=layouts["x"]))
    s = 1.0  # the server's residual ciphertext holds x / s (scalars folded into plaintext weights)
    for i, blk in enumerate(plan.blocks):
        d = w
        # ---- attention
        if blk.ln1 is not None:
            client_step(
                f"L{i}.ln1",
                i,
                "layernorm",
                "x",
                "h",
                {"name": "layernorm", "eps": blk.ln1.eps, "scale": s},
                d,
                1,
                copies_for(1, pc(3 * d)),
            )
            Wq = blk.ln1.gamma[:, None] * blk.w_qkv
            bq = blk.ln1.beta @ blk.w_qkv + blk.b_qkv
            linear(f"L{i}.qkv", i, "h", "qkv", Wq, bq, to_client=True)
        else:
            linear(f"L{i}.qkv", i, "x", "qkv", s * blk.w_qkv, blk.b_qkv, to_client=True)
        fn = {"name": "attention", "n_head": blk.n_head}
        if blk.attn_scale is not None:
            fn["attn_scale"] = np.asarray(blk.attn_scale, dtype=np.float64).tolist()
        client_step(f"L{i}.attn", i, "attention", "qkv", "a", fn, d, 1, copies_for(1, 1, layouts["x"].copies))
        linear(f"L{i}.o_proj", i, "a", "x", blk.w_o / s, blk.b_o / s, residual="x")
        # ---- FFN: x_out = beta*x + FFN(h)/alpha ; new stream scale s' = beta*s
        s_new = blk.beta * s
        k_out = 1.0 / (blk.alpha * s_new)
        if blk.ffn == "mlp":
            # z feeds fc_out on the server unless the client applies the activation (mode A)
            z_direct = blk.act == "identity" or modes[kind_of(blk.act)] != "A"
            d_ff = blk.w_in.shape[1]
            z_lay = layout(d_ff, None, copies_for(pc(d_ff), 1, layouts["x"].copies) if z_direct else 1, "z")
            fc_in_copies = z_lay.copies if (z_direct and not z_lay.cyclic) else 1
            h_copies = copies_for(1, z_lay.cp, fc_in_copies)
        else:
            h_copies = copies_for(1, 1, layouts["x"].copies)
        if blk.ln2 is not None:
            client_step(
                f"L{i}.ln2",
                i,
                "layernorm",
                "x",
                "h",
                {"name": "layernorm", "eps": blk.ln2.eps, "scale": s},
                d,
                1,
                h_copies,
            )
            src, W_in, b_in_ln = "h", blk.ln2.gamma[:, None] * blk.w_in if blk.ffn != "none" else None, blk.ln2.beta
        else:
            src, W_in, b_in_ln = "x", s * blk.w_in if blk.ffn != "none" else None, None
        if blk.ffn == "none":
            pass
        elif blk.ffn == "fused":
            b_f = (b_in_ln @ blk.w_in if b_in_ln is not None else 0) + blk.b_in
            if src == "x":  # x~' = x~ + (s x~ W + b)/(alpha beta s): residual folded into the matrix
                Wf = np.eye(d) + W_in * k_out
                linear(f"L{i}.ffn", i, "x", "x", Wf, b_f * k_out, out_layout=layouts["x"])
            else:
                linear(f"L{i}.ffn", i, src, "x", W_in * k_out, b_f * k_out, residual="x")
        else:
            b1 = (b_in_ln @ blk.w_in if b_in_ln is not None else 0) + blk.b_in
            linear(f"L{i}.fc_in", i, src, "z", W_in, b1, out_layout=z_lay, to_client=not z_direct)
            kind = kind_of(blk.act)
            if kind is None:  # identity activation, unfused: mode D
                steps.append(
                    Step(
                        f"L{i}.act",
                        i,
                        "identity",
                        "D",
                        "skip",
                        src="z",
                        dst="z",
                        level_in=levels["z"],
                        level_out=levels["z"],
                    )
                )
            elif modes[kind] == "A":
                client_step(
                    f"L{i}.act",
                    i,
                    kind,
                    "z",
                    "z",
                    {"name": blk.act},
                    blk.w_in.shape[1],
                    layouts["z"].cp,
                    copies_for(layouts["z"].cp, 1, layouts["x"].copies),
                )
            else:  # C: polynomial under encryption
                coeffs = fit_poly(blk.act, poly_degree, poly_interval)
                dep = poly_depth(poly_degree)
                ensure("z", dep, i, f"L{i}.act")
                steps.append(
                    Step(
                        f"L{i}.act",
                        i,
                        kind,
                        "C",
                        "poly",
                        src="z",
                        dst="z",
                        fn={"name": blk.act, "degree": poly_degree, "interval": poly_interval, "coeffs": coeffs},
                        level_in=levels["z"],
                        level_out=levels["z"] - dep,
                    )
                )
                levels["z"] -= dep
                consumed["z"] += dep
            linear(f"L{i}.fc_out", i, "z", "x", blk.w_out * k_out, blk.b_out * k_out, residual="x")
        s = s_new
    if plan.ln_f is not None:
        head_cp = pc(plan.vocab_size)
        client_step(
            "ln_f",
            len(plan.blocks),
            "layernorm",
            "x",
            "h",
            {"name": "layernorm", "eps": plan.ln_f.eps, "scale": s},
            w,
            1,
            copies_for(1, head_cp),
        )
        Wh = plan.ln_f.gamma[:, None] * plan.w_head
        bh = plan.ln_f.beta @ plan.w_head + (plan.b_head if plan.b_head is not None else 0)
        linear("lm_head", len(plan.blocks), "h", "logits", Wh, bh, out_cp=head_cp, to_client=True)
    else:  # the head reads the residual stream: as many logit pieces per chunk as x's copies allow
        lx = layouts["x"]
        fits = [c for c in range(1, pc(plan.vocab_size) + 1) if lx.cyclic or copies_for(1, c) <= lx.copies]
        head_cp = max(fits or [1])
        linear("lm_head", len(plan.blocks), "x", "logits", s * plan.w_head, plan.b_head, out_cp=head_cp, to_client=True)
    steps.append(
        Step(
            "logits",
            len(plan.blocks),
            "output",
            "HE",
            "output",
            src="logits",
            level_in=levels["logits"],
            src_layout=layouts["logits"],
        )
    )
    if failures:
        fits = [p.name for p in sets_with_levels(need[0], 2 * w)]
        raise LevelBudgetError(
            f"circuit needs {need[0]} levels between refreshes but parameter set {params.name!r} provides {L} "
            f"and refreshes (mode B) are disabled; first problems: {failures[:3]}. "
            + (
                f"Parameter sets that fit: {fits}."
                if fits
                else "No secure built-in parameter set fits; allow refreshes (mode B) or use client-aided modes."
            )
        )
    # Retries: registers a refresh would have to re-replicate become cyclic (they never lose copies); then, if a
    # register was refreshed below the mask's level, plan again keeping every linear's output refreshable.
    if mask_failures and (copy_short - _cyclic or _relaxed):
        more = copy_short - _cyclic
        return compile_schedule(
            plan,
            params,
            seq_len,
            modes,
            allow_refresh=allow_refresh,
            poly_degree=poly_degree,
            poly_interval=poly_interval,
            mask=mask,
            _suggest=_suggest,
            _cyclic=_cyclic | frozenset(more),
            _relaxed=_relaxed and bool(more),
        )
    if mask_failures:
        lowest = min_refresh_level(params, mask)
        can = []
        if _suggest:
            for p in secure_sets():
                if p.name == params.name:
                    continue
                try:
                    compile_schedule(
                        plan,
                        p,
                        seq_len,
                        modes,
                        poly_degree=poly_degree,
                        poly_interval=poly_interval,
                        mask=mask,
                        _suggest=False,
                    )
                    can.append(p.name)
                except (LevelBudgetError, ValueError):
                    pass
        raise MaskHeadroomError(
            f"parameter set {params.name!r} cannot carry the hiding refresh (mode B) this circuit needs: the "
            f"flooding mask (sigma={mask.sigma}, |values| <= {mask.value_bound}) fits only at level "
            f"{'none' if lowest is None else f'>= {lowest}'} of {L}, leaving {max(0, L - (lowest or L))} level(s) "
            f"between refreshes; first problems: {mask_failures[:3]}. "
            + (f"Parameter sets that can: {can}." if can else "No built-in secure parameter set can; use mode A.")
        )
    used_modes = {st.kind: st.mode for st in steps if st.kind in ("layernorm", "attention", "gelu", "relu")}
    return Schedule(steps, params, seq_len, g, groups, w, weights, client, used_modes)

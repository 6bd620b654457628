"""Linear layers as generalized diagonals with a baby-step giant-step (BSGS) rotation plan (plaintext side).

This module holds everything about a linear layer that needs no encryption: where pi_eval's block-diagonal packing
puts each weight block, the block's generalized diagonals, and which rotations a BSGS product performs (so a public
context can carry exactly those Galois keys).  :mod:`pi_eval.bsgs` runs the product on ``tenseal.sealapi``.

**Semantics** (the same as TenSEAL's ``CKKSVector.mm`` on a matrix ``M [n_in, n_out]``, see ``schedule.py``): the
input is the whole slot vector ``x [slots]`` and ::

    out[j] = sum_s  D_s[j] * x[(j + s) % slots]        for j < n_out,   D_s[j] = M[(j + s) % n_in, j],  s < n_in

so ``out[j] = sum_row M[row, j] * x[row]`` whenever ``row >= j`` or ``n_in == slots`` (every pi_eval layout: compact
registers only have entries with ``row >= j``, cyclic ones have ``n_in == slots``).  Unlike ``mm`` the product
writes zeros past ``n_out`` instead of weight-dependent values.

**BSGS.** A diagonal index ``s`` is written ``s = G + j`` with ``G`` a multiple of the baby step ``B`` (signed, the
rotation goes the short way round) and ``0 <= j < B``; then ::

    out = sum_G rot_G( sum_j P_{G,j} * rot_j(x) ),     P_{G,j} = rot_{-G}(D_{G+j})   (pre-rotated plaintexts)

The baby rotations ``rot_j(x)`` of one input ciphertext are computed once and shared by every output chunk (and the
inner sums of all input chunks are added before the giant rotation, so each output chunk pays its giant rotations
once).  Both sets of rotations are *chained*: ``rot_{j2}(x) = rot_{j2 - j1}(rot_{j1}(x))`` and the giant sum is
evaluated Horner-style, so the rotation count is the BSGS minimum while the Galois keys are only the differences
between consecutive offsets (3 keys, ``{1, B, -B}``, for the band of a dense ``w x w`` block).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


def signed_step(s: int, slots: int) -> int:
    """Rotation ``s`` (mod ``slots``) as the equivalent step in ``(-slots/2, slots/2]``."""
    s %= slots
    return s - slots if s > slots // 2 else s


def _check_slots(slots: int) -> None:
    if not isinstance(slots, (int, np.integer)) or slots < 2 or slots & (slots - 1):
        raise ValueError(f"slots={slots!r} must be a power of two >= 2 (the CKKS slot count N/2)")


def _check_sizes(n_in: int, n_out: int, slots: int) -> None:
    _check_slots(slots)
    for name, n in (("n_in", n_in), ("n_out", n_out)):
        if not 1 <= n <= slots:
            raise ValueError(f"{name}={n} must be in [1, slots={slots}]: one ciphertext holds at most {slots} values")


# ---------------------------------------------------------------------------------------------- weight blocks
@dataclass(frozen=True)
class Placement:
    """One ``w x w`` weight block repeated on ``tokens`` token blocks of a block-diagonal matrix.

    ``M[row0 + t*w + e, col0 + t*w + f] = block[e, f]`` for ``t < tokens`` (``w = block.shape[0]``).
    """

    row0: int
    col0: int
    block: np.ndarray  # [w, w]
    tokens: int

    @property
    def width(self) -> int:
        return self.block.shape[0]

    def deltas(self) -> np.ndarray:
        """Offsets ``e - f`` in ``[-(w-1), w-1]`` on which the block has a non-zero entry."""
        w = self.width
        return np.array([d for d in range(-(w - 1), w) if np.diagonal(self.block, offset=-d).any()], dtype=np.int64)


class Block(Protocol):
    """A weight block that knows its diagonal indices without materializing the values."""

    n_in: int
    n_out: int
    slots: int

    def indices(self) -> np.ndarray: ...

    def diagonals(self) -> Diagonals: ...


@dataclass(frozen=True)
class Diagonals:
    """Generalized diagonals ``{s: D_s [n_out]}`` of one ``(input chunk, output chunk)`` product (module docstring)."""

    n_in: int
    n_out: int
    slots: int
    diags: Mapping[int, np.ndarray] = field(repr=False)

    def __post_init__(self):
        _check_sizes(self.n_in, self.n_out, self.slots)
        for s, d in self.diags.items():
            if not 0 <= s < self.n_in:
                raise ValueError(f"diagonal index {s} must be in [0, n_in={self.n_in})")
            if np.shape(d) != (self.n_out,):
                raise ValueError(f"diagonal {s} has shape {np.shape(d)}, expected ({self.n_out},)")

    @classmethod
    def from_dense(cls, M: np.ndarray, slots: int) -> Diagonals:
        """Diagonals of a dense matrix ``M [n_in, n_out]`` (tests, small shapes; pi_eval's layers use placements)."""
        M = np.asarray(M, dtype=np.float64)
        if M.ndim != 2:
            raise ValueError(f"matrix must be 2-D [n_in, n_out], got shape {M.shape}")
        if not np.isfinite(M).all():
            raise ValueError("matrix has non-finite entries")
        n_in, n_out = M.shape
        _check_sizes(n_in, n_out, slots)
        rows, cols = np.nonzero(M)
        s_all = (rows - cols) % n_in
        diags: dict[int, np.ndarray] = {}
        for s in np.unique(s_all):
            d = np.zeros(n_out)
            sel = s_all == s
            d[cols[sel]] = M[rows[sel], cols[sel]]
            diags[int(s)] = d
        return cls(n_in, n_out, slots, diags)

    def indices(self) -> np.ndarray:
        return np.array(sorted(self.diags), dtype=np.int64)

    def diagonals(self) -> Diagonals:
        return self

    def to_dense(self) -> np.ndarray:
        """The matrix ``M [n_in, n_out]`` these diagonals represent (inverse of :meth:`from_dense`)."""
        M = np.zeros((self.n_in, self.n_out))
        j = np.arange(self.n_out)
        for s, d in self.diags.items():
            M[(j + s) % self.n_in, j] += d
        return M

    def apply_plain(self, x: np.ndarray) -> np.ndarray:
        """What the encrypted product computes, in the clear: slot vector ``x [slots]`` -> ``out [n_out]``."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.slots,):
            raise ValueError(f"x must be the whole slot vector of shape ({self.slots},), got {x.shape}")
        j = np.arange(self.n_out)
        out = np.zeros(self.n_out)
        for s, d in self.diags.items():
            out += d * x[(j + s) % self.slots]
        return out


@dataclass(frozen=True)
class PlacedBlock:
    """A block given by :class:`Placement` s; its diagonals are built on demand, never a dense matrix."""

    n_in: int
    n_out: int
    slots: int
    placements: tuple[Placement, ...]

    def __post_init__(self):
        _check_sizes(self.n_in, self.n_out, self.slots)
        for p in self.placements:
            w = p.width
            if p.block.shape != (w, w):
                raise ValueError(f"placement block must be square [w, w], got {p.block.shape}")
            if p.row0 < 0 or p.col0 < 0 or p.row0 + p.tokens * w > self.n_in or p.col0 + p.tokens * w > self.n_out:
                raise ValueError(
                    f"placement at (row {p.row0}, col {p.col0}) with {p.tokens} tokens of width {w} does not fit "
                    f"[n_in={self.n_in}, n_out={self.n_out}]"
                )

    def indices(self) -> np.ndarray:
        idx = [(p.row0 - p.col0 + p.deltas()) % self.n_in for p in self.placements]
        return np.unique(np.concatenate(idx)) if idx else np.zeros(0, dtype=np.int64)

    def diagonals(self) -> Diagonals:
        diags: dict[int, np.ndarray] = {}
        for p in self.placements:
            w = p.width
            for delta in p.deltas():
                vals = np.diagonal(p.block, offset=-delta)  # block[f + delta, f]
                row = np.zeros(w)
                start = max(0, -delta)
                row[start : start + len(vals)] = vals
                s = int((p.row0 - p.col0 + delta) % self.n_in)
                d = diags.setdefault(s, np.zeros(self.n_out))
                d[p.col0 : p.col0 + p.tokens * w] += np.tile(row, p.tokens)
        return Diagonals(self.n_in, self.n_out, self.slots, diags)


def linear_blocks(lw, slots: int) -> dict[tuple[int, int], PlacedBlock]:
    """pi_eval's ``LinearWeights`` -> ``{(input chunk, output chunk): PlacedBlock}`` for every non-zero pair.

    Places the weight blocks exactly where :func:`pi_eval.dense.block_matrix` (the dense reference) puts them (same copy choice for
    compact and cyclic registers), without building the ``[lin.size, lout.size]`` matrix.
    """
    lin, lout = lw.lin, lw.lout
    if lin.w != lout.w or lin.g != lout.g:
        raise ValueError(f"input and output layouts disagree: w {lin.w} vs {lout.w}, g {lin.g} vs {lout.g}")
    w, g = lin.w, lin.g
    W = np.asarray(lw.W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] > lin.pieces * w or W.shape[1] > lout.pieces * w:
        raise ValueError(f"W of shape {W.shape} does not fit layouts of {lin.dim} -> {lout.dim} features")
    Wp = np.zeros((lin.pieces * w, lout.pieces * w))
    Wp[: W.shape[0], : W.shape[1]] = W
    n_cin, n_cout = lin.n_c, lout.n_c
    out: dict[tuple[int, int], PlacedBlock] = {}
    for ci in range(lin.chunks):
        for co in range(lout.chunks):
            places = []
            for q in range(lw.q_valid):
                for bb, ko in enumerate(lout.chunk_pieces(co)):
                    c0 = q * n_cout + bb * g * w
                    for aa, ki in enumerate(lin.chunk_pieces(ci)):
                        blk = Wp[ki * w : (ki + 1) * w, ko * w : (ko + 1) * w]
                        if not blk.any():
                            continue
                        if lin.cyclic:  # the nearest valid copy at or after the block (as block_matrix)
                            m = min(range(lw.valid_in), key=lambda m: (m * n_cin + aa * g * w - c0) % lin.size)
                        else:
                            m = max(0, -(-(c0 + w - 1 - aa * g * w) // n_cin))
                            if m >= lw.valid_in:
                                raise ValueError(
                                    f"output block at column {c0} needs input copy {m}, only {lw.valid_in} are valid"
                                )
                        places.append(Placement(m * n_cin + aa * g * w, c0, blk, g))
            if places:
                out[(ci, co)] = PlacedBlock(lin.size, lout.size, slots, tuple(places))
    return out


# ---------------------------------------------------------------------------------------------- BSGS plan
@dataclass(frozen=True)
class BSGSPlan:
    """Baby step ``baby`` and the offsets a layer's diagonals need: ``s = giant + j`` (module docstring)."""

    slots: int
    baby: int
    baby_offsets: tuple[int, ...]  # j in [0, baby), ascending
    giant_offsets: tuple[int, ...]  # signed multiples of baby, ascending

    def split(self, s: int) -> tuple[int, int]:
        """Diagonal index ``s`` -> (giant offset, baby offset)."""
        v = signed_step(s, self.slots)
        k = v // self.baby
        return k * self.baby, v - k * self.baby

    def baby_chain(self) -> list[tuple[int, int, int]]:
        """``(j, previous j, step)`` for every non-zero baby offset: ``rot_j(x) = rot_step(rot_prev(x))``."""
        chain, prev = [], 0
        for j in self.baby_offsets:
            if j:
                chain.append((j, prev, signed_step(j - prev, self.slots)))
                prev = j
        return chain

    def giant_chains(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Positive offsets ascending and negative offsets descending (nearest zero first), for Horner evaluation."""
        pos = tuple(g for g in self.giant_offsets if g > 0)
        neg = tuple(sorted((g for g in self.giant_offsets if g < 0), reverse=True))
        return pos, neg

    @staticmethod
    def horner_steps(chain: Sequence[int], slots: int) -> list[int]:
        """Steps of ``sum_i rot_{g_i}(I_i)`` by Horner: the first offset, then the gaps between consecutive ones."""
        prev = (0, *chain[:-1]) if chain else ()
        return [signed_step(b - a, slots) for a, b in zip(prev, chain, strict=True)]

    def galois_steps(self) -> tuple[int, ...]:
        """Every rotation step the product performs (each needs exactly one Galois key)."""
        pos, neg = self.giant_chains()
        steps = {st for _, _, st in self.baby_chain()}
        steps.update(self.horner_steps(pos, self.slots))
        steps.update(self.horner_steps(neg, self.slots))
        return tuple(sorted(steps))

    def rotations(self, chunks_in: int, chunks_out: int) -> int:
        """Rotations per token group, at most (an output chunk whose top offsets are unused skips those)."""
        giants = sum(1 for g in self.giant_offsets if g)
        return chunks_in * sum(1 for j in self.baby_offsets if j) + chunks_out * giants

    @classmethod
    def for_indices(
        cls, indices: Iterable[int], slots: int, chunks_in: int = 1, chunks_out: int = 1, baby: int | None = None
    ) -> BSGSPlan:
        """Plan for the union of diagonal ``indices``; ``baby=None`` picks the step with the fewest rotations.

        Ties go to fewer Galois keys, then to a power of two (layers then share keys more often), then to the
        smaller step.
        """
        _check_slots(slots)
        v = np.unique(np.array([signed_step(int(s), slots) for s in indices], dtype=np.int64))
        if v.size == 0:
            raise ValueError("a product needs at least one non-zero diagonal; the weights are all zero")
        if baby is not None and not 1 <= baby <= slots // 2:
            raise ValueError(f"baby={baby} must be in [1, slots/2={slots // 2}]")
        best = None
        for b in [baby] if baby is not None else range(1, slots // 2 + 1):
            k = np.floor_divide(v, b)
            js, gs = np.unique(v - k * b), np.unique(k * b)
            rot = chunks_in * int(np.count_nonzero(js)) + chunks_out * int(np.count_nonzero(gs))
            if best is not None and rot > best[0][0]:
                continue
            plan = cls(slots, b, tuple(int(j) for j in js), tuple(int(g) for g in gs))
            key = (rot, len(plan.galois_steps()), b & (b - 1) != 0, b)
            if best is None or key < best[0]:
                best = (key, plan)
        return best[1]


# ---------------------------------------------------------------------------------------------- one layer
class DiagonalLinear:
    """One linear layer as BSGS products: ``{(input chunk, output chunk): block}`` with one shared plan.

    Output chunk ``co`` of a token group is ``sum_ci block(ci, co) x_ci``; biases and residuals stay with the caller.
    """

    def __init__(
        self,
        blocks: Mapping[tuple[int, int], Block],
        chunks_in: int,
        chunks_out: int,
        slots: int,
        *,
        baby: int | None = None,
        name: str = "linear",
        plan: BSGSPlan | None = None,
    ):
        _check_slots(slots)
        if chunks_in < 1 or chunks_out < 1:
            raise ValueError(f"{name}: chunks_in={chunks_in} and chunks_out={chunks_out} must be >= 1")
        if not blocks:
            raise ValueError(f"{name}: no non-zero weight block")
        for (ci, co), blk in blocks.items():
            if not (0 <= ci < chunks_in and 0 <= co < chunks_out):
                raise ValueError(f"{name}: block {(ci, co)} outside {chunks_in} input x {chunks_out} output chunks")
            if blk.slots != slots:
                raise ValueError(f"{name}: block {(ci, co)} built for {blk.slots} slots, the layer has {slots}")
        empty = sorted(set(range(chunks_out)) - {co for _, co in blocks})
        if empty:
            raise ValueError(f"{name}: output chunks {empty} have no non-zero weights")
        self.name = name
        self.blocks = dict(blocks)
        self.chunks_in, self.chunks_out, self.slots = chunks_in, chunks_out, slots
        self.n_out = {co: blk.n_out for (_, co), blk in self.blocks.items()}
        self._indices = {k: blk.indices() for k, blk in self.blocks.items()}
        if plan is None:
            plan = BSGSPlan.for_indices(
                np.concatenate(list(self._indices.values())), slots, chunks_in, chunks_out, baby
            )
        else:  # a given plan (e.g. :func:`layer_plan`, shared with the client) must cover every diagonal
            if plan.slots != slots or (baby is not None and baby != plan.baby):
                raise ValueError(f"{name}: plan for {plan.slots} slots, baby {plan.baby}; the layer has {slots} slots")
            babies, giants = set(plan.baby_offsets), set(plan.giant_offsets)
            for k, idx in self._indices.items():
                splits = (plan.split(int(s)) for s in idx)
                outside = [g + j for g, j in splits if g not in giants or j not in babies]
                if outside:
                    raise ValueError(f"{name}: block {k} has diagonals {outside[:5]} outside the given BSGS plan")
        self.plan = plan

    @classmethod
    def from_linear_weights(
        cls, lw, slots: int, *, baby: int | None = None, name: str = "linear", plan: BSGSPlan | None = None
    ) -> DiagonalLinear:
        """From pi_eval's ``schedule.LinearWeights`` (the layouts decide chunks, copies and cyclic registers).

        ``plan=layer_plan(lw, slots)`` gives the plan both parties derive from the schedule (the server does);
        ``None`` plans for this layer's own non-zero diagonals.
        """
        return cls(linear_blocks(lw, slots), lw.lin.chunks, lw.lout.chunks, slots, baby=baby, name=name, plan=plan)

    @classmethod
    def from_dense(
        cls, mats: Mapping[tuple[int, int], np.ndarray], chunks_in: int, chunks_out: int, slots: int, **kw
    ) -> DiagonalLinear:
        """From dense ``{(ci, co): M [n_in, n_out]}`` (tests and small shapes)."""
        return cls({k: Diagonals.from_dense(M, slots) for k, M in mats.items()}, chunks_in, chunks_out, slots, **kw)

    def indices(self, ci: int, co: int) -> np.ndarray:
        return self._indices.get((ci, co), np.zeros(0, dtype=np.int64))

    def galois_steps(self) -> tuple[int, ...]:
        return self.plan.galois_steps()

    def rotations(self) -> int:
        return self.plan.rotations(self.chunks_in, self.chunks_out)

    def diagonal_count(self) -> int:
        """Plaintext-ciphertext products per token group (= plaintexts encoded per layer call)."""
        return int(sum(len(i) for i in self._indices.values()))

    def pre_rotated(self, ci: int, co: int) -> dict[tuple[int, int], np.ndarray]:
        """``{(giant, j): P [slots]}`` for block ``(ci, co)``: ``P = rot_{-giant}(D_{giant + j})``, zero-padded."""
        blk = self.blocks.get((ci, co))
        if blk is None:
            return {}
        out = {}
        for s, d in blk.diagonals().diags.items():
            giant, j = self.plan.split(s)
            full = np.zeros(self.slots)
            full[: len(d)] = d
            out[(giant, j)] = np.roll(full, giant)
        return out


def galois_steps(layers: Iterable[DiagonalLinear]) -> tuple[int, ...]:
    """The rotation steps a set of layers uses: a public context needs Galois keys for exactly these."""
    return tuple(sorted({s for layer in layers for s in layer.galois_steps()}))


# ---------------------------------------------------------------------------------------------- plans from the schedule
@functools.lru_cache(maxsize=256)
def _structural_plan(lin, lout, shape: tuple[int, int], q_valid: int, valid_in: int, slots: int) -> BSGSPlan:
    dense = _ShapeOnly(np.ones(shape), lin, lout, q_valid, valid_in)
    blocks = linear_blocks(dense, slots)
    idx = np.concatenate([b.indices() for b in blocks.values()])
    return BSGSPlan.for_indices(idx, slots, lin.chunks, lout.chunks)


@dataclass(frozen=True)
class _ShapeOnly:
    """The fields of ``schedule.LinearWeights`` that :func:`linear_blocks` reads, with every weight set to 1."""

    W: np.ndarray
    lin: object
    lout: object
    q_valid: int
    valid_in: int


def layer_plan(lw, slots: int) -> BSGSPlan:
    """The BSGS plan of one scheduled linear layer from its **layouts and weight shape only** (every weight counted
    as non-zero), so the client, which holds no weights, derives the same plan and Galois steps as the server.

    A layer's real diagonals are a subset of these (a zero weight block is only skipped), so the server's products
    rotate only by the plan's steps.  Cached on ``(layouts, shape, copies, slots)``: the blocks of a model share them.
    """
    return _structural_plan(lw.lin, lw.lout, tuple(np.shape(lw.W)), int(lw.q_valid), int(lw.valid_in), int(slots))


def schedule_plans(sched) -> dict[str, BSGSPlan]:
    """``{linear step name: plan}`` for every server linear layer of a ``schedule.Schedule``."""
    return {name: layer_plan(lw, sched.params.slots) for name, lw in sched.server_weights.items()}


def schedule_galois_steps(sched) -> tuple[int, ...]:
    """Every rotation step the server's linear layers perform for ``sched``: the Galois keys the client's public
    context carries (ascending, signed).  Both parties compute it from the schedule they agreed on."""
    return tuple(sorted({s for plan in schedule_plans(sched).values() for s in plan.galois_steps()}))

"""Registers and weights in pi_eval's block-diagonal packing (the layouts :mod:`pi_eval.schedule` chooses).

A *register* holds an activation [T, D] as ciphertexts (see :mod:`pi_eval.schedule` for the slot order); a
:class:`Layout` says how.  :class:`LinearWeights` is one linear layer between two layouts, as the server holds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """How a register [T, D] is cut into ciphertexts: pieces of ``w`` features, ``g`` tokens per group, ``cp``
    pieces per chunk, each chunk stored ``copies`` times (compact) or over all ``slots`` (cyclic)."""

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

    def to_dict(self) -> dict:
        return {
            "dim": self.dim,
            "pieces": self.pieces,
            "cp": self.cp,
            "g": self.g,
            "w": self.w,
            "copies": self.copies,
            "cyclic": self.cyclic,
        }


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


def tile_bias(b: np.ndarray | None, lout: Layout, cout: int, q_valid: int) -> np.ndarray:
    """Bias ``b [D_out]`` of output chunk ``cout`` as its declared vector ``[lout.size]``: repeated for every token
    of the group, in the first ``q_valid`` copies, zeros elsewhere."""
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
    :func:`pi_eval.dense.dense_matrices` is the dense reference (tests, the benchmark's baseline).
    """

    W: np.ndarray
    b: np.ndarray | None
    lin: Layout
    lout: Layout
    q_valid: int  # output copies computed
    valid_in: int  # input copies that may be read

    def biases(self) -> list[np.ndarray]:
        return [tile_bias(self.b, self.lout, co, self.q_valid) for co in range(self.lout.chunks)]

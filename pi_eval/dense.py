"""The dense reference of a linear layer's packing: one ``[lin.size, lout.size]`` matrix per chunk pair.

The server never builds these (it runs :mod:`pi_eval.diagonal`'s placements as BSGS products).  They are the
independent reference the tests check the placements against, the tests' plaintext model of TenSEAL's ``mm``, and
the dense baseline of ``benchmarks/pi_eval_scale.py`` (TenSEAL's ``plain_tensor`` + ``mm``, what the server ran
before issue #12).  Slots x slots float64 each: small shapes only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .layout import Layout, LinearWeights


def block_matrix(
    W: np.ndarray, lin: Layout, lout: Layout, cin: int, cout: int, q_valid: int, valid_in: int
) -> np.ndarray:
    """Block-diagonal-over-tokens matrix [lin.size, lout.size] for input chunk cin -> output chunk cout.

    Fills the first ``q_valid`` output copies, reading only the first ``valid_in`` input copies (module docstring).
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


def dense_matrices(lw: LinearWeights) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """((input chunk, output chunk), dense matrix) for every non-zero pair of a layer, one at a time."""
    for ci in range(lw.lin.chunks):
        for co in range(lw.lout.chunks):
            M = block_matrix(lw.W, lw.lin, lw.lout, ci, co, lw.q_valid, lw.valid_in)
            if M.any():
                yield (ci, co), M

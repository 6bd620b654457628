"""Mode B: a refresh that hides the refreshed value from the client (statistical noise flooding).

The server holds a ciphertext ``ct`` of a value z at level l (its plaintext is the integer polynomial m + e, m the
CKKS encoding of z at scale s, e the noise).  A refresh returns a fresh ciphertext of the same plaintext::

    server: u <- uniform integers in [-U, U]^N (``secrets``, one independent draw per coefficient)
            send ct + Enc_pk(u)            (one public-key encryption: masks *and* re-randomizes ct)
    client: p = Dec(.) as exact integers   (= m + e + u + e', never decoded to slots)
            refuse if some |p_i| > U + M   (the value broke the declared bound: the guarantee would not hold)
            send Enc_pk(round(p * Delta / s)) at the top level
    server: subtract round(u * Delta / s)  -> a fresh encryption of (m + e) * Delta / s, up to +-1 per coefficient

The mask lives in the coefficient domain, so it covers every slot of the ciphertext (copies, the zero tail, the
slots past the declared size that TenSEAL's ``mm`` writes to), and the client never decodes it, so no precision is
lost however large U is: the refreshed value is exact.

**Guarantee.**  Let B bound every slot of the refreshed ciphertext (all N/2 of them), so that
``|m_i + e_i| <= M = 2 s B`` (``|m_i| <= s * max|z|`` for CKKS encoding; the factor 2 absorbs the noise).  With
``U = 2^sigma * N * M`` the client's decryption p of one refreshed ciphertext, for any two values z, z' within the
bound, satisfies ``SD(p | z, p | z') <= sum_i |d_i| / (2U + 1) <= 2NM / (2U + 1) < 2^-sigma`` (uniform flooding,
summed over coefficients).  The ciphertext's second component is re-randomized by the fresh encryption of u
(pseudorandom under RLWE even to the key holder), so it carries nothing of the server's computation either.
A run that refreshes c ciphertexts leaks at most ``c * 2^-sigma`` statistically.  sigma = 40 by default.
The value bound is an assumption on the model (|z| <= B); above it the distance grows in proportion
(``|z| <= k B`` gives ``k * 2^-sigma``), and the client refuses a decryption that proves it broken.

**Headroom.**  No wrap-around needs ``U + M < Q_l / 2`` at the refresh level (Q_l: product of the primes left).
:func:`min_refresh_level` gives the lowest level that can carry the mask; the planner keeps every register that
may be refreshed at or above it (:mod:`pi_eval.schedule`), and refuses a parameter set that cannot.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache

import numpy as np
import tenseal.sealapi as sa

from .params import ParamSet
from .rawpoly import RawCKKS, round_scaled
from .sealio import seal_to_vector, vector_to_seal

SIGMA = 40  # statistical security parameter of the flooding mask
DEFAULT_VALUE_BOUND = 16.0  # |slot value| bound of a refreshed ciphertext (all slots)


class RefreshBoundError(ValueError):
    """A refreshed value exceeded the declared bound, so the hiding guarantee does not hold for it."""


@dataclass(frozen=True)
class MaskSpec:
    value_bound: float = DEFAULT_VALUE_BOUND
    sigma: int = SIGMA

    def __post_init__(self):
        if self.sigma < 40:
            raise ValueError(f"mask sigma={self.sigma} is below the required statistical security of 40 bits")
        if not self.value_bound > 0:
            raise ValueError(f"mask value bound must be > 0, got {self.value_bound}")

    def coeff_bound(self, scale: float, n: int) -> tuple[int, int]:
        """(M, U): the bound on |m_i + e_i| and the mask half-width, for ciphertext scale ``scale`` and degree n."""
        M = math.ceil(2 * scale * self.value_bound)
        return M, (1 << self.sigma) * n * M

    def bits_needed(self, scale: float, n: int) -> float:
        """log2 of the smallest modulus Q_l with U + M < Q_l / 2."""
        M, U = self.coeff_bound(scale, n)
        return math.log2(U + M) + 1

    def to_dict(self) -> dict:
        return {"value_bound": self.value_bound, "sigma": self.sigma}


@cache
def _primes(n: int, bits: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(q.value() for q in sa.CoeffModulus.Create(n, list(bits)))


def level_modulus_bits(params: ParamSet) -> list[float]:
    """log2 Q_l for each level l = 0..L (primes q_0..q_l, the special prime excluded); no key is created."""
    qs = _primes(params.poly_modulus_degree, tuple(params.coeff_mod_bit_sizes))[:-1]
    out, acc = [], 0.0
    for q in qs:
        acc += math.log2(q)
        out.append(acc)
    return out


def min_refresh_level(params: ParamSet, spec: MaskSpec) -> int | None:
    """Lowest level whose modulus carries the flooding mask, or None if no level of ``params`` can."""
    need = spec.bits_needed(2.0**params.scale_bits * 1.001, params.poly_modulus_degree)
    for lvl, bits in enumerate(level_modulus_bits(params)):
        if bits > need:
            return lvl
    return None


def _ratio(scale: float, delta: float) -> tuple[int, int]:
    r = Fraction(delta) / Fraction(scale)
    return r.numerator, r.denominator


@dataclass
class _Pending:
    u: np.ndarray
    scale: float
    size: int


@dataclass
class ServerMasker:
    """Server side: mask (down) and unmask (up) the ciphertexts of one refresh step."""

    raw: RawCKKS
    delta: float  # the scale of a fresh encryption (the context's global scale)
    pending: dict[str, list[_Pending]] = field(default_factory=dict)

    def mask(self, step: str, vector_blobs: list[bytes], spec: MaskSpec) -> list[bytes]:
        """TenSEAL vectors of one register -> SEAL ciphertexts, each plus a fresh encryption of its own mask."""
        out, pend = [], []
        for blob in vector_blobs:
            sizes, cts, _ = vector_to_seal(blob)
            if len(cts) != 1:
                raise ValueError(f"{step}: a refreshed register must be one ciphertext per chunk, got {len(cts)}")
            ct = self.raw.load_ciphertext(cts[0])
            U = spec.coeff_bound(ct.scale, self.raw.n)[1]
            u = np.array([secrets.randbelow(2 * U + 1) - U for _ in range(self.raw.n)], dtype=object)
            enc_u = self.raw.encrypt(self.raw.plaintext(u, ct.parms_id(), ct.scale))
            self.raw.evaluator.add_inplace(ct, enc_u)
            out.append(self.raw.save(ct))
            pend.append(_Pending(u, ct.scale, sizes[0]))
        self.pending[step] = pend
        return out

    def unmask(self, step: str, blobs: list[bytes]) -> list[bytes]:
        """Client's fresh ciphertexts -> TenSEAL vector bytes of the refreshed register (mask removed)."""
        pend = self.pending.pop(step)
        if len(blobs) != len(pend):
            raise ValueError(f"{step}: expected {len(pend)} refreshed ciphertexts, got {len(blobs)}")
        top = self.raw.ctx.first_parms_id()
        out = []
        for blob, p in zip(blobs, pend, strict=True):
            ct = self.raw.load_ciphertext(blob)
            if ct.parms_id() != top or ct.scale != self.delta:
                raise ValueError(f"{step}: a refreshed ciphertext must be fresh (top level, scale {self.delta})")
            num, den = _ratio(p.scale, self.delta)
            self.raw.evaluator.sub_plain_inplace(ct, self.raw.plaintext(round_scaled(p.u, num, den), top, self.delta))
            out.append(seal_to_vector(p.size, self.raw.save(ct), self.delta))
        return out


@dataclass
class ClientRefresher:
    """Client side: decrypt the masked polynomial exactly, check the bound, re-encrypt it fresh."""

    raw: RawCKKS
    delta: float

    def refresh(self, blob: bytes, spec: MaskSpec) -> bytes:
        ct = self.raw.load_ciphertext(blob)
        p = self.raw.decrypt_coeffs(ct)
        M, U = spec.coeff_bound(ct.scale, self.raw.n)
        if int(np.max(np.abs(p))) > U + M:
            raise RefreshBoundError(
                f"a refreshed value exceeds the mask's value bound {spec.value_bound} (|slot| <= bound is what the "
                f"2^-{spec.sigma} hiding guarantee assumes); rerun with a larger --mask-bound"
            )
        num, den = _ratio(ct.scale, self.delta)
        top = self.raw.ctx.first_parms_id()
        return self.raw.save(self.raw.encrypt(self.raw.plaintext(round_scaled(p, num, den), top, self.delta)))

"""CKKS parameter sets with a 128-bit security check and a level budget.

Security follows the HomomorphicEncryption.org standard (also enforced by SEAL's ``CoeffModulus::MaxBitCount``):
for classical 128-bit security with a ternary secret, the *total* bit count of the coefficient modulus (all primes,
the special prime included) may not exceed the bound for the ring degree N below.  Sets above the bound are refused.

The level budget of a chain ``[first, middle x L, special]`` is L: every rescale (one ciphertext-plaintext ``mm``,
one multiplication inside ``polyval``) consumes one middle prime.  Middle primes must equal the scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# HE-standard (Albrecht et al. 2018, table for 128-bit classical security, uniform ternary secret);
# identical to SEAL's CoeffModulus::MaxBitCount(N, sec_level_type::tc128).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


class InsecureParametersError(ValueError):
    """The parameter set is below 128-bit security (or not a valid CKKS chain)."""


class LevelBudgetError(ValueError):
    """A circuit needs more levels between refreshes than the parameter set provides."""


@dataclass(frozen=True)
class ParamSet:
    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    note: str = field(default="", compare=False)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def total_bits(self) -> int:
        return int(sum(self.coeff_mod_bit_sizes))

    @property
    def levels(self) -> int:
        """Number of rescales a fresh ciphertext can absorb (middle primes)."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def max_bits_128(self) -> int | None:
        return MAX_COEFF_BITS_128.get(self.poly_modulus_degree)

    def check(self) -> ParamSet:
        """Raise InsecureParametersError unless the set is a valid chain with >= 128-bit security."""
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if n not in MAX_COEFF_BITS_128:
            raise InsecureParametersError(
                f"poly_modulus_degree={n} is not allowed; use one of {sorted(MAX_COEFF_BITS_128)}"
            )
        if len(bits) < 3:
            raise InsecureParametersError(
                f"coeff_mod_bit_sizes={list(bits)} needs at least 3 primes (first, >=1 middle, special)"
            )
        limit = MAX_COEFF_BITS_128[n]
        if self.total_bits > limit:
            raise InsecureParametersError(
                f"parameter set {self.name!r} (N={n}, coeff_mod_bit_sizes={list(bits)}) has {self.total_bits} "
                f"modulus bits, above the 128-bit security limit of {limit} bits for N={n} (HE standard); "
                f"refusing it. Use fewer/smaller primes or a larger N, e.g. one of: "
                f"{', '.join(p.name for p in secure_sets())}"
            )
        middle = bits[1:-1]
        if any(b != self.scale_bits for b in middle):
            raise InsecureParametersError(
                f"middle primes {list(middle)} must all equal the scale (2^{self.scale_bits}) for CKKS rescaling"
            )
        if bits[-1] < max(bits[:-1]) and bits[-1] < 60:
            raise InsecureParametersError("the special (last) prime must be at least as large as the other primes")
        if not 20 <= self.scale_bits <= 60:
            raise InsecureParametersError(f"scale_bits={self.scale_bits} outside [20, 60]")
        return self

    def describe(self) -> dict:
        return {
            "name": self.name,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "slots": self.slots,
            "levels": self.levels,
            "total_bits": self.total_bits,
            "max_bits_128": self.max_bits_128,
        }


PARAM_SETS: dict[str, ParamSet] = {
    p.name: p
    for p in [
        ParamSet("n8192-l2", 8192, (60, 40, 40, 60), 40, "default; 2 levels, ~35 MB public context"),
        ParamSet("n8192-l4", 8192, (49, 30, 30, 30, 30, 49), 30, "4 levels at scale 2^30 (lower precision)"),
        ParamSet("n16384-l6", 16384, (60, 40, 40, 40, 40, 40, 40, 60), 40, "6 levels; ~300 MB public context"),
        ParamSet("n16384-l8", 16384, (50, 40, 40, 40, 40, 40, 40, 40, 40, 50), 40, "8 levels"),
        ParamSet("n32768-l17", 32768, (60, *([40] * 17), 60), 40, "17 levels; very large keys"),
    ]
}
DEFAULT_PARAM_SET = "n8192-l2"


def secure_sets() -> list[ParamSet]:
    return sorted(PARAM_SETS.values(), key=lambda p: (p.levels, p.poly_modulus_degree))


def get_param_set(name_or_set: str | ParamSet) -> ParamSet:
    if isinstance(name_or_set, ParamSet):
        return name_or_set.check()
    if name_or_set not in PARAM_SETS:
        raise KeyError(f"unknown parameter set {name_or_set!r}; known: {sorted(PARAM_SETS)}")
    return PARAM_SETS[name_or_set].check()


def sets_with_levels(levels: int, min_slots: int = 0) -> list[ParamSet]:
    """Secure parameter sets that provide at least ``levels`` levels (and ``min_slots`` slots)."""
    return [p for p in secure_sets() if p.levels >= levels and p.slots >= min_slots]

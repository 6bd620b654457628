"""The largest legitimate frame at each point of the protocol, from the parameter set and the schedule.

A receiver checks every announced body length against these bounds before reading any of the body
(:func:`pi_eval.channel.read_frame`), so a peer cannot make it buffer more than the protocol can need.

* **Ciphertext.** A CKKS ciphertext of 2 polynomials at the top level has ``2 * N * L * 8`` raw bytes (L = primes
  without the special prime); SEAL's zstd compression can only add its frame overhead (< 0.4 % + a few hundred
  bytes), TenSEAL's protobuf wrapper a few bytes more: bound ``raw * 1.01 + 4 KiB``.
* **Public context** (setup frame): public key (2 polynomials over all k primes) plus one key-switching key for
  relinearization and one per Galois element, each ``(k - 1) * 2 * N * k * 8`` bytes, same 1 % + 64 KiB margin.
  The server knows how many Galois keys the schedule needs (:func:`pi_eval.diagonal.schedule_galois_steps`) and
  bounds the setup frame by that count; without a count the bound assumes ``2 log2 N`` keys (SEAL's default
  power-of-two set has ``2 log2(N/2) - 1`` plus the conjugation): n8192-l2, 43 MB bound, 35.3 MB measured.
* **Data frames** (after the hello): the most ciphertexts one message of the schedule carries, per direction.
"""

from __future__ import annotations

import math

from .ops import Direction
from .params import ParamSet
from .schedule import Schedule

META_BYTES = 64 << 10  # meta JSON of a data/setup frame (kind, label, blob lengths)
CONTROL_LIMIT = 4 << 20  # stats and error replies (JSON only)


def ciphertext_bound(params: ParamSet) -> int:
    n, k = params.poly_modulus_degree, len(params.coeff_mod_bit_sizes)
    return math.ceil(2 * n * (k - 1) * 8 * 1.01) + 4096


def public_context_bound(params: ParamSet, galois_keys: int | None = None) -> int:
    """Largest public context with ``galois_keys`` Galois keys (``None``: ``2 log2 N``, the power-of-two set)."""
    n, k = params.poly_modulus_degree, len(params.coeff_mod_bit_sizes)
    ksk = (k - 1) * 2 * n * k * 8
    galois = 2 * int(math.log2(n)) if galois_keys is None else int(galois_keys)
    if galois < 0:
        raise ValueError(f"galois_keys={galois_keys} must be >= 0")
    return math.ceil((2 * n * k * 8 + (1 + galois) * ksk) * 1.01) + (64 << 10)


def _message_cts(sched: Schedule) -> tuple[int, int]:
    """(most ciphertexts in one uplink message, most in one downlink message)."""
    up = down = 0
    for st in sched.steps:
        for direction, lay in st.messages():
            if direction is Direction.UP:
                up = max(up, sched.groups * lay.chunks)
            else:
                down = max(down, sched.groups * lay.chunks)
    return up, down


def data_limits(sched: Schedule) -> tuple[int, int]:
    """(uplink, downlink) body limits for the online phase of ``sched`` (control replies included)."""
    ct = ciphertext_bound(sched.params)
    up, down = _message_cts(sched)
    return max(CONTROL_LIMIT, META_BYTES + up * ct), max(CONTROL_LIMIT, META_BYTES + down * ct)


def setup_limit(params: ParamSet, galois_keys: int | None = None) -> int:
    """Body limit of the setup frame (the public context with ``galois_keys`` keys, see :func:`public_context_bound`)."""
    return META_BYTES + public_context_bound(params, galois_keys)

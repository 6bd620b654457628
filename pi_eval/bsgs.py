"""Baby-step giant-step linear layers under CKKS on ``tenseal.sealapi`` (SEAL 4.1), and the keys they need.

The plaintext side (diagonals, rotation plan, Galois step list) is :mod:`pi_eval.diagonal`; this module runs it:

* :class:`BSGSEvaluator` (server) holds a **public** TenSEAL context only (it refuses one with a secret key) and
  multiplies the ciphertexts of every token group by a :class:`~pi_eval.diagonal.DiagonalLinear`: baby-step
  rotations once per input ciphertext, plaintexts encoded per output chunk when the layer runs (at the
  ciphertext's level, scale = the prime the rescale drops, so the output keeps the input's scale exactly) and
  freed after it, giant steps once per output chunk, one rescale.
* :func:`public_context` (client) serializes a TenSEAL public context whose Galois keys are exactly the given
  rotation steps (SEAL's seeded form), instead of TenSEAL's default power-of-two set.
TenSEAL's objects are SEAL objects, so ``sealapi`` functions take them directly (``vec.data.ciphertext()``,
``ctx.data.seal_context()``, ``ctx.data.galois_keys()``); the way back to a ``CKKSVector`` and the protobuf
handling of the public context are :mod:`pi_eval.sealio`'s.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence

import tenseal as ts
import tenseal.sealapi as sa

from .diagonal import DiagonalLinear, galois_steps, signed_step
from .sealio import ckks_vector, proto_field, proto_fields, saved_bytes, seal_ciphertext

__all__ = [
    "BSGSEvaluator",
    "galois_element",
    "galois_steps",
    "public_context",
]


# ---------------------------------------------------------------------------------------------- keys
def galois_element(step: int, poly_modulus_degree: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` slots (``GaloisTool::get_elt_from_step``)."""
    slots = poly_modulus_degree // 2
    if step % slots == 0:
        raise ValueError(f"step={step} is a multiple of the {slots} slots: no rotation")
    return pow(3, step % slots, 2 * poly_modulus_degree)


def public_context(ctx: ts.Context, steps: Iterable[int]) -> bytes:
    """Client side: serialized public TenSEAL context (public + relinearization keys) with Galois keys for ``steps``.

    The keys are SEAL's seeded serialization (half the bytes of a full key); ``ts.context_from`` loads them as the
    context's Galois keys, so the server sees an ordinary public context that can perform exactly these rotations.
    """
    if not ctx.is_private():
        raise ValueError("public_context needs the client's context with its secret key to generate Galois keys")
    n = ctx.data.seal_context().key_context_data().parms().poly_modulus_degree()
    steps = sorted({signed_step(int(s), n // 2) for s in steps})
    if not steps or 0 in steps:
        raise ValueError(f"steps {steps} must be non-empty and non-zero modulo the {n // 2} slots")
    keygen = sa.KeyGenerator(ctx.data.seal_context(), ctx.data.secret_key())
    # sealapi's overload taking a list of ints reads it as Galois elements (uint32) first, so pass elements.
    galois = saved_bytes(keygen.create_galois_keys([galois_element(s, n) for s in steps]))
    base = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)
    out = b""
    for num, wire, raw in proto_fields(base):
        if num == 2 and wire == 2:  # TenSEALPublicProto: append field 5 (galois_keys)
            if any(f == 5 for f, _, _ in proto_fields(raw)):
                raise ValueError("the serialized public context already carries Galois keys")
            raw += proto_field(5, 2, galois)
        out += proto_field(num, wire, raw)
    return out


# ---------------------------------------------------------------------------------------------- server side
class BSGSEvaluator:
    """Runs :class:`DiagonalLinear` products with a public context's keys (server side, no secret key)."""

    def __init__(self, context: ts.Context):
        if context.is_private() or context.has_secret_key():
            raise ValueError("BSGSEvaluator refuses a context holding a secret key; give it the public context")
        if not context.has_galois_keys():
            raise ValueError("the public context has no Galois keys; build it with pi_eval.bsgs.public_context")
        self.context = context
        self.seal = context.data.seal_context()
        self.galois_keys = context.data.galois_keys()
        self.evaluator = sa.Evaluator(self.seal)
        self.encoder = sa.CKKSEncoder(self.seal)
        self.slots = self.encoder.slot_count()
        self.poly_modulus_degree = 2 * self.slots
        self.rotation_steps: Counter[int] = Counter()  # every rotation performed, by step
        self.stats: dict[str, float] = Counter()  # encode_s, product_s, plaintexts, multiplies, rotations

    def missing_steps(self, steps: Iterable[int]) -> list[int]:
        return [s for s in steps if not self.galois_keys.has_key(galois_element(s, self.poly_modulus_degree))]

    def _check(self, layer: DiagonalLinear, groups: Sequence[Sequence]) -> tuple:
        if layer.slots != self.slots:
            raise ValueError(f"{layer.name}: built for {layer.slots} slots, the context has {self.slots}")
        missing = self.missing_steps(layer.galois_steps())
        if missing:
            raise ValueError(
                f"{layer.name}: the public context lacks Galois keys for rotation steps {missing}; the product uses "
                f"{list(layer.galois_steps())} (build the context with public_context(ctx, galois_steps(layers)))"
            )
        if not groups:
            raise ValueError(f"{layer.name}: no token group given")
        for g, grp in enumerate(groups):
            if len(grp) != layer.chunks_in:
                raise ValueError(
                    f"{layer.name}: token group {g} has {len(grp)} input ciphertexts, the layer takes {layer.chunks_in}"
                )
        first = groups[0][0]
        pid, scale = first.parms_id(), first.scale
        for grp in groups:
            for ct in grp:
                if ct.parms_id() != pid or ct.scale != scale:
                    raise ValueError(f"{layer.name}: input ciphertexts must share one level and scale")
                if ct.size() != 2:
                    raise ValueError(f"{layer.name}: input ciphertext of size {ct.size()}; relinearize it first")
        data = self.seal.get_context_data(pid)
        if data is None or data.next_context_data() is None:
            raise ValueError(f"{layer.name}: the input ciphertexts are at the last level; a product needs one level")
        return pid, scale, data.parms().coeff_modulus()[-1].value()

    def _rotate(self, ct, step: int):
        out = sa.Ciphertext()
        self.evaluator.rotate_vector(ct, step, self.galois_keys, out)
        self.rotation_steps[step] += 1
        self.stats["rotations"] += 1
        return out

    def _babies(self, ct, layer: DiagonalLinear) -> dict:
        rot = {0: ct}
        for j, prev, step in layer.plan.baby_chain():
            rot[j] = self._rotate(rot[prev], step)
        return rot

    def encode(self, layer: DiagonalLinear, co: int, parms_id, scale: float) -> dict[int, dict]:
        """Plaintexts ``{ci: {(giant, j): Plaintext}}`` of output chunk ``co`` at ``parms_id`` and ``scale``."""
        t0 = time.perf_counter()
        out = {}
        for ci in range(layer.chunks_in):
            pts = {}
            for key, vec in layer.pre_rotated(ci, co).items():
                pt = sa.Plaintext()
                self.encoder.encode(vec.tolist(), parms_id, scale, pt)
                if not pt.is_zero():  # weights below the encoding precision: nothing to multiply
                    pts[key] = pt
            if pts:
                out[ci] = pts
        self.stats["plaintexts"] += sum(len(p) for p in out.values())
        self.stats["encode_s"] += time.perf_counter() - t0
        return out

    def _horner(self, chain: tuple[int, ...], inner: dict):
        """``sum_i rot_{chain[i]}(inner[chain[i]])`` with the chain's steps (absent terms are zero)."""
        used = [i for i, g in enumerate(chain) if g in inner]
        if not used:
            return None
        top = used[-1]
        acc = inner[chain[top]]
        for i in range(top - 1, -1, -1):
            acc = self._rotate(acc, signed_step(chain[i + 1] - chain[i], self.slots))
            if chain[i] in inner:
                self.evaluator.add_inplace(acc, inner[chain[i]])
        return self._rotate(acc, signed_step(chain[0], self.slots))

    @staticmethod
    def lift_bits(q_last: int) -> int:
        """log2 of the integer ``K`` the inputs are multiplied by before the baby-step rotations.

        A rotation adds key-switching noise of a fixed size (not relative to the scale): at scale 2^30 one rotation
        of a fresh ciphertext measured 1.8e-4 absolute error on unit values (n8192-l4).  Multiplying the input by
        ``K`` first (exact: a constant integer polynomial; the scale becomes ``K * scale``) makes that noise ``K``
        times smaller relative to the values; the plaintexts are then encoded at ``q_last / K``, so the product
        still rescales to exactly the input scale, with no extra level.  ``K`` keeps the plaintext scale at
        ``>= 2^26`` (encoding error ~1e-6 per weight) and is at most ``2^8``.
        """
        return max(0, min(8, q_last.bit_length() - 1 - 26))

    def _lift(self, ct, k: int):
        """``ct * 2^k`` with scale ``2^k * ct.scale``: the same values, rotation noise ``2^k`` times smaller."""
        if k == 0:
            return ct
        pt, out = sa.Plaintext(), sa.Ciphertext()
        self.encoder.encode(float(1 << k), ct.parms_id(), 1.0, pt)  # the constant polynomial 2^k, exactly
        self.evaluator.multiply_plain(ct, pt, out)
        out.scale = ct.scale * (1 << k)
        return out

    def drop_to_level(self, ct, level: int):
        """``ct`` mod-switched down to ``level`` (primes dropped: the same values and scale, cheaper products); ``ct``
        itself when it is at or below ``level``."""
        target = self.seal.get_context_data(ct.parms_id())
        if target.chain_index() <= level:
            return ct
        while target.chain_index() > level:
            target = target.next_context_data()
        out = sa.Ciphertext()
        self.evaluator.mod_switch_to(ct, target.parms_id(), out)
        return out

    def apply(self, layer: DiagonalLinear, groups: Sequence[Sequence], level: int | None = None) -> list[list]:
        """``groups[g][ci]`` input ciphertexts -> ``out[g][co]``: one level lower, same scale, zeros past ``n_out``.

        ``level``: compute at this level (inputs above it are mod-switched down first; the output is one below).
        Plaintexts are encoded once per output chunk for all token groups and dropped afterwards, so a layer's
        encoded weights never all exist at once.  Inputs are lifted by ``2^lift_bits`` before the baby steps.
        """
        if level is not None:
            groups = [[self.drop_to_level(ct, level) for ct in grp] for grp in groups]
        pid, scale, q_last = self._check(layer, groups)
        t0 = time.perf_counter()
        enc0 = self.stats["encode_s"]
        k = self.lift_bits(q_last)
        babies = [[self._babies(self._lift(ct, k), layer) for ct in grp] for grp in groups]
        pos, neg = layer.plan.giant_chains()
        out: list[list] = [[None] * layer.chunks_out for _ in groups]
        for co in range(layer.chunks_out):
            pts = self.encode(layer, co, pid, float(q_last) / (1 << k))
            if not pts:
                raise ValueError(f"{layer.name}: output chunk {co} has no weight above the encoding precision")
            for g, rots in enumerate(babies):
                inner: dict[int, object] = {}
                for ci, blk in pts.items():
                    for (giant, j), pt in blk.items():
                        prod = sa.Ciphertext()
                        self.evaluator.multiply_plain(rots[ci][j], pt, prod)
                        if giant in inner:
                            self.evaluator.add_inplace(inner[giant], prod)
                        else:
                            inner[giant] = prod
                self.stats["multiplies"] += sum(len(b) for b in pts.values())
                acc = inner.get(0)
                for chain in (pos, neg):
                    part = self._horner(chain, inner)
                    if part is not None:
                        if acc is None:
                            acc = part
                        else:
                            self.evaluator.add_inplace(acc, part)
                self.evaluator.rescale_to_next_inplace(acc)
                acc.scale = scale  # exact: the plaintexts were encoded at the dropped prime
                out[g][co] = acc
            del pts
        self.stats["product_s"] += time.perf_counter() - t0 - (self.stats["encode_s"] - enc0)
        return out

    def apply_vectors(
        self, layer: DiagonalLinear, groups: Sequence[Sequence[ts.CKKSVector]], level: int | None = None
    ) -> list[list]:
        """Same as :meth:`apply` on TenSEAL vectors; returns ``CKKSVector`` s of each output chunk's declared size."""
        cts = [[seal_ciphertext(v) for v in grp] for grp in groups]
        res = self.apply(layer, cts, level)
        return [[ckks_vector(self.context, ct, layer.n_out[co]) for co, ct in enumerate(row)] for row in res]

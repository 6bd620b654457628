"""Baby-step giant-step linear layers under CKKS on ``tenseal.sealapi`` (SEAL 4.1), and the keys they need.

The plaintext side (diagonals, rotation plan, Galois step list) is :mod:`pi_eval.diagonal`; this module runs it:

* :class:`BSGSEvaluator` (server) holds a **public** TenSEAL context only (it refuses one with a secret key) and
  multiplies the ciphertexts of every token group by a :class:`~pi_eval.diagonal.DiagonalLinear`: baby-step
  rotations once per input ciphertext, plaintexts encoded per output chunk when the layer runs (at the
  ciphertext's level, scale = the prime the rescale drops, so the output keeps the input's scale exactly) and
  freed after it, giant steps once per output chunk, one rescale.
* :func:`public_context` (client) serializes a TenSEAL public context whose Galois keys are exactly the given
  rotation steps (SEAL's seeded form), instead of TenSEAL's default power-of-two set.
* :func:`seal_ciphertext` / :func:`ckks_vector` move one ciphertext between a TenSEAL ``CKKSVector`` and ``sealapi``.
  TenSEAL's objects are SEAL objects, so ``sealapi`` functions take them directly (``vec.data.ciphertext()``,
  ``ctx.data.seal_context()``, ``ctx.data.galois_keys()``); the way back goes through SEAL's serialization, and
  ``sealapi`` saves to file paths only, so that crosses a file in a private temporary directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence

import tenseal as ts
import tenseal.sealapi as sa

from .diagonal import DiagonalLinear, galois_steps, signed_step

__all__ = [
    "BSGSEvaluator",
    "ckks_vector",
    "galois_element",
    "galois_steps",
    "public_context",
    "seal_ciphertext",
]


# ---------------------------------------------------------------------------------------------- byte helpers
_scratch_dir: str | None = None


def _scratch() -> str:
    """A private temporary directory (in memory where /dev/shm exists) for sealapi's path-only save/load."""
    global _scratch_dir
    if _scratch_dir is None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        _scratch_dir = tempfile.mkdtemp(prefix="pi_eval_bsgs_", dir=base)
        atexit.register(shutil.rmtree, _scratch_dir, True)
    return _scratch_dir


def _saved_bytes(obj) -> bytes:
    """Bytes of a sealapi object (Ciphertext, Serializable keys) as SEAL's ``save`` writes them."""
    fd, path = tempfile.mkstemp(dir=_scratch())
    os.close(fd)
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("malformed protobuf: truncated varint")
        b = buf[i]
        n, i, shift = n | (b & 0x7F) << shift, i + 1, shift + 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes) -> list[tuple[int, int, bytes]]:
    """Top-level protobuf fields ``(number, wire type, raw value bytes)``; length-delimited values without length."""
    out, i = [], 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, j = _read_varint(buf, i)
        elif wire == 1:
            j = i + 8
        elif wire == 5:
            j = i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            j = i + n
        else:
            raise ValueError(f"malformed protobuf: wire type {wire} in field {num}")
        if j > len(buf):
            raise ValueError(f"malformed protobuf: field {num} runs past the end")
        out.append((num, wire, bytes(buf[i:j])))
        i = j
    return out


def _emit(num: int, wire: int, raw: bytes) -> bytes:
    key = _varint(num << 3 | wire)
    return key + (_varint(len(raw)) + raw if wire == 2 else raw)


# ---------------------------------------------------------------------------------------------- interop
def seal_ciphertext(vec: ts.CKKSVector):
    """The SEAL ciphertext of a one-ciphertext TenSEAL ``CKKSVector`` (a copy; usable by every sealapi call)."""
    cts = vec.data.ciphertext()
    if len(cts) != 1:
        raise ValueError(f"CKKSVector holds {len(cts)} ciphertexts; a BSGS product takes exactly one per input chunk")
    return cts[0]


def ckks_vector(ctx: ts.Context, ct, size: int) -> ts.CKKSVector:
    """A SEAL ciphertext -> TenSEAL ``CKKSVector`` of declared ``size`` and the ciphertext's scale.

    Builds TenSEAL's ``CKKSVectorProto`` (tenseal/proto/tensors.proto: 1 sizes, 2 ciphertexts, 3 scale).
    """
    slots = ctx.data.seal_context().key_context_data().parms().poly_modulus_degree() // 2
    if not 1 <= size <= slots:
        raise ValueError(f"size={size} must be in [1, {slots}] (the slots of one ciphertext)")
    raw = _saved_bytes(ct)
    sizes = _varint(size)
    blob = _emit(1, 2, sizes) + _emit(2, 2, raw) + _emit(3, 1, struct.pack("<d", float(ct.scale)))
    return ts.ckks_vector_from(ctx, blob)


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
    galois = _saved_bytes(keygen.create_galois_keys([galois_element(s, n) for s in steps]))
    base = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)
    out = b""
    for num, wire, raw in _fields(base):
        if num == 2 and wire == 2:  # TenSEALPublicProto: append field 5 (galois_keys)
            if any(f == 5 for f, _, _ in _fields(raw)):
                raise ValueError("the serialized public context already carries Galois keys")
            raw += _emit(5, 2, galois)
        out += _emit(num, wire, raw)
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

    def apply(self, layer: DiagonalLinear, groups: Sequence[Sequence]) -> list[list]:
        """``groups[g][ci]`` input ciphertexts -> ``out[g][co]``: one level lower, same scale, zeros past ``n_out``.

        Plaintexts are encoded once per output chunk for all token groups and dropped afterwards, so a layer's
        encoded weights never all exist at once.
        """
        pid, scale, q_last = self._check(layer, groups)
        t0 = time.perf_counter()
        enc0 = self.stats["encode_s"]
        babies = [[self._babies(ct, layer) for ct in grp] for grp in groups]
        pos, neg = layer.plan.giant_chains()
        out: list[list] = [[None] * layer.chunks_out for _ in groups]
        for co in range(layer.chunks_out):
            pts = self.encode(layer, co, pid, float(q_last))
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

    def apply_vectors(self, layer: DiagonalLinear, groups: Sequence[Sequence[ts.CKKSVector]]) -> list[list]:
        """Same as :meth:`apply` on TenSEAL vectors; returns ``CKKSVector`` s of each output chunk's declared size."""
        cts = [[seal_ciphertext(v) for v in grp] for grp in groups]
        res = self.apply(layer, cts)
        return [[ckks_vector(self.context, ct, layer.n_out[co]) for co, ct in enumerate(row)] for row in res]

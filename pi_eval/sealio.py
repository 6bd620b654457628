"""TenSEAL <-> SEAL (``tenseal.sealapi``) byte-level interop: the one owner of this conversion in pi_eval.

TenSEAL's objects are SEAL objects wrapped in small protobuf messages.  This module holds the protobuf codec those
messages need (varints, top-level fields) and the conversions built on it:

* :func:`vector_to_seal` / :func:`seal_to_vector`: TenSEAL ``CKKSVector.serialize()`` bytes <-> SEAL ciphertext bytes
  (``CKKSVectorProto`` in tenseal/proto/tensors.proto: 1 packed uint32 sizes, 2 bytes ciphertexts, 3 double scale);
* :func:`seal_ciphertext` / :func:`ckks_vector`: a TenSEAL ``CKKSVector`` object <-> a ``sealapi.Ciphertext``;
* :func:`saved_bytes`: the bytes SEAL's ``save`` writes for a ``sealapi`` object.  ``sealapi`` saves to file paths
  only, so that crosses a file in a private temporary directory (in memory where ``/dev/shm`` exists).

Used by :mod:`pi_eval.bsgs` (linear layers, public contexts) and :mod:`pi_eval.refresh` (mode B).
"""

from __future__ import annotations

import atexit
import os
import shutil
import struct
import tempfile

import tenseal as ts

__all__ = [
    "ckks_vector",
    "proto_field",
    "proto_fields",
    "read_varint",
    "saved_bytes",
    "seal_ciphertext",
    "seal_to_vector",
    "varint",
    "vector_to_seal",
]


# ---------------------------------------------------------------------------------------------- protobuf codec
def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    if n < 0:
        raise ValueError(f"varint of a negative integer {n}: protobuf varints here are unsigned")
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    """``(value, next index)`` of the varint at ``buf[i:]``; ``ValueError`` if it is truncated or over 64 bits."""
    n = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("malformed protobuf: truncated varint")
        b = buf[i]
        n, i, shift = n | (b & 0x7F) << shift, i + 1, shift + 7
        if not b & 0x80:
            return n, i


def proto_fields(buf: bytes) -> list[tuple[int, int, bytes]]:
    """Top-level protobuf fields ``(number, wire type, raw value bytes)``; length-delimited values without length."""
    out, i = [], 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, j = read_varint(buf, i)
        elif wire == 1:
            j = i + 8
        elif wire == 5:
            j = i + 4
        elif wire == 2:
            n, i = read_varint(buf, i)
            j = i + n
        else:
            raise ValueError(f"malformed protobuf: wire type {wire} in field {num}")
        if j > len(buf):
            raise ValueError(f"malformed protobuf: field {num} runs past the end")
        out.append((num, wire, bytes(buf[i:j])))
        i = j
    return out


def proto_field(num: int, wire: int, raw: bytes) -> bytes:
    """One encoded field; ``raw`` is the value's bytes (without the length prefix for wire type 2)."""
    return varint(num << 3 | wire) + (varint(len(raw)) + raw if wire == 2 else raw)


# ---------------------------------------------------------------------------------------------- CKKSVector bytes
def vector_to_seal(blob: bytes) -> tuple[list[int], list[bytes], float]:
    """TenSEAL ``CKKSVector.serialize()`` bytes -> (chunk sizes, SEAL ciphertext bytes per chunk, scale)."""
    sizes: list[int] = []
    cts: list[bytes] = []
    scale = 0.0
    try:
        fields = proto_fields(blob)
    except ValueError as e:
        raise ValueError(f"corrupted CKKS vector: {e}") from None
    for num, wire, raw in fields:
        if num == 1 and wire == 2:  # packed sizes
            i = 0
            while i < len(raw):
                try:
                    v, i = read_varint(raw, i)
                except ValueError as e:
                    raise ValueError(f"corrupted CKKS vector: {e}") from None
                sizes.append(v)
        elif num == 1 and wire == 0:
            sizes.append(read_varint(raw, 0)[0])
        elif num == 2 and wire == 2:
            cts.append(raw)
        elif num == 3 and wire == 1:
            (scale,) = struct.unpack("<d", raw)
        else:
            raise ValueError(f"corrupted CKKS vector: unexpected field {num} (wire type {wire})")
    return sizes, cts, scale


def seal_to_vector(size: int, ct: bytes, scale: float) -> bytes:
    """One SEAL ciphertext's bytes -> TenSEAL ``CKKSVector`` bytes of declared ``size`` (inverse of
    :func:`vector_to_seal` for one chunk)."""
    return proto_field(1, 2, varint(size)) + proto_field(2, 2, ct) + proto_field(3, 1, struct.pack("<d", float(scale)))


# ---------------------------------------------------------------------------------------------- sealapi objects
_scratch_dir: str | None = None


def _scratch() -> str:
    """A private temporary directory (in memory where /dev/shm exists) for sealapi's path-only save."""
    global _scratch_dir
    if _scratch_dir is None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        _scratch_dir = tempfile.mkdtemp(prefix="pi_eval_seal_", dir=base)
        atexit.register(shutil.rmtree, _scratch_dir, True)
    return _scratch_dir


def saved_bytes(obj) -> bytes:
    """Bytes of a sealapi object (Ciphertext, Plaintext, keys, Serializable) as SEAL's ``save`` writes them."""
    fd, path = tempfile.mkstemp(dir=_scratch())
    os.close(fd)
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def seal_ciphertext(vec: ts.CKKSVector):
    """The SEAL ciphertext of a one-ciphertext TenSEAL ``CKKSVector`` (a copy; usable by every sealapi call)."""
    cts = vec.data.ciphertext()
    if len(cts) != 1:
        raise ValueError(f"CKKSVector holds {len(cts)} ciphertexts; expected exactly one")
    return cts[0]


def ckks_vector(ctx: ts.Context, ct, size: int) -> ts.CKKSVector:
    """A SEAL ciphertext -> TenSEAL ``CKKSVector`` of declared ``size`` (1 <= size <= slots) and the ciphertext's
    scale."""
    slots = ctx.data.seal_context().key_context_data().parms().poly_modulus_degree() // 2
    if not 1 <= size <= slots:
        raise ValueError(f"size={size} must be in [1, {slots}] (the slots of one ciphertext)")
    return ts.ckks_vector_from(ctx, seal_to_vector(size, saved_bytes(ct), float(ct.scale)))

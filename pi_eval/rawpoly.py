"""Exact integer access to CKKS ciphertexts and plaintexts (``tenseal.sealapi``, SEAL 4.1).

TenSEAL's vectors only expose slot values (decoded in double precision).  The hiding refresh (:mod:`pi_eval.refresh`)
works on the plaintext *polynomial* as exact integers instead: the server adds a huge random integer polynomial, the
client re-encrypts what it decrypts without ever decoding it.  This module is the bridge:

* :class:`RawCKKS` holds a ``sealapi`` context built from the same parameters as the TenSEAL context (SEAL derives
  the same primes and the same ``parms_id``), the public key, and, on the client only, the secret key;
* ciphertexts travel between the two worlds as SEAL's own serialization (a TenSEAL ``CKKSVector`` is a small
  protobuf around it, converted by :mod:`pi_eval.sealio`);
* a plaintext polynomial is read as ``[primes, N]`` residues (:meth:`RawCKKS.decrypt_coeffs`) and built from integer
  coefficients (:meth:`RawCKKS.plaintext`) through SEAL's own NTT tables, so no floating point is involved.

``sealapi`` loads and saves through file paths only, so each object crosses a file in a private temporary directory.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import weakref

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa
import tenseal.sealapi.util as sau

from .params import ParamSet

_SEAL_MAGIC, _SEAL_HEADER = 0xA15E, struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, -, size


# ------------------------------------------------------------------------------------------- exact RNS arithmetic
def crt_centered(res: np.ndarray, primes: list[int]) -> np.ndarray:
    """Residues [k, N] (uint64) modulo ``primes`` -> centered integers in (-Q/2, Q/2] (object array [N])."""
    Q = 1
    for q in primes:
        Q *= q
    acc = np.zeros(res.shape[1], dtype=object)
    for r, q in zip(res, primes, strict=True):
        Qi = Q // q
        acc = acc + r.astype(object) * ((Qi * pow(Qi, -1, q)) % Q)
    acc = acc % Q
    return np.where(acc > Q // 2, acc - Q, acc)


def to_residues(coeffs: np.ndarray, primes: list[int]) -> np.ndarray:
    """Integers (object array [N], any sign) -> residues [k, N] (uint64)."""
    return np.stack([np.array((coeffs % q).tolist(), dtype=np.uint64) for q in primes])


def round_scaled(coeffs: np.ndarray, num: int, den: int) -> np.ndarray:
    """round(coeffs * num / den) with exact integers, ties away from zero (object array)."""
    x = coeffs * num
    sign = np.where(x < 0, -1, 1)
    return sign * ((np.abs(x) * 2 + den) // (2 * den))


# ------------------------------------------------------------------------------------------- the sealapi mirror
class RawCKKS:
    """SEAL objects mirroring a TenSEAL context: same parameters, same keys; exact polynomial I/O.

    ``tenseal_ctx`` is the party's own TenSEAL context (public on the server, private on the client); only the keys
    it holds are imported, so the server's mirror has no secret key either.
    """

    def __init__(self, params: ParamSet, tenseal_ctx: ts.Context):
        n = params.poly_modulus_degree
        ep = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
        ep.set_poly_modulus_degree(n)
        ep.set_coeff_modulus(sa.CoeffModulus.Create(n, list(params.coeff_mod_bit_sizes)))
        self.ctx = sa.SEALContext(ep, True, sa.SEC_LEVEL_TYPE.TC128)
        if not self.ctx.parameters_set():
            raise ValueError(f"SEAL rejects parameter set {params.name}: {self.ctx.parameters_error_message()}")
        self.n = n
        self.log_n = n.bit_length() - 1
        self._dir = tempfile.mkdtemp(prefix="pi_eval_raw_")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._lock = threading.Lock()
        self.public_key = self._import(tenseal_ctx.public_key().data, sa.PublicKey())
        self.secret_key = None
        if tenseal_ctx.has_secret_key():
            self.secret_key = self._import(tenseal_ctx.secret_key().data, sa.SecretKey())
        self.encryptor = sa.Encryptor(self.ctx, self.public_key)
        self.evaluator = sa.Evaluator(self.ctx)
        self.decryptor = sa.Decryptor(self.ctx, self.secret_key) if self.secret_key is not None else None
        self._ntt: dict[tuple, object] = {}

    # -------------------------------------------------------------- file bridge
    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _import(self, obj, dst):
        with self._lock:
            p = self._path("obj")
            obj.save(p)
            dst.load(self.ctx, p)
            with open(p, "rb") as f:
                self._version = f.read(_SEAL_HEADER.size)[3:5]  # SEAL's (major, minor) as it writes them
        return dst

    def load_ciphertext(self, data: bytes) -> sa.Ciphertext:
        ct = sa.Ciphertext()
        with self._lock:
            p = self._path("ct")
            with open(p, "wb") as f:
                f.write(data)
            try:
                ct.load(self.ctx, p)
            except Exception as e:  # SEAL's own validity checks (parameters, sizes, residues < primes)
                raise ValueError(f"corrupted ciphertext: SEAL refused it ({e})") from None
        if ct.size() != 2:
            raise ValueError(f"corrupted ciphertext: {ct.size()} polynomials, a refresh expects 2")
        return ct

    def save(self, obj) -> bytes:
        with self._lock:
            p = self._path("out")
            obj.save(p)
            with open(p, "rb") as f:
                return f.read()

    def close(self) -> None:
        self._cleanup()

    # -------------------------------------------------------------- levels
    def primes(self, parms_id) -> list[int]:
        cd = self.ctx.get_context_data(parms_id)
        if cd is None:
            raise ValueError("corrupted ciphertext: unknown parameter id")
        return [q.value() for q in cd.parms().coeff_modulus()]

    def _tables(self, parms_id):
        key = tuple(parms_id)
        if key not in self._ntt:
            cd = self.ctx.get_context_data(parms_id)
            moduli = cd.parms().coeff_modulus()
            self._ntt[key] = (moduli, [sau.NTTTables(self.log_n, q) for q in moduli])
        return self._ntt[key]

    # -------------------------------------------------------------- polynomials
    def plaintext(self, coeffs: np.ndarray, parms_id, scale: float) -> sa.Plaintext:
        """Integer coefficients (object array [N]) -> CKKS plaintext at ``parms_id`` (NTT form), exactly."""
        moduli, tables = self._tables(parms_id)
        qs = [q.value() for q in moduli]
        res = to_residues(coeffs, qs)
        data = b"".join(
            np.array(sau.ntt_negacyclic_harvey(res[i].tolist(), tables[i]), dtype="<u8").tobytes()
            for i in range(len(qs))
        )
        # SEAL 4.1 Plaintext::save_members (uncompressed): parms_id, coeff_count, scale, DynArray (its own header)
        dyn_body = struct.pack("<Q", len(qs) * self.n) + data
        major, minor = self._version
        dyn = _SEAL_HEADER.pack(_SEAL_MAGIC, 16, major, minor, 0, 0, 16 + len(dyn_body)) + dyn_body
        body = struct.pack("<4Q", *parms_id) + struct.pack("<Q", len(qs) * self.n) + struct.pack("<d", scale) + dyn
        blob = _SEAL_HEADER.pack(_SEAL_MAGIC, 16, major, minor, 0, 0, 16 + len(body)) + body
        pt = sa.Plaintext()
        with self._lock:
            p = self._path("pt")
            with open(p, "wb") as f:
                f.write(blob)
            pt.load(self.ctx, p)
        return pt

    def coeffs(self, pt: sa.Plaintext) -> np.ndarray:
        """CKKS plaintext (NTT form) -> centered integer coefficients (object array [N]), exactly."""
        moduli, tables = self._tables(pt.parms_id())
        qs = [q.value() for q in moduli]
        res = np.empty((len(qs), self.n), dtype=np.uint64)
        for i, q in enumerate(qs):
            vals = [pt[i * self.n + j] for j in range(self.n)]
            inv = sau.inverse_ntt_negacyclic_harvey(vals, tables[i])  # lazy variant: values in [0, 2q)
            res[i] = np.array(inv, dtype=np.uint64) % np.uint64(q)
        return crt_centered(res, qs)

    def decrypt_coeffs(self, ct: sa.Ciphertext) -> np.ndarray:
        if self.decryptor is None:
            raise PermissionError("this party holds no secret key")
        pt = sa.Plaintext()
        self.decryptor.decrypt(ct, pt)
        return self.coeffs(pt)

    def encrypt(self, pt: sa.Plaintext) -> sa.Ciphertext:
        """Public-key encryption at the plaintext's level (fresh randomness from SEAL's OS-seeded generator)."""
        ct = sa.Ciphertext()
        self.encryptor.encrypt(pt, ct)
        return ct

"""Linear layers as BSGS diagonal products (pi_eval.diagonal, pi_eval.bsgs) against numpy and TenSEAL's ``mm``."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from pi_eval.bsgs import BSGSEvaluator, galois_element, public_context
from pi_eval.client import pack
from pi_eval.dense import dense_matrices
from pi_eval.diagonal import BSGSPlan, DiagonalLinear, Diagonals, galois_steps, linear_blocks, signed_step
from pi_eval.layout import Layout, LinearWeights
from pi_eval.params import PARAM_SETS
from pi_eval.plan import random_plan
from pi_eval.schedule import compile_schedule
from pi_eval.sealio import ckks_vector, read_varint, seal_ciphertext, seal_to_vector, varint, vector_to_seal

PARAMS = PARAM_SETS["n8192-l2"]
SLOTS = PARAMS.slots
TOL = 1e-3  # the acceptance bound on logits; measured errors are ~1e-7 (printed by -s)


def schedule(d: int, T: int, **kw):
    plan = random_plan(d=d, n_head=2, vocab=32, n_pos=T, **kw)
    return compile_schedule(plan, PARAMS, T)


# Layouts pi_eval uses: compact registers with replicated copies (d=16, T=8), a cyclic register holding two copies
# of a 4-piece chunk (d=32, T=16 without LayerNorm: fc_out), and full-slot cyclic registers (d=32, T=128).
# The full-slot case checks two layers only: its dense matrices are 4096 x 4096.
SHAPES = [(16, 8, {}, None), (32, 16, {"ln": False, "ln_f": False}, None), (32, 128, {}, ("L0.qkv", "L0.fc_out"))]


# ---------------------------------------------------------------------------------------------- plaintext side
@pytest.mark.parametrize(("d", "T", "kw", "names"), SHAPES)
def test_placements_are_exactly_pi_evals_block_matrices(d, T, kw, names):
    sched = schedule(d, T, **kw)
    for name, lw in sched.server_weights.items():
        if names is not None and name not in names:
            continue
        blocks = linear_blocks(lw, SLOTS)
        dense = dict(dense_matrices(lw))
        assert set(blocks) == set(dense), name
        for key, blk in blocks.items():
            np.testing.assert_array_equal(blk.diagonals().to_dense(), dense[key], err_msg=f"{name} {key}")
            np.testing.assert_array_equal(blk.indices(), Diagonals.from_dense(dense[key], SLOTS).indices())


def test_placements_on_a_cyclic_register_with_copies():
    """Built by hand so the case stays covered whatever layouts the planner picks: a cyclic input holding two
    copies of a 4-piece chunk, read into five output copies of a compact register."""
    lin = Layout(dim=128, pieces=4, cp=4, g=16, w=32, copies=2, slots=SLOTS)
    lout = Layout(dim=32, pieces=1, cp=1, g=16, w=32, copies=5)
    W = np.random.default_rng(3).normal(size=(128, 32))
    lw = LinearWeights(W, None, lin, lout, q_valid=5, valid_in=2)
    blocks = linear_blocks(lw, SLOTS)
    dense = dict(dense_matrices(lw))
    assert set(blocks) == set(dense) == {(0, 0)}
    np.testing.assert_array_equal(blocks[(0, 0)].diagonals().to_dense(), dense[(0, 0)])
    rows = {p.row0 // lin.n_c for p in blocks[(0, 0)].placements}
    assert rows == {0, 1}  # both input copies are read


def test_diagonals_follow_tenseal_mm_semantics():
    rng = np.random.default_rng(0)
    n_in, n_out = 48, 40
    M = rng.normal(size=(n_in, n_out)) * (rng.random((n_in, n_out)) < 0.3)
    D = Diagonals.from_dense(M, 64)
    np.testing.assert_array_equal(D.to_dense(), M)
    x = rng.normal(size=n_in)
    x_rep = np.resize(x, 64)  # a fresh TenSEAL vector is replicated over all slots
    # mm reads slot (row - j) mod n_in past j: the true product for entries with row >= j ...
    upper = (np.arange(n_in)[:, None] >= np.arange(n_out)[None, :]).astype(float)
    np.testing.assert_allclose(Diagonals.from_dense(M * upper, 64).apply_plain(x_rep), x @ (M * upper), atol=1e-12)
    # ... and on a full-slot (cyclic) vector for every entry.
    Mc = rng.normal(size=(64, 64))
    xc = rng.normal(size=64)
    np.testing.assert_allclose(Diagonals.from_dense(Mc, 64).apply_plain(xc), xc @ Mc, atol=1e-12)


def test_plan_splits_every_diagonal_and_keeps_three_keys_for_a_band():
    slots, w = 4096, 128
    band = [s % slots for s in range(-(w - 1), w)]  # one dense w x w block on a cyclic register
    plan = BSGSPlan.for_indices(band, slots)
    for s in band:
        giant, j = plan.split(s)
        assert 0 <= j < plan.baby and giant % plan.baby == 0 and (giant + j - s) % slots == 0
        assert j in plan.baby_offsets and giant in plan.giant_offsets
    assert plan.rotations(1, 1) <= 2 * int(np.ceil(np.sqrt(len(band))))  # BSGS: ~2 sqrt(#diagonals), not 255
    assert plan.galois_steps() == (-plan.baby, 1, plan.baby)
    # more output chunks than input chunks favour fewer giant steps: a larger baby step
    assert BSGSPlan.for_indices(band, slots, 1, 4).baby > BSGSPlan.for_indices(band, slots, 4, 1).baby


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"n_in=5000 must be in \[1, slots=4096\]"):
        Diagonals.from_dense(np.ones((5000, 8)), 4096)
    with pytest.raises(ValueError, match=r"n_out=4097 must be in \[1, slots=4096\]"):
        Diagonals.from_dense(np.ones((8, 4097)), 4096)
    with pytest.raises(ValueError, match=r"must be 2-D \[n_in, n_out\], got shape \(8,\)"):
        Diagonals.from_dense(np.ones(8), 4096)
    with pytest.raises(ValueError, match=r"slots=48 must be a power of two"):
        Diagonals.from_dense(np.ones((8, 8)), 48)
    with pytest.raises(ValueError, match=r"non-finite"):
        Diagonals.from_dense(np.full((8, 8), np.nan), 64)
    with pytest.raises(ValueError, match=r"weights are all zero"):
        DiagonalLinear({(0, 0): Diagonals(8, 8, 64, {})}, 1, 1, 64)
    one = Diagonals.from_dense(np.eye(8), 64)
    with pytest.raises(ValueError, match=r"block \(1, 0\) outside 1 input x 1 output chunks"):
        DiagonalLinear({(1, 0): one}, 1, 1, 64)
    with pytest.raises(ValueError, match=r"output chunks \[1\] have no non-zero weights"):
        DiagonalLinear({(0, 0): one}, 1, 2, 64)
    with pytest.raises(ValueError, match=r"built for 64 slots, the layer has 128"):
        DiagonalLinear({(0, 0): one}, 1, 1, 128)
    with pytest.raises(ValueError, match=r"baby=64 must be in \[1, slots/2=32\]"):
        DiagonalLinear({(0, 0): one}, 1, 1, 64, baby=64)
    with pytest.raises(ValueError, match=r"x must be the whole slot vector of shape \(64,\), got \(8,\)"):
        one.apply_plain(np.ones(8))


# ---------------------------------------------------------------------------------------------- under encryption
@pytest.fixture(scope="module")
def secret_ctx():
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        PARAMS.poly_modulus_degree,
        coeff_mod_bit_sizes=list(PARAMS.coeff_mod_bit_sizes),
        n_threads=1,
    )
    ctx.global_scale = 2.0**PARAMS.scale_bits
    return ctx


@pytest.fixture(scope="module")
def default_ctx(secret_ctx):
    """The same keys plus TenSEAL's default Galois keys (every power of two), as pi_eval's client makes today."""
    ctx = secret_ctx.copy()
    ctx.generate_galois_keys()
    return ctx


def server_context(secret_ctx, steps) -> ts.Context:
    ctx = ts.context_from(public_context(secret_ctx, steps), n_threads=1)
    assert not ctx.is_private() and not ctx.has_secret_key()
    return ctx


def encrypt(secret_ctx, server_ctx, X, lay, groups) -> list[list[ts.CKKSVector]]:
    """Client packs and encrypts; the server deserializes with its public context."""
    return [
        [ts.ckks_vector_from(server_ctx, ts.ckks_vector(secret_ctx, v.tolist()).serialize()) for v in grp]
        for grp in pack(X, lay, groups)
    ]


def decrypt(secret_ctx, vecs) -> list[list[np.ndarray]]:
    return [[np.array(ts.ckks_vector_from(secret_ctx, v.serialize()).decrypt()) for v in grp] for grp in vecs]


def expected(Y, lay, groups, q_valid) -> list[list[np.ndarray]]:
    """Packed [T, D] values as the product writes them: ``q_valid`` copies, zeros elsewhere in the declared size."""
    out = []
    for grp in pack(Y, lay, groups):
        row = []
        for v in grp:
            e = np.zeros(lay.size)
            e[: q_valid * lay.n_c] = v[: q_valid * lay.n_c]
            row.append(e)
        out.append(row)
    return out


def max_err(got, want) -> float:
    return max(
        float(np.max(np.abs(g - w))) for gg, ww in zip(got, want, strict=True) for g, w in zip(gg, ww, strict=True)
    )


@pytest.mark.tenseal
@pytest.mark.parametrize(
    ("d", "T", "kw", "name"),
    [(16, 8, {}, "L0.qkv"), (32, 16, {"ln": False, "ln_f": False}, "L0.fc_out"), (32, 128, {}, "L0.o_proj")],
)
def test_bsgs_product_matches_numpy(secret_ctx, d, T, kw, name):
    sched = schedule(d, T, **kw)
    lw = sched.server_weights[name]
    layer = DiagonalLinear.from_linear_weights(lw, SLOTS, name=name)
    srv = server_context(secret_ctx, layer.galois_steps())  # only the keys this product uses
    evaluator = BSGSEvaluator(srv)
    X = np.random.default_rng(1).normal(size=(T, lw.W.shape[0]))
    out = evaluator.apply_vectors(layer, encrypt(secret_ctx, srv, X, lw.lin, sched.groups))
    assert all(v.size() == lw.lout.size for grp in out for v in grp)
    err = max_err(decrypt(secret_ctx, out), expected(X @ lw.W, lw.lout, sched.groups, lw.q_valid))
    print(f"{name} d={d} T={T}: max abs error {err:.2e}, {evaluator.stats['rotations']:.0f} rotations")
    assert err < TOL
    assert err < 1e-5  # measured 2e-8 .. 6e-7
    # every rotation the product made is one of the listed steps, and every listed step was used
    assert set(evaluator.rotation_steps) == set(layer.galois_steps())
    assert evaluator.stats["rotations"] == layer.rotations() * sched.groups


@pytest.mark.tenseal
def test_chained_layers_are_a_drop_in_for_mm(secret_ctx, default_ctx):
    """fc_in -> fc_out on the server (identity activation): the second product reads a non-replicated mm output
    with two valid copies; biases are added by TenSEAL on the converted vectors, as the server adds them."""
    sched = schedule(16, 8, act="identity")
    lw_in, lw_out = sched.server_weights["L0.fc_in"], sched.server_weights["L0.fc_out"]
    assert lw_out.valid_in == 2 and not lw_out.lin.cyclic
    layers = [DiagonalLinear.from_linear_weights(lw, SLOTS) for lw in (lw_in, lw_out)]
    steps = galois_steps(layers)
    srv = server_context(secret_ctx, steps)
    assert srv.galois_keys().data.size() == len(steps)
    evaluator = BSGSEvaluator(srv)
    X = np.random.default_rng(2).normal(size=(8, 16))
    x = encrypt(secret_ctx, srv, X, lw_in.lin, sched.groups)
    z = evaluator.apply_vectors(layers[0], x)
    z = [[v + b.tolist() for v, b in zip(grp, lw_in.biases(), strict=True)] for grp in z]
    y = evaluator.apply_vectors(layers[1], z)
    y = [[v + b.tolist() for v, b in zip(grp, lw_out.biases(), strict=True)] for grp in y]
    Z = X @ lw_in.W + lw_in.b
    err = max_err(decrypt(secret_ctx, y), expected(Z @ lw_out.W + lw_out.b, lw_out.lout, 1, lw_out.q_valid))
    assert err < 1e-5  # measured ~3e-7 after two levels
    # TenSEAL's dense mm on the same ciphertext gives the same values where the declared output lives
    dense = {k: ts.plain_tensor(M) for k, M in dense_matrices(lw_in)}
    ref = ts.ckks_vector_from(default_ctx, x[0][0].serialize()).mm(dense[(0, 0)]).decrypt()
    mine = ts.ckks_vector_from(secret_ctx, evaluator.apply_vectors(layers[0], x)[0][0].serialize()).decrypt()
    assert len(ref) == len(mine) == lw_in.lout.size
    assert np.max(np.abs(np.array(ref) - np.array(mine))) < 1e-5


@pytest.mark.tenseal
def test_missing_key_and_secret_key_are_refused(secret_ctx):
    sched = schedule(16, 8)
    layer = DiagonalLinear.from_linear_weights(sched.server_weights["L0.qkv"], SLOTS)
    steps = layer.galois_steps()
    with pytest.raises(ValueError, match="refuses a context holding a secret key"):
        BSGSEvaluator(secret_ctx)
    srv = server_context(secret_ctx, steps[1:])  # one listed step left out
    x = [[ts.ckks_vector_from(srv, ts.ckks_vector(secret_ctx, [1.0] * layer.blocks[(0, 0)].n_in).serialize())]]
    with pytest.raises(ValueError, match=rf"lacks Galois keys for rotation steps \[{steps[0]}\]"):
        BSGSEvaluator(srv).apply_vectors(layer, x)
    with pytest.raises(ValueError, match="token group 0 has 2 input ciphertexts, the layer takes 1"):
        BSGSEvaluator(server_context(secret_ctx, steps)).apply_vectors(layer, [x[0] * 2])
    with pytest.raises(ValueError, match="needs the client's context with its secret key"):
        public_context(srv, steps)


@pytest.mark.tenseal
def test_interop_and_context_size(secret_ctx, default_ctx):
    v = ts.ckks_vector(secret_ctx, [0.5, -1.25, 3.0])
    back = ckks_vector(secret_ctx, seal_ciphertext(v), 3)
    np.testing.assert_allclose(back.decrypt(), [0.5, -1.25, 3.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"size=5000 must be in \[1, 4096\]"):
        ckks_vector(secret_ctx, seal_ciphertext(v), 5000)
    # TenSEAL's own bytes <-> (sizes, SEAL ciphertext, scale) and back, byte for byte (pi_eval.sealio)
    sizes, cts, scale = vector_to_seal(v.serialize())
    assert sizes == [3] and len(cts) == 1 and scale == secret_ctx.global_scale
    again = seal_to_vector(3, cts[0], scale)
    assert vector_to_seal(again) == (sizes, cts, scale)
    np.testing.assert_allclose(ts.ckks_vector_from(secret_ctx, again).decrypt(), [0.5, -1.25, 3.0], atol=1e-6)
    with pytest.raises(ValueError, match="corrupted CKKS vector"):
        vector_to_seal(again[:-3])
    assert read_varint(varint(300), 0) == (300, 2)
    gt = secret_ctx.data.seal_context().key_context_data().galois_tool()
    for s in (1, -1, 16, -16, 112, 2047):
        assert galois_element(s, PARAMS.poly_modulus_degree) == gt.get_elt_from_step(s)
    assert signed_step(4095, SLOTS) == -1
    # a handful of keys is far smaller than TenSEAL's default power-of-two set on the same parameters
    small = len(public_context(secret_ctx, [1, 16, -16]))
    default = len(
        default_ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
    )
    assert small < default / 5

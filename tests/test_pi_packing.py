"""pi_eval packing at shapes too slow to encrypt in CI: the schedule run on a plaintext model of TenSEAL's ``mm``.

``sim_mm`` mirrors TenSEAL's ``diagonal_ct_vector_matmul`` (Halevi-Shoup: diagonal ``i`` read with a rotation by
``i`` that is cyclic over all slots) and fresh encryption (the vector repeated over all slots); the first test
checks it against TenSEAL itself.  Simulating whole schedules then checks the compact/cyclic layouts and the
slot-use figures where ciphertexts fill up (T*d >= slots), in a few seconds and without keys.
"""

from __future__ import annotations

import numpy as np
import pytest

from pi_eval.client import Client, pack, unpack
from pi_eval.dense import dense_matrices
from pi_eval.extract import build_model, plan_from_model
from pi_eval.ops import Op
from pi_eval.params import get_param_set
from pi_eval.schedule import compile_schedule, poly_act_override
from pi_eval.slots import TARGET, run_slot_use


def fresh(vec: np.ndarray, slots: int) -> np.ndarray:
    """A freshly encrypted vector: TenSEAL repeats it over all slots (truncating the last repeat)."""
    return np.resize(np.asarray(vec, dtype=np.float64), slots)


def sim_mm(ct: np.ndarray, n_in: int, M: np.ndarray) -> np.ndarray:
    """TenSEAL ``mm`` on a slot vector: out[j] = sum_i ct[(j + i) % slots] * M[(i + j') % n_in, j' % n_out], j' = j % L."""
    slots, n_out = len(ct), M.shape[1]
    jl = np.arange(slots) % min(slots, n_in * n_out)
    rows, cols = np.nonzero(M)
    out = np.zeros(slots)
    for i in np.unique((rows - cols) % n_in):  # the non-zero diagonals (TenSEAL skips the others)
        out += np.roll(ct, -i) * M[(i + jl) % n_in, jl % n_out]
    return out


def simulate(sched, plan, ids) -> np.ndarray:
    """Run a schedule with slot vectors in place of ciphertexts; returns the logits the client would decrypt.

    Steps are read through :data:`pi_eval.ops.OPS` as the parties read them: the server's own ops, the ops the client
    answers (with the register the step sends down, if any), and the final one whose register is the result.
    """
    slots, T, groups = sched.params.slots, len(ids), sched.groups
    regs: dict[str, list[list[np.ndarray]]] = {}

    def enc(vecs):
        return [[fresh(v, slots) for v in grp] for grp in vecs]

    def dec(reg, lay):  # decrypt returns the declared size
        return unpack([[v[: lay.size] for v in grp] for grp in regs[reg]], lay, T)

    def linear(st):
        lw = sched.server_weights[st.name]
        mats, biases = dict(dense_matrices(lw)), lw.biases()
        out = []
        for j, grp in enumerate(regs[st.src]):
            row = []
            for co in range(lw.lout.chunks):
                acc = sum(sim_mm(ct, lw.lin.size, mats[(ci, co)]) for ci, ct in enumerate(grp) if (ci, co) in mats)
                acc = acc + fresh(biases[co], slots)
                if st.residual:
                    acc = acc + regs[st.residual][j][co]
                row.append(acc)
            out.append(row)
        regs[st.dst] = out

    def polynomial(st):
        regs[st.dst] = [[np.polynomial.polynomial.polyval(v, st.fn["coeffs"]) for v in g] for g in regs[st.src]]

    def embed(st):
        regs[st.dst] = enc(pack(plan.embed(ids), st.dst_layout, groups))

    def client_aided(st):
        regs[st.dst] = enc(pack(Client.apply(st.fn, dec(st.src, st.src_layout)), st.dst_layout, groups))

    def refresh(st):  # the hiding refresh returns the same polynomial: every slot unchanged, no re-tiling
        regs[st.dst] = [list(grp) for grp in regs[st.src]]

    server = {Op.LINEAR: linear, Op.POLYNOMIAL: polynomial, Op.SKIP: lambda st: None}
    client = {Op.INPUT: embed, Op.CLIENT_AIDED: client_aided, Op.REFRESH: refresh}
    for st in sched.steps:
        if st.spec.server_computes:
            server[st.op](st)
        elif st.spec.final:
            return dec(st.src, st.src_layout)
        else:
            client[st.op](st)
    raise AssertionError("schedule has no output step")


@pytest.mark.tenseal
def test_sim_mm_matches_tenseal():
    import tenseal as ts

    rng = np.random.default_rng(0)
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60], n_threads=1)
    ctx.global_scale = 2.0**40
    ctx.generate_galois_keys()
    slots = 4096
    for n_in, n_out, diagonals in [(96, 40, (0, 3, 50, 95)), (slots, 64, (0, 7, 2100, slots - 5))]:
        x = rng.normal(size=n_in)  # a compact and a cyclic (whole slot vector) input, wrap-around diagonals included
        M = np.zeros((n_in, n_out))
        for i in diagonals:
            M[(np.arange(n_out) + i) % n_in, np.arange(n_out)] = rng.normal(size=n_out)
        got = np.array(ts.ckks_vector(ctx, x.tolist()).mm(ts.plain_tensor(M)).decrypt())
        assert np.abs(got - sim_mm(fresh(x, slots), n_in, M)[:n_out]).max() < 1e-4
        assert np.abs(got - x @ M).max() < 1e-4


def _plan(preset, d, n_pos, n_layer=2):
    m = build_model(preset, n_layer=n_layer, d_model=d, n_head=2, vocab_size=64, n_positions=n_pos, init_std=0.2)
    return plan_from_model(m)


@pytest.mark.parametrize(
    ("preset", "d", "seq_len", "modes"),
    [
        ("SM+LN+G", 32, 128, None),  # T*d = slots: one full cyclic ciphertext per piece
        ("SM+R", 32, 128, {"relu": "C"}),  # server chain fc_in -> polynomial -> fc_out on full ciphertexts
        ("SM+ScFuFFN", 64, 100, None),  # two token groups of 50
        ("SM+LN+R", 48, 40, {"relu": "C"}),  # d not a power of two, T*d < slots
    ],
)
def test_large_shapes_exact_and_fill_slots(preset, d, seq_len, modes):
    plan = _plan(preset, d, 128)
    ids = np.random.default_rng(1).integers(0, plan.vocab_size, seq_len)
    # mode C needs n8192-l4: n8192-l2 cannot carry the hiding refresh's mask where the polynomial needs one
    sched = compile_schedule(plan, get_param_set("n8192-l4" if modes else "n8192-l2"), seq_len, modes)
    ref = plan.forward(ids, act_override=poly_act_override(sched))
    assert np.abs(simulate(sched, plan, ids) - ref).max() < 1e-9 * max(1.0, np.abs(ref).max())
    su = run_slot_use(sched)
    slots = sched.params.slots
    if seq_len * d >= TARGET * slots:  # the register holding x alone can fill 75% of a ciphertext
        assert su.slot_use >= TARGET and su.slot_use_mm >= TARGET, su
    else:  # best possible is below target and said so
        assert su.slot_use_bound < TARGET and "shape-limited" in su.slot_use_limit
        assert su.slot_use == pytest.approx(su.slot_use_bound)

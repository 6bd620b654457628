"""pi_eval's linear layers: the dense ``mm`` baseline vs BSGS diagonal products, side by side in one run.

The dense path is the **baseline**: what ``Server`` ran before issue #12 (the server now runs the BSGS path);
``pi_eval.dense`` (``dense_matrices``, ``block_matrix``) stays as the dense reference for it and the tests.

For each shape (d, T) and layer (o_proj d->d, fc_in d->4d, fc_out 4d->d of a random one-layer model compiled by
pi_eval's own ``compile_schedule`` on ``n8192-l2``) and each path, three subprocesses play the protocol's parties:

1. client (setup): secret key, the public context (dense: TenSEAL's default power-of-two Galois keys, as
   ``pi_eval.client`` made it; BSGS: only the steps the layer uses), packed and encrypted input;
2. server: loads the public context and the ciphertexts, prepares the weights (dense: one ``ts.plain_tensor`` per
   (input chunk, output chunk) matrix from ``pi_eval.dense.dense_matrices``, exactly as ``Server.__init__`` did;
   BSGS: the layer's placements and rotation plan) and runs the layer on every token group (dense: ``mm`` per
   block as ``Server._linear`` did; BSGS: :class:`pi_eval.bsgs.BSGSEvaluator`), biases added with TenSEAL on both;
3. client (finish): decrypts and compares with ``X @ W + b`` packed by pi_eval's ``pack`` (max abs error).

Each party reports its wall time and its peak RSS (``ru_maxrss`` of its own process). A last step sizes the public
context for the CPU recipes' shape (L=4, H=4, d=128, T=128, vocab 8192) with the keys all its layers use.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_scale.py            # ~10 min on 2 loaded cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_scale.py --shapes 32x128 --layers L0.o_proj

Writes ``<out>/pi_eval_scale_<date>-cpu.json`` and ``.md`` (atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tenseal as ts  # noqa: E402
from hardware import cpu_model  # noqa: E402

from entropic.io import atomic_write_json, atomic_write_text  # noqa: E402
from pi_eval.bsgs import BSGSEvaluator, public_context  # noqa: E402
from pi_eval.client import pack  # noqa: E402
from pi_eval.dense import dense_matrices  # noqa: E402
from pi_eval.diagonal import DiagonalLinear, galois_steps  # noqa: E402
from pi_eval.params import PARAM_SETS  # noqa: E402
from pi_eval.plan import random_plan  # noqa: E402
from pi_eval.schedule import compile_schedule  # noqa: E402

PARAMS = PARAM_SETS["n8192-l2"]
MACHINE = "2-core x86 VM, no GPU, loaded by a training job on both cores and other engineers' tests"


def schedule(d: int, T: int, *, n_layer: int = 1, vocab: int = 64, **kw):
    plan = random_plan(n_layer=n_layer, d=d, n_head=4, vocab=vocab, n_pos=T, seed=0, **kw)
    return compile_schedule(plan, PARAMS, T)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def new_context() -> ts.Context:
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        PARAMS.poly_modulus_degree,
        coeff_mod_bit_sizes=list(PARAMS.coeff_mod_bit_sizes),
        n_threads=1,
    )
    ctx.global_scale = 2.0**PARAMS.scale_bits
    return ctx


def default_public(ctx: ts.Context) -> bytes:
    """Today's public context: TenSEAL's default Galois keys (pi_eval.client.Client)."""
    ctx.generate_galois_keys()
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)


# ---------------------------------------------------------------------------------------------- parties
def client_setup(work: Path, path: str, d: int, T: int, layer: str) -> dict:
    sched = schedule(d, T)
    lw = sched.server_weights[layer]
    t0 = time.perf_counter()
    ctx = new_context()
    if path == "dense":
        pub = default_public(ctx)
        n_keys = ctx.galois_keys().data.size()
    else:
        steps = DiagonalLinear.from_linear_weights(lw, PARAMS.slots).galois_steps()
        pub = public_context(ctx, steps)
        n_keys = len(steps)
    keygen_s = time.perf_counter() - t0
    X = np.random.default_rng(1).normal(size=(T, lw.W.shape[0]))
    t0 = time.perf_counter()
    cts = [[ts.ckks_vector(ctx, v.tolist()).serialize() for v in grp] for grp in pack(X, lw.lin, sched.groups)]
    encrypt_s = time.perf_counter() - t0
    (work / "public.bin").write_bytes(pub)
    (work / "secret.bin").write_bytes(ctx.serialize(save_secret_key=True, save_galois_keys=False))
    (work / "input.pkl").write_bytes(pickle.dumps(cts))
    np.save(work / "X.npy", X)
    return {
        "keygen_s": keygen_s,
        "encrypt_s": encrypt_s,
        "public_context_bytes": len(pub),
        "galois_keys": n_keys,
        "input_ciphertexts": sum(len(g) for g in cts),
    }


def server(work: Path, path: str, d: int, T: int, layer: str) -> dict:
    sched = schedule(d, T)
    lw = sched.server_weights[layer]
    t0 = time.perf_counter()
    ctx = ts.context_from((work / "public.bin").read_bytes(), n_threads=1)
    if ctx.is_private() or ctx.has_secret_key():
        raise RuntimeError("the server was given a secret key")
    groups = [[ts.ckks_vector_from(ctx, b) for b in grp] for grp in pickle.loads((work / "input.pkl").read_bytes())]
    load_s = time.perf_counter() - t0
    biases = [b.tolist() for b in lw.biases()]
    rec: dict = {"load_s": load_s}
    if path == "dense":
        t0 = time.perf_counter()
        mats = {k: ts.plain_tensor(M) for k, M in dense_matrices(lw)}  # Server.__init__
        rec["weights_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = []
        for grp in groups:  # Server._linear
            row = []
            for co in range(lw.lout.chunks):
                acc = None
                for ci, ct in enumerate(grp):
                    pt = mats.get((ci, co))
                    if pt is None:
                        continue
                    r = ct.mm(pt)
                    acc = r if acc is None else acc + r
                row.append(acc + biases[co])
            out.append(row)
        rec["linear_s"] = time.perf_counter() - t0
        rec["blocks"] = len(mats)
    else:
        t0 = time.perf_counter()
        diag = DiagonalLinear.from_linear_weights(lw, PARAMS.slots, name=layer)
        rec["weights_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = BSGSEvaluator(ctx)
        res = ev.apply_vectors(diag, groups)
        out = [[v + biases[co] for co, v in enumerate(row)] for row in res]
        rec["linear_s"] = time.perf_counter() - t0
        rec.update(
            blocks=len(diag.blocks),
            encode_s=ev.stats["encode_s"],
            baby_step=diag.plan.baby,
            rotations=int(ev.stats["rotations"]),
            plaintexts=int(ev.stats["plaintexts"]),
            galois_steps=list(diag.galois_steps()),
        )
    t0 = time.perf_counter()
    blobs = [[v.serialize() for v in row] for row in out]
    rec["serialize_s"] = time.perf_counter() - t0
    (work / "output.pkl").write_bytes(pickle.dumps(blobs))
    return rec


def client_finish(work: Path, path: str, d: int, T: int, layer: str) -> dict:
    sched = schedule(d, T)
    lw = sched.server_weights[layer]
    t0 = time.perf_counter()
    ctx = ts.context_from((work / "secret.bin").read_bytes(), n_threads=1)
    got = [
        [np.array(ts.ckks_vector_from(ctx, b).decrypt()) for b in row]
        for row in pickle.loads((work / "output.pkl").read_bytes())
    ]
    decrypt_s = time.perf_counter() - t0
    X = np.load(work / "X.npy")
    want = pack(X @ lw.W + lw.b, lw.lout, sched.groups)
    err = 0.0
    for grow, wrow in zip(got, want, strict=True):
        for g, w in zip(grow, wrow, strict=True):
            n = lw.q_valid * lw.lout.n_c  # computed copies; the rest of the declared vector must be zero
            ref = np.zeros(lw.lout.size)
            ref[:n] = w[:n]
            err = max(err, float(np.max(np.abs(g[: lw.lout.size] - ref))))
    return {"decrypt_s": decrypt_s, "max_abs_error": err}


ROLES = {"client-setup": client_setup, "server": server, "client-finish": client_finish}


def run_role(role: str, work: Path, path: str, d: int, T: int, layer: str) -> dict:
    """One party in its own process, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--role", role, "--work", str(work), "--path", path, "--d", str(d), "--T", str(T)]
    cmd += ["--layer", layer]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{role} ({path}, d={d}, T={T}, {layer}) failed:\n{proc.stderr[-3000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_s"] = time.perf_counter() - t0
    return rec


def measure(path: str, d: int, T: int, layer: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="pi_eval_scale_") as tmp:
        work = Path(tmp)
        setup = run_role("client-setup", work, path, d, T, layer)
        srv = run_role("server", work, path, d, T, layer)
        fin = run_role("client-finish", work, path, d, T, layer)
    lw = schedule(d, T).server_weights[layer]
    return {
        "path": path,
        "d": d,
        "T": T,
        "layer": layer,
        "shape": f"{lw.W.shape[0]}->{lw.W.shape[1]}",
        "chunks": [lw.lin.chunks, lw.lout.chunks],
        "groups": schedule(d, T).groups,
        "client": {
            **setup,
            "decrypt_s": fin["decrypt_s"],
            "process_s": setup["process_s"] + fin["process_s"],  # both client processes
        },
        "client_peak_rss_mb": max(setup["peak_rss_mb"], fin["peak_rss_mb"]),
        "server": srv,
        "server_peak_rss_mb": srv["peak_rss_mb"],
        "max_abs_error": fin["max_abs_error"],
    }


# ---------------------------------------------------------------------------------------------- recipe-shape keys
def recipe_keys() -> dict:
    """Public-context bytes for the CPU recipes' shape, with the Galois keys of every layer's product."""
    out = {}
    for label, kw in (("mlp+LayerNorm", {}), ("fused, LayerNorm-free", {"ffn": "fused", "ln": False, "ln_f": False})):
        sched = schedule(128, 128, n_layer=4, vocab=8192, **kw)
        layers = [
            DiagonalLinear.from_linear_weights(lw, PARAMS.slots, name=n) for n, lw in sched.server_weights.items()
        ]
        steps = galois_steps(layers)
        ctx = new_context()
        out[label] = {
            "galois_steps": list(steps),
            "public_context_bytes": len(public_context(ctx, steps)),
            "layers": {
                ly.name: {
                    "chunks": [ly.chunks_in, ly.chunks_out],
                    "baby_step": ly.plan.baby,
                    "rotations_per_group": ly.rotations(),
                    "products_per_group": ly.diagonal_count(),
                }
                for ly in layers
            },
        }
    ctx = new_context()
    no_galois = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)
    default = default_public(ctx)
    return {
        "params": PARAMS.name,
        "default_public_context_bytes": len(default),
        "default_galois_keys": ctx.galois_keys().data.size(),
        "public_context_without_galois_bytes": len(no_galois),
        "recipe_shape": "L=4, H=4, d=128, T=128, vocab 8192",
        "models": out,
    }


# ---------------------------------------------------------------------------------------------- report
def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def markdown(result: dict) -> str:
    lines = [
        f"# pi_eval linear layers: dense `mm` vs BSGS diagonal products ({result['date']})",
        "",
        f"Hardware: {result['hardware']} ({result['machine']}); 1 thread per party; parameters {result['params']}.",
        "Each party is its own process; times are wall seconds, memory is the process's peak RSS.",
        "`linear` = running the layer on every token group (BSGS: includes encoding its plaintexts);",
        "`weights` = server-side weight preparation before the online phase (dense: `ts.plain_tensor` per block).",
        "",
        "| d | T | layer | groups | path | weights s | linear s | server s | server RSS MB | client s | "
        "client RSS MB | public ctx MB | Galois keys | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s, c = r["server"], r["client"]
        lines.append(
            f"| {r['d']} | {r['T']} | {r['layer']} ({r['shape']}) | {r['groups']} | {r['path']} | "
            f"{s['weights_s']:.2f} | {s['linear_s']:.2f} | {s['process_s']:.1f} | {r['server_peak_rss_mb']:.0f} | "
            f"{c['process_s']:.1f} | {r['client_peak_rss_mb']:.0f} | "
            f"{c['public_context_bytes'] / 1e6:.1f} | {c['galois_keys']} | {r['max_abs_error']:.1e} |"
        )
    lines += ["", "Ratios dense / BSGS (same run):", ""]
    lines += [
        "| d | T | layer | linear | weights + linear | server process | server RSS | public ctx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for q in result["ratios"]:
        lines.append(
            f"| {q['d']} | {q['T']} | {q['layer']} | {q['linear']:.1f}x | {q['weights_plus_linear']:.1f}x | "
            f"{q['server_process']:.1f}x | {q['server_rss']:.1f}x | {q['public_context']:.1f}x |"
        )
    k = result["recipe_keys"]
    lines += [
        "",
        f"Public context at the recipe shape ({k['recipe_shape']}), {k['params']}: TenSEAL's default "
        f"{k['default_galois_keys']} power-of-two Galois keys give {k['default_public_context_bytes'] / 1e6:.1f} MB "
        f"({k['public_context_without_galois_bytes'] / 1e6:.2f} MB without Galois keys).",
        "",
    ]
    for label, m in k["models"].items():
        lines.append(
            f"- {label}: the BSGS products of all layers use steps {m['galois_steps']} -> "
            f"{m['public_context_bytes'] / 1e6:.2f} MB "
            f"({ratio(k['default_public_context_bytes'], m['public_context_bytes']):.1f}x smaller)."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x128,128x128", help="comma-separated d x T")
    parser.add_argument("--layers", default="L0.o_proj,L0.fc_in,L0.fc_out")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=("dense", "bsgs"), help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--T", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        rec = ROLES[args.role](Path(args.work), args.path, args.d, args.T, args.layer)
        rec["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(rec))
        return 0

    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    layers = args.layers.split(",")
    rows, ratios = [], []
    start = time.perf_counter()
    for d, T in shapes:
        for layer in layers:
            pair = {}
            for path in ("dense", "bsgs"):
                r = measure(path, d, T, layer)
                rows.append(r)
                pair[path] = r
                s = r["server"]
                print(
                    f"d={d:3d} T={T:3d} {layer:9s} {path:5s}: weights {s['weights_s']:7.2f} s  linear "
                    f"{s['linear_s']:7.2f} s  server RSS {r['server_peak_rss_mb']:6.0f} MB  public ctx "
                    f"{r['client']['public_context_bytes'] / 1e6:5.1f} MB  err {r['max_abs_error']:.1e}",
                    flush=True,
                )
            dn, bs = pair["dense"], pair["bsgs"]
            ratios.append(
                {
                    "d": d,
                    "T": T,
                    "layer": layer,
                    "linear": ratio(dn["server"]["linear_s"], bs["server"]["linear_s"]),
                    "weights_plus_linear": ratio(
                        dn["server"]["weights_s"] + dn["server"]["linear_s"],
                        bs["server"]["weights_s"] + bs["server"]["linear_s"],
                    ),
                    "server_process": ratio(dn["server"]["process_s"], bs["server"]["process_s"]),
                    "server_rss": ratio(dn["server_peak_rss_mb"], bs["server_peak_rss_mb"]),
                    "public_context": ratio(dn["client"]["public_context_bytes"], bs["client"]["public_context_bytes"]),
                }
            )
    keys = recipe_keys()
    date = dt.date.today().isoformat()
    result = {
        "date": date,
        "hardware": cpu_model(),
        "machine": MACHINE,
        "threads": 1,
        "params": PARAMS.name,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_scale.py " + " ".join(argv or sys.argv[1:]),
        "total_s": time.perf_counter() - start,
        "rows": rows,
        "ratios": ratios,
        "recipe_keys": keys,
    }
    out = Path(args.out)
    atomic_write_json(out / f"pi_eval_scale_{date}-cpu.json", result)
    atomic_write_text(out / f"pi_eval_scale_{date}-cpu.md", markdown(result))
    print(markdown(result))
    print(f"wrote {out / f'pi_eval_scale_{date}-cpu.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

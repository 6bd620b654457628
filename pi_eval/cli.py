"""``python -m pi_eval bench|project|plot``.

* ``bench``: one encrypted inference of a preset (or checkpoint), report to DIR;
* ``project``: the paper-scale 2PC cost projection (:mod:`pi_eval.projection`);
* ``plot``: bytes and latency of several reports, stacked by operation kind (:mod:`pi_eval.plot`).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from .params import DEFAULT_PARAM_SET, PARAM_SETS


def _modes(specs: list[str]) -> dict:
    out = {}
    for s in specs or []:
        k, _, v = s.partition("=")
        if not v:
            raise SystemExit(f"--mode expects KIND=MODE (e.g. gelu=C), got {s!r}")
        out[k] = v
    return out


def bench(args, tamper=None) -> int:
    from .extract import build_model, plan_from_model, torch_logits
    from .protocol import run_protocol
    from .report import build_report, parse_profile, write_report
    from .schedule import poly_act_override

    if args.checkpoint:
        from entropic.models import EntropicForCausalLM

        ckpt = Path(args.checkpoint)
        if not (ckpt / "config.json").is_file():
            raise FileNotFoundError(
                f"--checkpoint {args.checkpoint!r} is not a save_pretrained directory: "
                + ("it does not exist" if not ckpt.exists() else "it has no config.json")
            )
        model = EntropicForCausalLM.from_pretrained(ckpt).eval().double()
    else:
        model = build_model(
            args.preset,
            n_layer=args.n_layer,
            d_model=args.d_model,
            n_head=args.n_head,
            vocab_size=args.vocab_size,
            n_positions=max(args.seq_len, args.n_positions),
            seed=args.seed,
            init_std=args.init_std,
        )
    plan = plan_from_model(model, name=args.checkpoint or args.preset)
    ids = np.random.default_rng(args.seed).integers(0, plan.vocab_size, args.seq_len)
    ref = torch_logits(model, ids)
    res = run_protocol(
        plan,
        ids,
        params=args.params,
        modes=_modes(args.mode),
        allow_refresh=not args.no_refresh,
        poly_degree=args.poly_degree,
        transport=args.transport,
        threads=args.threads,
        tamper=tamper,
    )
    profiles = dict(parse_profile(p) for p in args.profile or [])
    meta = {
        "preset": args.preset,
        "checkpoint": args.checkpoint,
        "n_layer": len(plan.blocks),
        "d_model": plan.d_model,
        "n_head": plan.blocks[0].n_head if plan.blocks else None,
        "vocab_size": plan.vocab_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
    }
    override = poly_act_override(res.schedule)
    exact = None
    if override is not None:  # mode C: the protocol evaluates the model with its polynomials
        exact, ref = ref, plan.forward(ids, act_override=override)
        meta["reference"] = "plaintext model with the mode-C polynomials (vs_exact_model: the original model)"
    rep = build_report(res, ref, profiles=profiles, meta=meta, exact_logits=exact)
    if args.save_logits:  # written before report.json, whose presence marks a completed run
        from entropic.io import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, ids=ids, decrypted=res.logits, reference=ref, exact=ref if exact is None else exact)
        atomic_write_bytes(Path(args.out) / "logits.npz", buf.getvalue())
    js, _ = write_report(rep, args.out)
    summary = {
        k: rep[k]
        for k in (
            "bytes_up",
            "bytes_down",
            "round_trips",
            "setup_bytes",
            "max_abs_logit_error",
            "top1_agreement",
            "slot_use",
            "slot_use_bound",
            "harness_overhead",
        )
    }
    summary["wan_online_s"] = rep["latency"]["WAN"]["online_s"]
    summary["report"] = str(js)
    print(json.dumps(summary, indent=2))
    return 0


def project(args) -> int:
    from .projection import fit_cost_model
    from .projection import project as project_cost

    if args.profile != "WAN":
        raise ValueError(f"the projection is fitted to the paper's WAN only, got profile {args.profile!r}")
    model = fit_cost_model()
    proj = project_cost(
        args.preset,
        n_layer=args.n_layer,
        d_model=args.d_model,
        n_head=args.n_head,
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        n_positions=args.n_positions,
        attention=args.attention,
        ffn_layers=args.ffn_layers,
        model=model,
    )
    config = {
        k: getattr(args, k)
        for k in ("preset", "n_layer", "d_model", "n_head", "seq_len", "vocab_size", "attention", "ffn_layers")
    }
    out = {"profile": "WAN", "bandwidth_mbps": 100, "rtt_ms": 80, "config": config, **proj.to_dict()}
    fit_summary = model.error_summary()
    out["fit"] = fit_summary
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return 0
    print(f"{args.preset} L={args.n_layer} d={args.d_model} H={args.n_head} T={args.seq_len}, WAN 100 Mbps / 80 ms:")
    print(f"  communication {proj.comm_gb:.2f} GB, latency {proj.latency_min:.2f} min")
    for k in proj.comm_gb_by_kind:
        print(f"    {k:10s} {proj.comm_gb_by_kind[k]:8.3f} GB {proj.latency_min_by_kind[k]:7.3f} min")
    for name in ("fitted", "held_out"):
        f = fit_summary[name]
        print(
            f"  fit error, {name} rows ({', '.join(f['tables'])}): comm max {100 * f['max_abs_comm_rel_error']:.1f}%,"
            f" latency max {100 * f['max_abs_latency_rel_error']:.1f}%"
        )
    if args.show_fit:
        for r in fit_summary["rows"]:
            print(
                f"    {r['table']:22s} {r['paper_name']:20s} {'fit ' if r['fitted'] else 'held'} comm"
                f" {r['paper_comm_gb']:7.2f} -> {r['comm_gb']:7.2f} GB ({100 * r['comm_rel_error']:+.1f}%), latency"
                f" {r['paper_latency_min']:6.2f} -> {r['latency_min']:6.2f} min ({100 * r['latency_rel_error']:+.1f}%)"
            )
    return 0


def plot(args) -> int:
    from .plot import plot_reports

    reports = []
    for path in args.reports:
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read report {path!r}: {e}") from e
    out = plot_reports(reports, args.out, labels=args.label, profile=args.profile)
    print(str(out))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pi_eval", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="run one encrypted inference and write DIR/report.json and report.csv")
    b.add_argument("--preset", default="SM+LN+G")
    b.add_argument("--checkpoint", default=None, help="a save_pretrained directory instead of a random preset")
    b.add_argument("--n-layer", type=int, default=1)
    b.add_argument("--d-model", type=int, default=32)
    b.add_argument("--n-head", type=int, default=2)
    b.add_argument("--vocab-size", type=int, default=64)
    b.add_argument("--n-positions", type=int, default=16)
    b.add_argument("--seq-len", type=int, default=8)
    b.add_argument("--init-std", type=float, default=0.2, help="init std of the random preset model")
    b.add_argument("--transport", choices=["inprocess", "tcp"], default="inprocess")
    b.add_argument("--params", default=DEFAULT_PARAM_SET, choices=sorted(PARAM_SETS))
    b.add_argument("--mode", action="append", help="override, e.g. gelu=C or relu=A (repeatable)")
    b.add_argument("--no-refresh", action="store_true", help="forbid mode B; reject circuits that run out of levels")
    b.add_argument("--poly-degree", type=int, default=2)
    b.add_argument("--profile", action="append", help="extra network profile NAME:MBPS:RTT_MS")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    b.add_argument("--save-logits", action="store_true", help="also write DIR/logits.npz (ids, decrypted, reference)")
    p = sub.add_parser("project", help="projected 2PC cost at paper scale (BumbleBee, WAN 100 Mbps / 80 ms)")
    p.add_argument("--preset", default="SM+LN+G")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=52_000, help="default: the paper's CodeParrot tokenizer")
    p.add_argument("--n-positions", type=int, default=1024, help="the model's context length")
    p.add_argument("--attention", choices=["standard", "simplified"], default="standard")
    p.add_argument("--ffn-layers", type=int, default=None, help="blocks keeping their FFN (pruned _i variants)")
    p.add_argument("--profile", default="WAN", help="network profile; only the paper's WAN is fitted")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--show-fit", action="store_true", help="print the fit error of every paper row")
    g = sub.add_parser("plot", help="PNG of bytes and latency per report, stacked by operation kind")
    g.add_argument("reports", nargs="+", help="bench report.json or project --json output files")
    g.add_argument("--out", required=True, help="PNG path")
    g.add_argument("--label", action="append", help="bar label per report, in order (repeatable)")
    g.add_argument("--profile", default="WAN", help="network profile of the bench reports' latency")
    args = ap.parse_args(argv)
    return run(args)


def bench_parser_defaults(**kw) -> argparse.Namespace:
    """Namespace with the bench defaults (for programmatic use and tests)."""
    d = dict(
        preset="SM+LN+G",
        checkpoint=None,
        n_layer=1,
        d_model=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        seq_len=8,
        init_std=0.2,
        transport="inprocess",
        params=DEFAULT_PARAM_SET,
        mode=None,
        no_refresh=False,
        poly_degree=2,
        profile=None,
        threads=1,
        seed=0,
        out=None,
        save_logits=False,
        cmd="bench",
    )
    d.update(kw)
    return argparse.Namespace(**d)


def run(args) -> int:
    try:
        return {"bench": bench, "project": project, "plot": plot}[args.cmd](args)
    except Exception as e:
        print(f"pi_eval {args.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

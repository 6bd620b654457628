"""``python -m pi_eval bench ...``: one encrypted inference of a preset (or checkpoint), report to DIR."""

from __future__ import annotations

import argparse
import json
import sys

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

    if args.checkpoint:
        from entropic.models import EntropicForCausalLM

        model = EntropicForCausalLM.from_pretrained(args.checkpoint).eval().double()
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
        seed=args.seed,
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
    rep = build_report(res, ref, profiles=profiles, meta=meta)
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
            "harness_overhead",
        )
    }
    summary["wan_online_s"] = rep["latency"]["WAN"]["online_s"]
    summary["report"] = str(js)
    print(json.dumps(summary, indent=2))
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
        cmd="bench",
    )
    d.update(kw)
    return argparse.Namespace(**d)


def run(args) -> int:
    try:
        return bench(args)
    except Exception as e:
        print(f"pi_eval {args.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

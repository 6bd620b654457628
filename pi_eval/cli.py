"""``python -m pi_eval bench|serve|psk|relay|project|plot``.

* ``bench``: one encrypted inference of a preset (or checkpoint), report to DIR; several presets (``--preset A,B``)
  one after the other, each report in DIR/<preset>/; ``DIR/bench.json`` is rewritten atomically after every layer
  and architecture (:mod:`pi_eval.results`), so a stopped run leaves the finished part; with ``--connect
  HOST:PORT`` the client alone (its share of the model only) against a ``serve`` process;
* ``serve``: the server alone, with its own weights, one client per run (``--listen HOST:PORT``);
* ``psk``: write a fresh pre-shared key (32 random bytes, hex) for ``serve`` and ``bench --connect``;
* ``relay``: a user-space link emulator (rate + delay) between the two (:mod:`pi_eval.relay`);
* ``project``: the paper-scale 2PC cost projection (:mod:`pi_eval.projection`);
* ``plot``: bytes and latency of several reports, stacked by operation kind (:mod:`pi_eval.plot`).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .params import DEFAULT_PARAM_SET, PARAM_SETS
from .results import BenchResults, BenchSummary, stop_on_sigterm


def _modes(specs: list[str]) -> dict:
    out = {}
    for s in specs or []:
        k, _, v = s.partition("=")
        if not v:
            raise SystemExit(f"--mode expects KIND=MODE (e.g. gelu=C), got {s!r}")
        out[k] = v
    return out


def read_key(path: str) -> bytes:
    """A pre-shared key file: hex of at least 32 bytes (as ``python -m pi_eval psk`` writes it)."""
    from .channel import MIN_KEY_BYTES

    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise FileNotFoundError(f"--key-file {path!r} cannot be read: {e.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"--key-file {path!r} must hold a hex key (python -m pi_eval psk --out FILE)") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"--key-file {path!r} holds a {len(key)}-byte key; at least {MIN_KEY_BYTES} bytes are needed")
    return key


def _build_model(args):
    from .extract import build_model

    if args.checkpoint:
        from entropic.models import EntropicForCausalLM

        from .checkpoint import resolve_checkpoint

        return EntropicForCausalLM.from_pretrained(resolve_checkpoint(args.checkpoint)).eval().double()
    return build_model(
        args.preset,
        n_layer=args.n_layer,
        d_model=args.d_model,
        n_head=args.n_head,
        vocab_size=args.vocab_size,
        n_positions=max(args.seq_len, args.n_positions),
        seed=args.seed,
        init_std=args.init_std,
    )


def _plan(model, args):
    """The model's plan, named by the checkpoint or preset, with its architecture (preset name) in ``info``."""
    from .checkpoint import architecture_name
    from .extract import plan_from_model

    plan = plan_from_model(model, name=args.checkpoint or args.preset)
    plan.info["architecture"] = architecture_name(model.config)
    return plan


def _progress(line: str) -> None:
    print(f"pi_eval: {line}", file=sys.stderr, flush=True)


def _architectures(args) -> list[str]:
    """What one bench runs: each preset of ``--preset A,B,...``, or the one checkpoint / served model."""
    if getattr(args, "connect", None) or args.checkpoint:
        return [args.checkpoint or "served model"]
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    if not presets:
        raise ValueError("--preset names no preset")
    return presets


def _arch_dir(out: Path, preset: str, several: bool) -> Path:
    """One architecture's report directory: ``out`` itself, or ``out/<preset>`` when the bench runs several."""
    return out / re.sub(r"[^A-Za-z0-9+._-]", "_", preset) if several else out


def bench(args, tamper=None) -> int:
    """``bench``: one encrypted inference per architecture, each one's report written when it completes, and
    ``DIR/bench.json`` (:mod:`pi_eval.results`) rewritten atomically as the run goes (so a stopped run leaves it)."""
    archs = _architectures(args)
    results = BenchResults.in_dir(args.out, archs)

    def progress(line: str) -> None:
        _progress(line)
        results.progress(line)

    several = len(archs) > 1
    with stop_on_sigterm():
        try:
            for arch in archs:
                results.start(arch)
                one = argparse.Namespace(**{**vars(args), "preset": arch}) if several else args
                report, summary = _bench_one(one, _arch_dir(Path(args.out), arch, several), tamper, progress)
                results.finish(report, summary)
                print(json.dumps(asdict(summary), indent=2), flush=True)
        except BaseException as e:
            results.stop(e)
            raise
    results.done()
    return 0


def _bench_one(args, out: Path, tamper, progress) -> tuple[Path, BenchSummary]:
    """One architecture: run, report to ``out`` (report.json last), return (report path, printed summary)."""
    from .extract import torch_logits
    from .protocol import run_protocol, run_remote
    from .report import build_report, parse_profile, write_report
    from .schedule import poly_act_override

    connect = getattr(args, "connect", None)
    if connect:
        from .serve import parse_address
        from .share import ClientShare

        if not args.client_share or not args.key_file:
            raise ValueError("--connect needs --client-share FILE (from the server) and --key-file FILE")
        if args.checkpoint:
            raise ValueError("--connect runs the client only: the model (--checkpoint) stays with the server")
        host, port = parse_address(connect)
        share = ClientShare.load(args.client_share)
        ids = np.random.default_rng(args.seed).integers(0, share.vocab_size, args.seq_len)
        res = run_remote(
            share,
            ids,
            host,
            port,
            read_key(args.key_file),
            params=args.params,
            modes=_modes(args.mode),
            allow_refresh=not args.no_refresh,
            poly_degree=args.poly_degree,
            threads=args.threads,
            timeout=args.timeout,
            tamper=tamper,
            progress=progress,
        )
        model = ref = None
        arch = share.info.get("architecture")
        n_layer, d_model, vocab = len(share.blocks), share.wte.shape[1], share.vocab_size
        n_head = share.blocks[0]["n_head"] if share.blocks else None
        name = share.name
    else:
        model = _build_model(args)
        plan = _plan(model, args)
        arch = plan.info["architecture"]
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
            progress=progress,
        )
        n_layer, d_model, vocab = len(plan.blocks), plan.d_model, plan.vocab_size
        n_head = plan.blocks[0].n_head if plan.blocks else None
        name = plan.name
    profiles = dict(parse_profile(p) for p in args.profile or [])
    meta = {
        "preset": None if connect or args.checkpoint else args.preset,
        "architecture": arch,  # the preset whose architecture the model has (a checkpoint's own, not --preset)
        "checkpoint": args.checkpoint,
        "model": name,
        "n_layer": n_layer,
        "d_model": d_model,
        "n_head": n_head,
        "vocab_size": vocab,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "connect": connect,
    }
    if connect:
        meta["reference"] = "none: the client holds no model weights (compare logits.npz with the model owner's)"
    override = poly_act_override(res.schedule)
    exact = None
    if override is not None and ref is not None:  # mode C: the protocol evaluates the model with its polynomials
        exact, ref = ref, plan.forward(ids, act_override=override)
        meta["reference"] = "plaintext model with the mode-C polynomials (vs_exact_model: the original model)"
    rep = build_report(res, ref, profiles=profiles, meta=meta, exact_logits=exact)
    if args.save_logits:  # written before report.json, whose presence marks a completed run
        from entropic.io import atomic_write_bytes

        buf = io.BytesIO()
        refs = {} if ref is None else {"reference": ref, "exact": ref if exact is None else exact}
        np.savez(buf, ids=ids, decrypted=res.logits, **refs)
        atomic_write_bytes(out / "logits.npz", buf.getvalue())
    js, _ = write_report(rep, out)
    summary = BenchSummary.from_report(rep, js)
    return js, summary


def serve(args) -> int:
    from .serve import ServeConfig, listen, parse_address
    from .serve import serve as serve_tcp
    from .server import Server
    from .share import ClientShare

    key = read_key(args.key_file)
    host, port = parse_address(args.listen)
    cfg = ServeConfig(args.timeout, args.handshake_timeout, args.accept_timeout, args.max_attempts)
    plan = _plan(_build_model(args), args)
    if args.client_share:
        ClientShare.from_plan(plan).save(args.client_share)
    lsock = listen(host, port)
    h, p = lsock.getsockname()[:2]
    print(json.dumps({"listening": f"{h}:{p}", "params": args.params, "client_share": args.client_share}), flush=True)
    srv = serve_tcp(lsock, lambda: Server(plan, args.params, threads=args.threads, key=key), cfg)
    ok = srv is not None and srv.done and not srv.aborted
    if args.stats_out and srv is not None:
        from entropic.io import atomic_write_text

        atomic_write_text(Path(args.stats_out), json.dumps(srv.stats().to_dict(), indent=2, default=float))
    print(json.dumps({"served": ok, "aborted": None if srv is None else srv.aborted}), flush=True)
    return 0 if ok else 1


def psk(args) -> int:
    import os
    import secrets

    from entropic.io import atomic_write_text

    out = atomic_write_text(Path(args.out), secrets.token_hex(32) + "\n")
    os.chmod(out, 0o600)
    print(str(out))
    return 0


def relay(args) -> int:
    from .relay import LinkProfile, run_relay
    from .serve import parse_address

    run_relay(
        parse_address(args.listen),
        parse_address(args.connect),
        LinkProfile(args.mbps * 1e6 if args.mbps > 0 else None, args.rtt_ms * 1e-3),
        max_connections=args.max_connections,
        idle_timeout=args.timeout,
    )
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
    b = sub.add_parser(
        "bench", help="encrypted inference per architecture: DIR/report.json and report.csv, DIR/bench.json as it goes"
    )
    _model_args(b)
    b.add_argument("--transport", choices=["inprocess", "tcp"], default="inprocess")
    b.add_argument("--connect", default=None, metavar="HOST:PORT", help="run the client only, against `serve`")
    b.add_argument("--client-share", default=None, help="with --connect: the share file the server wrote")
    b.add_argument("--key-file", default=None, help="with --connect: the pre-shared key (python -m pi_eval psk)")
    b.add_argument("--timeout", type=float, default=600.0, help="with --connect: seconds to wait for each reply")
    b.add_argument("--mode", action="append", help="override, e.g. gelu=C or relu=A (repeatable)")
    b.add_argument("--no-refresh", action="store_true", help="forbid mode B; reject circuits that run out of levels")
    b.add_argument("--poly-degree", type=int, default=2)
    b.add_argument("--profile", action="append", help="extra network profile NAME:MBPS:RTT_MS")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--out", required=True)
    b.add_argument("--save-logits", action="store_true", help="also write DIR/logits.npz (ids, decrypted, reference)")
    sv = sub.add_parser("serve", help="serve one client with this model's weights (pre-shared key required)")
    sv.add_argument("--listen", required=True, metavar="HOST:PORT", help="port 0: chosen by the system, printed")
    _model_args(sv)
    sv.add_argument("--key-file", required=True, help="pre-shared key file (python -m pi_eval psk --out FILE)")
    sv.add_argument("--client-share", default=None, help="write the client's share of the model here first")
    sv.add_argument("--threads", type=int, default=1)
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds allowed between frames (client compute)")
    sv.add_argument("--handshake-timeout", type=float, default=10.0, help="seconds from connection to hello")
    sv.add_argument("--accept-timeout", type=float, default=600.0, help="seconds to wait for each connection")
    sv.add_argument("--max-attempts", type=int, default=5, help="connections refused at the hello before exiting")
    sv.add_argument("--stats-out", default=None, help="write the server's own stats (JSON) here at the end")
    k = sub.add_parser("psk", help="write a fresh pre-shared key (32 bytes from secrets, hex, mode 0600)")
    k.add_argument("--out", required=True)
    r = sub.add_parser("relay", help="emulated link (rate + delay) between a client and a server")
    r.add_argument("--listen", required=True, metavar="HOST:PORT")
    r.add_argument("--connect", required=True, metavar="HOST:PORT")
    r.add_argument("--mbps", type=float, required=True, help="bandwidth per direction, Mbit/s (0: delay only)")
    r.add_argument("--rtt-ms", type=float, required=True, help="round-trip time added, ms")
    r.add_argument("--max-connections", type=int, default=1, help="exit after relaying this many connections")
    r.add_argument("--timeout", type=float, default=900.0, help="exit if idle this long, seconds")
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


def _model_args(b: argparse.ArgumentParser) -> None:
    """The model (a preset's random model or a checkpoint), the parameter set and the request's sequence length."""
    b.add_argument(
        "--preset",
        default="SM+LN+G",
        help="a preset's random model; bench: several comma-separated, one report each in DIR/<preset>/",
    )
    b.add_argument(
        "--checkpoint",
        default=None,
        help="instead of a random preset: a save_pretrained directory, an `entropic fit` run directory (its model/, "
        "exported from checkpoints/last.ckpt if missing) or that last.ckpt",
    )
    b.add_argument("--n-layer", type=int, default=1)
    b.add_argument("--d-model", type=int, default=32)
    b.add_argument("--n-head", type=int, default=2)
    b.add_argument("--vocab-size", type=int, default=64)
    b.add_argument("--n-positions", type=int, default=16)
    b.add_argument("--seq-len", type=int, default=8)
    b.add_argument("--init-std", type=float, default=0.2, help="init std of the random preset model")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--params", default=DEFAULT_PARAM_SET, choices=sorted(PARAM_SETS))


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
        connect=None,
        client_share=None,
        key_file=None,
        timeout=600.0,
        cmd="bench",
    )
    d.update(kw)
    return argparse.Namespace(**d)


def run(args) -> int:
    try:
        cmds = {"bench": bench, "serve": serve, "psk": psk, "relay": relay, "project": project, "plot": plot}
        return cmds[args.cmd](args)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM during a bench (pi_eval.results.BenchStopped)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"pi_eval {args.cmd} stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        print(f"pi_eval {args.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

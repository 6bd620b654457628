"""Per-run report: setup bytes apart, per-operation rows, totals, modelled latency, correctness; atomic JSON/CSV."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from entropic.io import atomic_write_text

from .rss import peak_rss_bytes
from .slots import run_slot_use, step_count

# name -> (bandwidth in bit/s, round-trip time in s)
NETWORK_PROFILES = {"LAN": (3e9, 0.8e-3), "WAN": (100e6, 80e-3)}

ROW_FIELDS = [
    "layer",
    "name",
    "kind",
    "mode",
    "cts_up",
    "cts_down",
    "bytes_up",
    "bytes_down",
    "round_trips",
    "level_in",
    "level_out",
    "levels_used",
    "server_s",
    "client_s",
    "he_s",
    "rotations",
    "plaintext_products",
    "slot_use",
    "slot_use_bound",
]


def parse_profile(spec: str) -> tuple[str, tuple[float, float]]:
    """'NAME:MBPS:RTT_MS', e.g. 'mywan:200:40'."""
    try:
        name, mbps, rtt = spec.split(":")
        return name, (float(mbps) * 1e6, float(rtt) * 1e-3)
    except ValueError as e:
        raise ValueError(f"network profile {spec!r} must be NAME:MBPS:RTT_MS, e.g. WAN2:200:40") from e


def modelled_latency(bytes_total: int, round_trips: int, compute_s: float, bw_bps: float, rtt_s: float) -> float:
    return compute_s + round_trips * rtt_s + bytes_total * 8.0 / bw_bps


def _setup_comparison(res) -> dict:
    """The public context sent (Galois keys for the schedule's rotation steps only) against the same context with
    TenSEAL's default power-of-two Galois keys, which pi_eval sent before (measured on a copy, not sent)."""
    steps = res.client.galois_steps
    sent = res.channel.setup.bytes_up
    ref = res.client.power_of_two_context_bytes()
    return {
        "galois_keys": None if steps is None else len(steps),
        "galois_steps": None if steps is None else list(steps),
        "power_of_two_context_bytes": ref,
        "public_context_vs_power_of_two": sent / ref,
        "public_context_note": (
            f"the public context carries Galois keys for the {len(steps or ())} rotation steps the schedule's linear "
            f"layers use; with TenSEAL's default power-of-two keys it would be {ref / 1e6:.1f} MB "
            f"(measured here on a copy of the context), {sent / 1e6:.1f} MB sent"
        ),
    }


def _peak_rss(res) -> dict:
    """Peak resident memory of each party's process so far (bytes; :func:`pi_eval.rss.peak_rss_bytes`)."""
    same = res.transport == "inprocess"
    client = peak_rss_bytes()
    return {
        "client_bytes": client,
        "server_bytes": client if same else res.server_stats.get("peak_rss_bytes"),
        "same_process": same,
        "note": "one process ran both parties: both values are its peak"
        if same
        else "each party's own process (the server reports its value in its stats)",
    }


def build_report(
    res,
    reference_logits: np.ndarray | None,
    *,
    profiles: dict | None = None,
    meta: dict | None = None,
    exact_logits: np.ndarray | None = None,
) -> dict:
    """Report of one run.  ``reference_logits``: the plaintext model the protocol evaluates (with the mode-C
    polynomials, if any; None when the reporting party holds no model); ``exact_logits``: the original model, to
    report what the polynomials cost in accuracy."""
    peak_rss = _peak_rss(res)  # before the setup comparison below generates its reference keys
    sched, chan = res.schedule, res.channel
    profiles = {**NETWORK_PROFILES, **(profiles or {})}
    srv = res.server_stats["steps"]
    cli = res.client.step_stats
    rows = []
    for st in sched.steps:
        c = chan.online.get(st.name)
        s = srv.get(st.name, {})
        k = cli.get(st.name, {})
        sc = step_count(st, sched)
        lvl_used = None
        if st.level_in is not None and st.level_out is not None and st.mode in ("HE", "C"):
            lvl_used = st.level_in - st.level_out
        rows.append(
            {
                "layer": st.layer,
                "name": st.name,
                "kind": st.kind,
                "mode": st.mode,
                "cts_up": c.cts_up if c else 0,
                "cts_down": c.cts_down if c else 0,
                "bytes_up": c.bytes_up if c else 0,
                "bytes_down": c.bytes_down if c else 0,
                "round_trips": c.round_trips if c else 0,
                "level_in": st.level_in,
                "level_out": st.level_out,
                "levels_used": lvl_used,
                "server_s": s.get("server_s", 0.0),
                "client_s": k.get("client_s", 0.0),
                "he_s": s.get("he_s", 0.0) + k.get("he_s", 0.0),
                "rotations": s.get("rotations", 0),
                "plaintext_products": s.get("plaintext_products", 0),
                "slot_use": sc.use(sched.params.slots) if sc else None,
                "slot_use_bound": sc.bound(sched.params.slots) if sc else None,
            }
        )
    tot = chan.totals()
    by_kind: dict[str, dict] = {}
    for r in rows:
        kk = by_kind.setdefault(
            r["kind"], {"bytes_up": 0, "bytes_down": 0, "round_trips": 0, "server_s": 0.0, "client_s": 0.0, "modes": []}
        )
        for f in ("bytes_up", "bytes_down", "round_trips", "server_s", "client_s"):
            kk[f] += r[f]
        if r["mode"] not in kk["modes"]:
            kk["modes"].append(r["mode"])
    compute = sum(r["server_s"] + r["client_s"] for r in rows)
    he_total = res.server_stats["he_s"] + res.client.he
    online_bytes = tot["bytes_up"] + tot["bytes_down"]
    setup_bytes = chan.setup.bytes_up + chan.setup.bytes_down
    latency = {
        name: {
            "bandwidth_bps": bw,
            "rtt_s": rtt,
            "online_s": modelled_latency(online_bytes, tot["round_trips"], compute, bw, rtt),
            "comm_s": modelled_latency(online_bytes, tot["round_trips"], 0.0, bw, rtt),
            "setup_s": modelled_latency(setup_bytes, 1, 0.0, bw, rtt),
            "by_kind_comm_s": {
                k: modelled_latency(v["bytes_up"] + v["bytes_down"], v["round_trips"], 0.0, bw, rtt)
                for k, v in by_kind.items()
            },
        }
        for name, (bw, rtt) in profiles.items()
    }
    ref = reference_logits
    err = None if ref is None else np.abs(res.logits - ref)
    return {
        "meta": meta or {},
        "transport": res.transport,
        "params": sched.params.describe(),
        "seq_len": sched.seq_len,
        "tokens_per_group": sched.g,
        "groups": sched.groups,
        "modes": sched.modes,
        "bytes_up": tot["bytes_up"],
        "bytes_down": tot["bytes_down"],
        "bytes_total": online_bytes,
        "round_trips": tot["round_trips"],
        "ciphertexts_up": tot["cts_up"],
        "ciphertexts_down": tot["cts_down"],
        "setup_bytes": setup_bytes,
        "setup": {
            "public_context_bytes_up": chan.setup.bytes_up,
            "ack_bytes_down": chan.setup.bytes_down,
            "client_keygen_s": res.client.keygen_s,
            **res.server_stats.get("setup", {}),
            **_setup_comparison(res),
        },
        "peak_rss": peak_rss,
        "control_bytes": chan.control.bytes_up + chan.control.bytes_down,
        "wire_bytes_all": chan.wire_bytes(),
        # None when the reporting party holds no plaintext model (the client of ``bench --connect``)
        "max_abs_logit_error": None if ref is None else float(err.max()),
        "top1_agreement": None if ref is None else float(np.mean(res.logits.argmax(-1) == ref.argmax(-1))),
        "top1_last_token_equal": None if ref is None else bool(res.logits[-1].argmax() == ref[-1].argmax()),
        "vs_exact_model": None
        if exact_logits is None
        else {
            "max_abs_logit_diff": float(np.abs(res.logits - exact_logits).max()),
            "top1_agreement": float(np.mean(res.logits.argmax(-1) == exact_logits.argmax(-1))),
        },
        "compute_s": compute,
        "he_primitive_s": he_total,
        "online_wall_s": res.online_wall_s,
        # measured by the client: hello + public context, and input sent -> logits decrypted (no setup)
        "measured_setup_wall_s": res.client.timing.get("setup_wall_s"),
        "measured_online_wall_s": res.client.timing.get("online_wall_s"),
        "harness_overhead": res.online_wall_s / he_total if he_total > 0 else None,
        **run_slot_use(sched),
        "latency": latency,
        "by_kind": by_kind,
        "server_holds_secret_key": res.server_stats["holds_secret_key"],
        "server_context_is_private": res.server_stats["context_is_private"],
        "authenticated": res.server_stats.get("authenticated"),
        "comm_wall_s": res.channel.comm_time,
        "operations": rows,
    }


def write_report(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir)
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=ROW_FIELDS)
    wr.writeheader()
    for r in report["operations"]:
        wr.writerow({k: r.get(k) for k in ROW_FIELDS})
    js = json.dumps(report, indent=2, default=float)
    atomic_write_text(out / "report.csv", buf.getvalue())
    atomic_write_text(out / "report.json", js)  # written last: its presence means the run completed
    return out / "report.json", out / "report.csv"

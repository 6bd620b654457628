"""Per-run report: setup bytes apart, per-operation rows, totals, modelled latency, correctness; atomic JSON/CSV."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from entropic.io import atomic_write_text

from .ops import Kind, Mode
from .rss import peak_rss_bytes
from .schedule import Step
from .slots import run_slot_use, step_count
from .stats import ClientStepStats, ServerStepStats

# name -> (bandwidth in bit/s, round-trip time in s)
NETWORK_PROFILES = {"LAN": (3e9, 0.8e-3), "WAN": (100e6, 80e-3)}


@dataclass
class OperationRow:
    """One schedule step in the report (and one row of report.csv)."""

    layer: int
    name: str
    kind: Kind
    mode: Mode
    cts_up: int
    cts_down: int
    bytes_up: int
    bytes_down: int
    round_trips: int
    level_in: int | None
    level_out: int | None
    levels_used: int | None  # levels an HE or mode-C step consumes
    server_s: float
    client_s: float
    he_s: float
    rotations: int
    plaintext_products: int
    slot_use: float | None
    slot_use_bound: float | None


ROW_FIELDS = [f.name for f in fields(OperationRow)]


@dataclass
class KindTotals:
    """Traffic and compute of all steps of one kind (``by_kind``)."""

    bytes_up: int = 0
    bytes_down: int = 0
    round_trips: int = 0
    server_s: float = 0.0
    client_s: float = 0.0
    modes: list[Mode] = field(default_factory=list)

    def add(self, row: OperationRow) -> None:
        self.bytes_up += row.bytes_up
        self.bytes_down += row.bytes_down
        self.round_trips += row.round_trips
        self.server_s += row.server_s
        self.client_s += row.client_s
        if row.mode not in self.modes:
            self.modes.append(row.mode)


@dataclass
class ModelledLatency:
    """Latency of the run on one network profile: compute + round trips x RTT + bytes x 8 / bandwidth."""

    bandwidth_bps: float
    rtt_s: float
    online_s: float
    comm_s: float
    setup_s: float
    by_kind_comm_s: dict[str, float]


@dataclass
class PeakRss:
    client_bytes: int
    server_bytes: int | None
    same_process: bool
    note: str


@dataclass
class SetupComparison:
    """The public context sent against the same context with TenSEAL's default power-of-two Galois keys."""

    galois_keys: int | None
    galois_steps: list[int] | None
    power_of_two_context_bytes: int
    public_context_vs_power_of_two: float
    public_context_note: str


def parse_profile(spec: str) -> tuple[str, tuple[float, float]]:
    """'NAME:MBPS:RTT_MS', e.g. 'mywan:200:40'."""
    try:
        name, mbps, rtt = spec.split(":")
        return name, (float(mbps) * 1e6, float(rtt) * 1e-3)
    except ValueError as e:
        raise ValueError(f"network profile {spec!r} must be NAME:MBPS:RTT_MS, e.g. WAN2:200:40") from e


def modelled_latency(bytes_total: int, round_trips: int, compute_s: float, bw_bps: float, rtt_s: float) -> float:
    return compute_s + round_trips * rtt_s + bytes_total * 8.0 / bw_bps


def _setup_comparison(res) -> SetupComparison:
    """The public context sent (Galois keys for the schedule's rotation steps only) against the same context with
    TenSEAL's default power-of-two Galois keys, which pi_eval sent before (measured on a copy, not sent)."""
    steps = res.client.galois_steps
    sent = res.channel.setup.bytes_up
    ref = res.client.power_of_two_context_bytes()
    return SetupComparison(
        galois_keys=None if steps is None else len(steps),
        galois_steps=None if steps is None else list(steps),
        power_of_two_context_bytes=ref,
        public_context_vs_power_of_two=sent / ref,
        public_context_note=(
            f"the public context carries Galois keys for the {len(steps or ())} rotation steps the schedule's linear "
            f"layers use; with TenSEAL's default power-of-two keys it would be {ref / 1e6:.1f} MB "
            f"(measured here on a copy of the context), {sent / 1e6:.1f} MB sent"
        ),
    )


def _peak_rss(res) -> PeakRss:
    """Peak resident memory of each party's process so far (bytes; :func:`pi_eval.rss.peak_rss_bytes`)."""
    same = res.transport == "inprocess"
    client = peak_rss_bytes()
    return PeakRss(
        client_bytes=client,
        server_bytes=client if same else res.server_stats.peak_rss_bytes,
        same_process=same,
        note="one process ran both parties: both values are its peak"
        if same
        else "each party's own process (the server reports its value in its stats)",
    )


def _operation_row(st: Step, res) -> OperationRow:
    sched = res.schedule
    c = res.channel.online.get(st.name)
    s = res.server_stats.steps.get(st.name, ServerStepStats())
    k = res.client.step_stats.get(st.name, ClientStepStats())
    sc = step_count(st, sched)
    levels_used = None
    if st.level_in is not None and st.level_out is not None and st.mode in (Mode.SERVER_HE, Mode.POLYNOMIAL):
        levels_used = st.level_in - st.level_out
    return OperationRow(
        layer=st.layer,
        name=st.name,
        kind=st.kind,
        mode=st.mode,
        cts_up=c.cts_up if c else 0,
        cts_down=c.cts_down if c else 0,
        bytes_up=c.bytes_up if c else 0,
        bytes_down=c.bytes_down if c else 0,
        round_trips=c.round_trips if c else 0,
        level_in=st.level_in,
        level_out=st.level_out,
        levels_used=levels_used,
        server_s=s.server_s,
        client_s=k.client_s,
        he_s=s.he_s + k.he_s,
        rotations=s.rotations,
        plaintext_products=s.plaintext_products,
        slot_use=sc.use(sched.params.slots) if sc else None,
        slot_use_bound=sc.bound(sched.params.slots) if sc else None,
    )


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
    sched, chan, srv = res.schedule, res.channel, res.server_stats
    profiles = {**NETWORK_PROFILES, **(profiles or {})}
    rows = [_operation_row(st, res) for st in sched.steps]
    tot = chan.totals()
    by_kind: dict[str, KindTotals] = {}
    for r in rows:
        by_kind.setdefault(r.kind, KindTotals()).add(r)
    compute = sum(r.server_s + r.client_s for r in rows)
    he_total = srv.he_s + res.client.he
    online_bytes = tot["bytes_up"] + tot["bytes_down"]
    setup_bytes = chan.setup.bytes_up + chan.setup.bytes_down
    latency = {
        name: ModelledLatency(
            bandwidth_bps=bw,
            rtt_s=rtt,
            online_s=modelled_latency(online_bytes, tot["round_trips"], compute, bw, rtt),
            comm_s=modelled_latency(online_bytes, tot["round_trips"], 0.0, bw, rtt),
            setup_s=modelled_latency(setup_bytes, 1, 0.0, bw, rtt),
            by_kind_comm_s={
                k: modelled_latency(v.bytes_up + v.bytes_down, v.round_trips, 0.0, bw, rtt) for k, v in by_kind.items()
            },
        )
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
            **asdict(srv.setup),
            **asdict(_setup_comparison(res)),
        },
        "peak_rss": asdict(peak_rss),
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
        **asdict(run_slot_use(sched)),
        "latency": {name: asdict(v) for name, v in latency.items()},
        "by_kind": {k: asdict(v) for k, v in by_kind.items()},
        "server_holds_secret_key": srv.holds_secret_key,
        "server_context_is_private": srv.context_is_private,
        "authenticated": srv.authenticated,
        "comm_wall_s": res.channel.comm_time,
        "operations": [asdict(r) for r in rows],
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

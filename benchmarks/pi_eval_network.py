"""Measured vs modelled online latency of pi_eval over an emulated link (issue #11, part 5).

Three processes per run: ``python -m pi_eval serve`` (the server, its own weights),
``python -m pi_eval relay`` (user-space link: rate + one-way delay RTT/2 per direction, :mod:`pi_eval.relay`) and
``python -m pi_eval bench --connect`` (the client, its share only), authenticated with a fresh pre-shared key.

* measured = the client's online wall time (input embedded and encrypted -> logits decrypted), over the relay;
  the setup (hello + public context, ~35 MB) is measured apart;
* modelled = compute + round trips x RTT + online bytes x 8 / bandwidth (``pi_eval/report.py``), with the compute
  measured in the same run (server + client time per step);
* ``direct``: the same run without the relay (loopback), for the harness's own overhead.

Two set-ups: by default the relay emulates rate and delay on loopback; with ``--netns`` (root) the server runs in one
network namespace and relay + client in another, the veth between them rate-shaped by the kernel (``tc tbf``) and
the relay adding only the delay (the kernel's ``netem`` is missing on these machines).  The relay terminates TCP, so
TCP slow start over the long path is not part of the measurement (see :mod:`pi_eval.relay`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_network.py --out benchmarks/results/pi_eval_network_2026-12-01-cpu
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_network.py --netns \
        --out benchmarks/results/pi_eval_network_netns_2026-12-01-cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from entropic.io import atomic_write_text  # noqa: E402

PROFILES = {"LAN": (3000.0, 0.8), "WAN": (100.0, 80.0)}  # Mbit/s, RTT ms: the report's profiles
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _first_json_line(proc: subprocess.Popen, what: str) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} did not start (exit code {proc.wait(timeout=30)})")
    return json.loads(line)


def _pi(*args: str) -> list[str]:
    return [sys.executable, "-m", "pi_eval", *args]


def run_one(tmp: Path, preset: str, shape: dict, profile: str | None, netns: bool = False) -> dict:
    """One inference over the link ``profile`` (None: direct, no relay); returns the client's report.

    ``netns``: server in namespace a, relay and client in namespace b, the veth between them rate-shaped by the
    kernel (``tc tbf`` at the profile's rate), the relay adding the delay only.  Otherwise all on loopback, the relay
    emulating rate and delay.
    """
    (tmp / "key").write_text(secrets.token_hex(32))
    model = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
    keys = ["--key-file", str(tmp / "key"), "--client-share", str(tmp / "share.npz")]
    with contextlib.ExitStack() as stack:
        ns = None
        if netns:
            from pi_eval.netns import veth_pair

            ns = stack.enter_context(veth_pair(PROFILES[profile][0] if profile else None))
        in_a, in_b = (ns.prefix(ns.a), ns.prefix(ns.b)) if ns else ([], [])
        host = ns.addr_a if ns else "127.0.0.1"
        procs: list[subprocess.Popen] = []
        stack.callback(lambda: [p.kill() for p in procs if p.poll() is None])

        def start(cmd: list[str], what: str) -> dict:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True))
            return _first_json_line(procs[-1], what)

        addr = start([*in_a, *_pi("serve", "--listen", f"{host}:0", f"--preset={preset}", *model, *keys)], "serve")
        addr = addr["listening"]
        if profile is not None:
            mbps, rtt = PROFILES[profile]
            relay = _pi("relay", "--listen", "127.0.0.1:0", "--connect", addr, "--rtt-ms", str(rtt), "--timeout", "300")
            addr = start([*in_b, *relay, "--mbps", "0" if ns else str(mbps)], "relay")["relay"]
        out = tmp / f"{preset}-{profile}"
        bench = subprocess.run(
            [*in_b, *_pi("bench", "--connect", addr, f"--seq-len={shape['seq_len']}", *keys, "--out", str(out))],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if bench.returncode != 0:
            raise RuntimeError(f"bench --connect failed: {bench.stderr[-2000:]}")
        for p in procs:
            p.wait(timeout=60)
        return json.loads((out / "report.json").read_text())


def calibrate(profile: str, sizes=(10, 1_000_000, 4_000_000)) -> list[dict]:
    """The relay alone: one request of ``n`` bytes and a 1-byte reply, measured vs RTT + n * 8 / rate."""
    import socket
    import threading

    ls = socket.create_server(("127.0.0.1", 0))

    def sink():
        c, _ = ls.accept()
        with c:
            while hdr := c.recv(8, socket.MSG_WAITALL):
                n, got = int.from_bytes(hdr, "big"), 0
                while got < n:
                    got += len(c.recv(min(1 << 20, n - got)))
                c.sendall(b"k")

    threading.Thread(target=sink, daemon=True).start()
    mbps, rtt = PROFILES[profile]
    relay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pi_eval",
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--connect",
            f"127.0.0.1:{ls.getsockname()[1]}",
            "--mbps",
            str(mbps),
            "--rtt-ms",
            str(rtt),
            "--timeout",
            "60",
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    out = []
    try:
        host, port = _first_json_line(relay, "relay")["relay"].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for n in sizes:
                t = time.perf_counter()
                s.sendall(n.to_bytes(8, "big") + bytes(n))
                s.recv(1)
                dt = time.perf_counter() - t
                model = rtt / 1e3 + (n + 9) * 8 / (mbps * 1e6)
                out.append({"profile": profile, "bytes": n, "measured_s": dt, "modelled_s": model, "ratio": dt / model})
        relay.wait(timeout=30)
    finally:
        if relay.poll() is None:
            relay.kill()
        ls.close()
    return out


def row(preset: str, profile: str, rep: dict, direct: dict) -> dict:
    lat = rep["latency"][profile]
    measured, modelled = rep["measured_online_wall_s"], lat["online_s"]
    return {
        "preset": preset,
        "profile": profile,
        "bandwidth_mbps": lat["bandwidth_bps"] / 1e6,
        "rtt_ms": lat["rtt_s"] * 1e3,
        "online_bytes": rep["bytes_total"],
        "round_trips": rep["round_trips"],
        "compute_s": rep["compute_s"],
        "measured_online_s": measured,
        "modelled_online_s": modelled,
        "ratio_measured_over_modelled": measured / modelled,
        "measured_comm_s": measured - rep["compute_s"],
        "modelled_comm_s": lat["comm_s"],
        "measured_setup_s": rep["measured_setup_wall_s"],
        "modelled_setup_s": lat["setup_s"],
        "direct_online_s": direct["measured_online_wall_s"],
        "direct_compute_s": direct["compute_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="path prefix; writes PREFIX.json and PREFIX.md")
    ap.add_argument("--presets", nargs="+", default=["SM+LN+G", "SM+ScFuFFN"])
    ap.add_argument("--netns", action="store_true", help="kernel tbf rate on a veth between namespaces + relay delay")
    args = ap.parse_args()
    shape = {"n_layer": 1, "d_model": 16, "n_head": 2, "vocab_size": 32, "n_positions": 16, "seq_len": 8}
    rows = []
    t0 = time.time()
    calib = [] if args.netns else [c for profile in PROFILES for c in calibrate(profile)]
    for c in calib:
        print(json.dumps(c), flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for preset in args.presets:
            direct = run_one(tmp, preset, shape, None)
            for profile in PROFILES:
                rows.append(row(preset, profile, run_one(tmp, preset, shape, profile, args.netns), direct))
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "date": "2026-12-01",
        "hardware": "2-core x86 VM, no GPU, loaded by other jobs (a training study on both cores); one thread per party",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_network.py --out " + args.out,
        "shape": shape,
        "params": "n8192-l2",
        "link": (
            "kernel: tc tbf at the profile's rate on both ends of a veth between two network namespaces (server in one,"
            " relay and client in the other); user-space relay (pi_eval/relay.py) for the delay only"
            if args.netns
            else "user-space relay (pi_eval/relay.py) for rate and delay, both directions, on loopback"
        )
        + "; TCP terminated at the relay",
        "transport": "serve / relay / bench --connect: three processes, HMAC-SHA256 authenticated",
        "direct": "the same run without the relay"
        + (" (loopback)" if not args.netns else " (loopback, no namespaces)"),
        "wall_s": time.time() - t0,
        "relay_calibration": calib,
        "rows": rows,
    }
    atomic_write_text(Path(args.out + ".json"), json.dumps(result, indent=2))
    lines = [
        "| preset | link | bytes | RTs | compute s | measured s | modelled s | measured/modelled | comm measured / modelled s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['profile']} ({r['bandwidth_mbps']:g} Mbps, {r['rtt_ms']:g} ms) | {r['online_bytes']:,}"
            f" | {r['round_trips']} | {r['compute_s']:.2f} | {r['measured_online_s']:.3f} | {r['modelled_online_s']:.3f}"
            f" | {r['ratio_measured_over_modelled']:.3f} | {r['measured_comm_s']:.3f} / {r['modelled_comm_s']:.3f} |"
        )
    if calib:
        lines += ["", "Relay alone (one request of n bytes, 1-byte reply; modelled = RTT + n * 8 / rate):", ""]
        lines += ["| link | bytes | measured ms | modelled ms | ratio |", "|---|---|---|---|---|"]
    for c in calib:
        lines.append(
            f"| {c['profile']} | {c['bytes']:,} | {1e3 * c['measured_s']:.2f} | {1e3 * c['modelled_s']:.2f}"
            f" | {c['ratio']:.2f} |"
        )
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Measured vs modelled online latency of pi_eval over an emulated link (issue #11, part 5).

Three processes per run, all on loopback: ``python -m pi_eval serve`` (the server, its own weights),
``python -m pi_eval relay`` (user-space link: rate + one-way delay RTT/2 per direction, :mod:`pi_eval.relay`) and
``python -m pi_eval bench --connect`` (the client, its share only), authenticated with a fresh pre-shared key.

* measured = the client's online wall time (input embedded and encrypted -> logits decrypted), over the relay;
  the setup (hello + public context, ~35 MB) is measured apart;
* modelled = compute + round trips x RTT + online bytes x 8 / bandwidth (``pi_eval/report.py``), with the compute
  measured in the same run (server + client time per step);
* ``direct``: the same run without the relay (loopback), for the harness's own overhead.

The link is emulated in user space for both rate and delay (the kernel's ``netem`` is missing on these machines;
``tc tbf`` in network namespaces could shape the rate but was not used here).  The relay terminates TCP, so TCP slow
start over the long path is not part of the measurement (see :mod:`pi_eval.relay`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_network.py --out benchmarks/results/pi_eval_network_2026-12-01-cpu
"""

from __future__ import annotations

import argparse
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


def run_one(tmp: Path, preset: str, shape: dict, profile: str | None) -> dict:
    """One inference over the link ``profile`` (None: direct loopback); returns the client's report."""
    (tmp / "key").write_text(secrets.token_hex(32))
    model = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pi_eval",
            "serve",
            "--listen",
            "127.0.0.1:0",
            f"--preset={preset}",
            *model,
            "--key-file",
            str(tmp / "key"),
            "--client-share",
            str(tmp / "share.npz"),
            "--accept-timeout",
            "300",
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs = [serve]
    try:
        addr = _first_json_line(serve, "serve")["listening"]
        if profile is not None:
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
                    addr,
                    "--mbps",
                    str(mbps),
                    "--rtt-ms",
                    str(rtt),
                    "--timeout",
                    "300",
                ],
                cwd=REPO,
                env=ENV,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(relay)
            addr = _first_json_line(relay, "relay")["relay"]
        out = tmp / f"{preset}-{profile}"
        bench = subprocess.run(
            [
                sys.executable,
                "-m",
                "pi_eval",
                "bench",
                "--connect",
                addr,
                f"--seq-len={shape['seq_len']}",
                "--client-share",
                str(tmp / "share.npz"),
                "--key-file",
                str(tmp / "key"),
                "--out",
                str(out),
            ],
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
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


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
    args = ap.parse_args()
    shape = {"n_layer": 1, "d_model": 16, "n_head": 2, "vocab_size": 32, "n_positions": 16, "seq_len": 8}
    rows = []
    t0 = time.time()
    calib = [c for profile in PROFILES for c in calibrate(profile)]
    for c in calib:
        print(json.dumps(c), flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for preset in args.presets:
            direct = run_one(tmp, preset, shape, None)
            for profile in PROFILES:
                rows.append(row(preset, profile, run_one(tmp, preset, shape, profile), direct))
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "date": "2026-12-01",
        "hardware": "2-core x86 VM, no GPU, loaded by other jobs (a training study on both cores); one thread per party",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_network.py --out " + args.out,
        "shape": shape,
        "params": "n8192-l2",
        "link": "user-space relay (pi_eval/relay.py) for rate and delay, both directions; TCP terminated at the relay",
        "transport": "serve / relay / bench --connect: three processes on loopback, HMAC-SHA256 authenticated",
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

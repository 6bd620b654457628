"""pi_eval channel hardening: bad input on the wire, authentication, one client per run, two processes.

Frame-level tests use no encryption (the hello stage needs none); one test builds a key set for the garbage-ciphertext
case, one runs ``serve`` and ``bench --connect`` as two processes and compares counts with the in-process run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pi_eval.channel import (
    HELLO_LIMIT,
    MAGIC,
    VERSION,
    AuthenticationError,
    Channel,
    CorruptedMessageError,
    FrameCodec,
    FrameTooLargeError,
    InProcessTransport,
    MalformedMessageError,
    Message,
    RemoteError,
    TcpTransport,
    TruncatedMessageError,
    read_frame,
)
from pi_eval.extract import build_model, plan_from_model
from pi_eval.params import get_param_set
from pi_eval.schedule import compile_schedule
from pi_eval.server import Server
from pi_eval.share import ClientShare, schedule_digests

REPO = Path(__file__).resolve().parent.parent
MODEL = dict(n_layer=1, d_model=16, n_head=2, vocab_size=32, n_positions=16, init_std=0.2)
CLI_MODEL = ["--n-layer", "1", "--d-model", "16", "--n-head", "2", "--vocab-size", "32", "--n-positions", "16"]
T = 8
PARAMS = get_param_set("n8192-l2")
REQUEST = {"params": PARAMS.name, "seq_len": T, "modes": {}, "allow_refresh": True, "poly_degree": 2}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def plan():
    return plan_from_model(build_model("SM+R", **MODEL))


@pytest.fixture(scope="module")
def digests(plan):
    return schedule_digests(compile_schedule(ClientShare.from_plan(plan).skeleton(), PARAMS, T))


# ------------------------------------------------------------------------------------------------ frames, no socket
def test_checksum_frames_say_corrupted_and_keyed_frames_authenticate():
    c, s = FrameCodec("client"), FrameCodec("server")
    frame = c.seal(Message("data", "x", {"a": 1}, [b"abc", b"defg"]))
    m = s.open(frame)
    assert (m.kind, m.label, m.meta, m.blobs) == ("data", "x", {"a": 1}, [b"abc", b"defg"])
    bad = bytearray(c.seal(Message("data", "y", {}, [b"xyz"])))
    bad[-1] ^= 1
    with pytest.raises(CorruptedMessageError, match=r"corrupted in transit.*does not authenticate"):
        s.open(bytes(bad))
    with pytest.raises(TruncatedMessageError, match="truncated"):
        s.open(frame[:-2])
    with pytest.raises(MalformedMessageError, match="not a pi_eval frame"):
        s.open(b"XXXX" + frame[4:])

    key = secrets.token_bytes(32)
    c, s = FrameCodec("client", key), FrameCodec("server", key)
    f0, f1 = c.seal(Message("data", "a")), c.seal(Message("data", "b"))
    with pytest.raises(AuthenticationError, match="reordered"):  # frame 1 where frame 0 is expected
        s.open(f1)
    assert s.open(f0).label == "a"
    with pytest.raises(AuthenticationError):  # replay of frame 0
        s.open(f0)
    with pytest.raises(AuthenticationError):  # a frame reflected back to its sender
        c.open(f1)
    with pytest.raises(AuthenticationError, match="does not hold the same key"):
        FrameCodec("server", secrets.token_bytes(32)).open(FrameCodec("client", key).seal(Message("hello", "h")))
    with pytest.raises(ValueError, match="at least 32"):
        FrameCodec("client", b"short key")


def test_malformed_body_and_oversized_frame_refused_before_reading():
    c, s = FrameCodec("client"), FrameCodec("server")
    s.recv_limit = 100
    with pytest.raises(FrameTooLargeError, match="above the 100-byte limit"):
        s.open(c.seal(Message("data", "x", {}, [bytes(200)])))
    head = struct.pack(">4sBQ", MAGIC, VERSION, 5)
    body = struct.pack(">I", 1) + b"{"  # meta that is not JSON, under a valid checksum
    frame = head + FrameCodec("client")._tag("C", 0, head, body) + body
    with pytest.raises(MalformedMessageError, match="not UTF-8 JSON"):
        FrameCodec("server").open(frame)


# ------------------------------------------------------------------------------------------------ in-process server
def _inprocess(plan, key=None, client_key=None):
    srv = Server(plan, PARAMS, key=key)
    return srv, Channel(InProcessTransport(srv.handle), client_key if client_key is not None else key)


def test_schedule_mismatch_refused_naming_the_step(plan, digests):
    other = plan_from_model(build_model("SM+R", **{**MODEL, "n_head": 4}))
    theirs = schedule_digests(compile_schedule(ClientShare.from_plan(other).skeleton(), PARAMS, T))
    srv, chan = _inprocess(plan)
    with pytest.raises(RemoteError, match=r"\[schedule_mismatch\].*'L0.attn'"):
        chan.handshake(REQUEST, theirs)
    assert srv.weights == {} and srv.ctx is None
    srv, chan = _inprocess(plan)
    with pytest.raises(RemoteError, match=r"\[protocol\].*'n8192-l4' requested; this server serves 'n8192-l2'"):
        chan.handshake({**REQUEST, "params": "n8192-l4"}, digests)
    srv, chan = _inprocess(plan)
    with pytest.raises(RemoteError, match=r"\[refused\].*seq_len=99"):
        chan.handshake({**REQUEST, "seq_len": 99}, digests)


def test_garbage_context_refused_and_no_traceback_sent(plan, digests):
    srv, chan = _inprocess(plan, key=secrets.token_bytes(32))
    chan.handshake(REQUEST, digests)
    with pytest.raises(RemoteError, match=r"\[bad_payload\]: setup: the public context does not parse") as ei:
        chan.exchange(Message("setup", "setup", {}, [secrets.token_bytes(4096)]), bucket="setup")
    assert "Traceback" not in str(ei.value) and ".py" not in str(ei.value)
    assert srv.ctx is None and srv.aborted.startswith("[bad_payload]")
    with pytest.raises(RemoteError, match=r"\[protocol\]: server already refused"):
        chan.exchange(Message("data", "input", {}, [b"x"]))


@pytest.mark.tenseal
def test_garbage_ciphertext_refused(plan, digests):
    from pi_eval.client import Client

    srv, chan = _inprocess(plan, key=secrets.token_bytes(32))
    chan.handshake(REQUEST, digests)
    chan.exchange(
        Message("setup", "setup", {}, [Client(PARAMS, plan.wte, plan.wpe).public_context(srv.galois_steps)]),
        bucket="setup",
    )
    with pytest.raises(RemoteError, match=r"\[protocol\]: input: expected 1 ciphertexts, got 2"):
        chan.exchange(Message("data", "input", {}, [b"a", b"b"]))
    srv, chan = _inprocess(plan, key=secrets.token_bytes(32))
    chan.handshake(REQUEST, digests)
    chan.exchange(
        Message("setup", "setup", {}, [Client(PARAMS, plan.wte, plan.wpe).public_context(srv.galois_steps)]),
        bucket="setup",
    )
    with pytest.raises(RemoteError, match=r"\[bad_payload\]: input: ciphertext 0 does not parse"):
        chan.exchange(Message("data", "input", {}, [secrets.token_bytes(300_000)]))
    assert srv.holds_secret_key() is False and srv.pc == 0


@pytest.mark.tenseal
def test_context_without_a_scheduled_galois_key_refused(plan, digests):
    from pi_eval.client import Client
    from pi_eval.diagonal import schedule_galois_steps
    from pi_eval.limits import setup_limit

    srv, chan = _inprocess(plan, key=secrets.token_bytes(32))
    chan.handshake(REQUEST, digests)
    # the client derives the server's rotation steps from its share alone (layouts and weight shapes)
    assert srv.galois_steps == schedule_galois_steps(
        compile_schedule(ClientShare.from_plan(plan).skeleton(), PARAMS, T)
    )
    assert srv.codec.recv_limit == setup_limit(PARAMS, len(srv.galois_steps)) < setup_limit(PARAMS)
    short = Client(PARAMS, plan.wte, plan.wpe).public_context(srv.galois_steps[1:])
    with pytest.raises(
        RemoteError, match=rf"\[bad_payload\]: public context lacks Galois keys .* \[{srv.galois_steps[0]}\]"
    ):
        chan.exchange(Message("setup", "setup", {}, [short]), bucket="setup")
    assert srv.ctx is None and srv.bsgs is None


# ------------------------------------------------------------------------------------------------ one server process
def _start_serve(tmp: Path, *extra: str) -> tuple[subprocess.Popen, tuple[str, int], bytes, Path]:
    key = secrets.token_bytes(32)
    (tmp / "key").write_text(key.hex())
    err = tmp / "serve.err"
    cmd = [sys.executable, "-m", "pi_eval", "serve", "--listen", "127.0.0.1:0", "--preset", "SM+R", *CLI_MODEL]
    cmd += ["--key-file", str(tmp / "key"), "--client-share", str(tmp / "share.npz"), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=err.open("w"), text=True)
    line = proc.stdout.readline()  # the server prints its address once listening (the share is written before)
    if not line:
        proc.wait(timeout=30)
        raise AssertionError(f"serve did not start: {err.read_text()[-2000:]}")
    host, port = json.loads(line)["listening"].rsplit(":", 1)
    return proc, (host, int(port)), key, err


def _peak_rss_kb(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def _error_frame(sock: socket.socket, key: bytes | None, seq: int = 0) -> Message:
    """The server's reply on a raw connection, checked with the pre-shared key."""
    frame = read_frame(sock, limit=1 << 20, timeout=10, who="peer")
    assert frame is not None, "the server closed without an error frame"
    codec = FrameCodec("client", key)
    codec.recv_seq = seq
    return codec.open(frame)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    proc, addr, key, err = _start_serve(tmp, "--handshake-timeout", "1", "--timeout", "5", "--max-attempts", "20")
    yield {"proc": proc, "addr": addr, "key": key, "err": err, "share": tmp / "share.npz"}
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def _connect(addr) -> socket.socket:
    return socket.create_connection(addr, timeout=10)


def test_oversized_length_prefix_refused_from_the_header(served):
    with _connect(served["addr"]) as s:
        s.sendall(struct.pack(">4sBQ", MAGIC, VERSION, 1 << 40) + bytes(32))
        reply = _error_frame(s, served["key"])
    assert reply.kind == "error" and reply.meta["code"] == "too_large"
    assert f"above the {HELLO_LIMIT}-byte limit for the hello" in reply.meta["error"]
    assert "nothing of it was read" in served["err"].read_text()


def test_streaming_garbage_keeps_server_memory_bounded(served):
    pid = served["proc"].pid
    before = _peak_rss_kb(pid)
    sent, chunk = 0, os.urandom(1 << 20)
    with _connect(served["addr"]) as s:  # a header announcing the largest allowed hello, then 256 MiB of garbage
        s.sendall(struct.pack(">4sBQ", MAGIC, VERSION, HELLO_LIMIT) + bytes(32))
        with pytest.raises(OSError):  # the server stops reading: the stream is cut well before 256 MiB
            for _ in range(256):
                s.sendall(chunk)
                sent += len(chunk)
    assert sent < 64 << 20, sent
    assert served["proc"].poll() is None
    grown = _peak_rss_kb(pid) - before
    assert grown < 3 * HELLO_LIMIT // 1024 + 16 * 1024, f"server peak RSS grew by {grown} kB"
    with _connect(served["addr"]) as s:  # random bytes from the start: refused at the magic
        s.sendall(os.urandom(4096))
        assert _error_frame(s, served["key"]).meta["code"] == "malformed"


def test_idle_peer_dropped_within_the_timeout(served):
    with _connect(served["addr"]) as s:
        t0 = time.monotonic()
        s.sendall(b"PIEV")  # a partial header, then silence
        reply = _error_frame(s, served["key"])
        dt = time.monotonic() - t0
    assert reply.meta["code"] == "timeout" and "within 1 s" in reply.meta["error"]
    assert 0.9 < dt < 5, dt


def test_truncated_frame_refused(served, digests):
    frame = FrameCodec("client", served["key"]).seal(Message("hello", "hello", {"x": "y" * 1000}))
    with _connect(served["addr"]) as s:
        s.sendall(frame[: len(frame) // 2])
        s.shutdown(socket.SHUT_WR)
        reply = _error_frame(s, served["key"])
    assert reply.meta["code"] == "truncated" and "header announces" in reply.meta["error"]


@pytest.mark.parametrize("who", ["wrong key", "no key"])
def test_wrong_or_missing_key_refused(served, digests, who):
    key = secrets.token_bytes(32) if who == "wrong key" else None
    chan = Channel(TcpTransport(*served["addr"], timeout=10), key)
    err = AuthenticationError if key else CorruptedMessageError  # the server's reply does not verify either
    with pytest.raises(err):
        chan.handshake(REQUEST, digests)
    chan.close()
    time.sleep(0.2)
    assert "[auth] server: frame 0 failed HMAC-SHA256 authentication" in served["err"].read_text()
    assert served["proc"].poll() is None  # still waiting for the right client


def test_second_connection_refused_while_serving(served, digests):
    """Runs last on this server: the right client is accepted (hello), then a second connection gets 'busy'."""
    chan = Channel(TcpTransport(*served["addr"], timeout=10), served["key"])
    ack = chan.handshake(REQUEST, digests)
    assert ack["params"] == PARAMS.name
    second = Channel(TcpTransport(*served["addr"], timeout=10), served["key"])
    with pytest.raises(RemoteError, match=r"\[busy\]: this server serves one client per run"):
        second.handshake(REQUEST, digests)
    second.close()
    chan.close()  # the accepted client leaves: single-shot, the server exits
    assert served["proc"].wait(timeout=30) == 1
    log = served["err"].read_text()
    assert "refused a second connection" in log and "Traceback" not in log


# ------------------------------------------------------------------------------------------------ two processes
@pytest.mark.tenseal
@pytest.mark.slow
def test_serve_and_connect_two_processes_same_counts_as_inprocess(tmp_path, plan):
    from pi_eval.protocol import run_protocol
    from pi_eval.report import build_report

    proc, (host, port), _, err = _start_serve(tmp_path, "--stats-out", str(tmp_path / "server.json"))
    try:
        out = tmp_path / "run"
        cmd = [sys.executable, "-m", "pi_eval", "bench", "--connect", f"{host}:{port}", "--seq-len", str(T)]
        cmd += ["--client-share", str(tmp_path / "share.npz"), "--key-file", str(tmp_path / "key")]
        cmd += ["--out", str(out), "--save-logits"]
        r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert proc.wait(timeout=60) == 0, err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    rep = json.loads((out / "report.json").read_text())
    ids = np.random.default_rng(0).integers(0, plan.vocab_size, T)  # what bench --connect draws from --seed 0
    res = run_protocol(plan, ids)
    ref = build_report(res, None)
    assert rep["transport"] == "connect" and ref["transport"] == "inprocess"
    for k in ("round_trips", "ciphertexts_up", "ciphertexts_down", "slot_use"):
        assert rep[k] == ref[k], k
    assert [(o["name"], o["cts_up"], o["cts_down"], o["round_trips"]) for o in rep["operations"]] == [
        (o["name"], o["cts_up"], o["cts_down"], o["round_trips"]) for o in ref["operations"]
    ]
    for k in ("bytes_up", "bytes_down", "setup_bytes"):  # SEAL's zstd of random ciphertexts, see pi_eval/README.md
        assert abs(rep[k] - ref[k]) <= 2e-3 * ref[k], (k, rep[k], ref[k])
    assert rep["max_abs_logit_error"] is None and rep["authenticated"] is True
    z = np.load(out / "logits.npz")
    assert np.abs(z["decrypted"] - res.logits).max() < 1e-3 and set(z.files) == {"ids", "decrypted"}
    seen = json.loads((tmp_path / "server.json").read_text())  # the server process's own account
    assert seen["holds_secret_key"] is False and seen["authenticated"] is True
    assert seen["received"][:3] == ["hello:hello", "setup:setup", "data:input"]
    control_up = seen["bytes_in"] - rep["bytes_up"] - rep["setup"]["public_context_bytes_up"]
    assert 0 < control_up < 1000  # the bytes the server saw are the ones the client counted, plus the stats request


@pytest.mark.tenseal
@pytest.mark.slow
def test_serve_and_connect_across_network_namespaces(tmp_path, plan):
    """Server in one network namespace, client in another, over a veth pair the test creates (and removes)."""
    from pi_eval.netns import unavailable, veth_pair

    why = unavailable()
    if why:
        pytest.skip(f"cannot create network namespaces here: {why}")
    (tmp_path / "key").write_text(secrets.token_hex(32))
    keys = ["--key-file", str(tmp_path / "key"), "--client-share", str(tmp_path / "share.npz")]
    with veth_pair() as ns:
        serve = [*ns.prefix(ns.a), sys.executable, "-m", "pi_eval", "serve", "--listen", f"{ns.addr_a}:0"]
        proc = subprocess.Popen(
            [*serve, "--preset", "SM+R", *CLI_MODEL, *keys], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True
        )
        try:
            addr = json.loads(proc.stdout.readline())["listening"]
            assert addr.startswith(ns.addr_a)
            with socket.socket() as s:  # the server's address is not reachable from this (the root) namespace
                s.settimeout(1)
                assert s.connect_ex((ns.addr_a, int(addr.rsplit(":", 1)[1]))) != 0
            bench = [*ns.prefix(ns.b), sys.executable, "-m", "pi_eval", "bench", "--connect", addr, *keys]
            r = subprocess.run(
                [*bench, "--seq-len", str(T), "--out", str(tmp_path / "run")],
                cwd=REPO,
                env=ENV,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert r.returncode == 0, r.stderr[-3000:]
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    sched = compile_schedule(ClientShare.from_plan(plan).skeleton(), PARAMS, T)
    assert rep["round_trips"] == 1 + sum(st.op in ("client", "refresh") for st in sched.steps)
    assert rep["authenticated"] is True and rep["server_holds_secret_key"] is False


def test_relay_adds_delay_and_limits_rate():
    """The link emulator (no encryption): a 10-byte and a 1 MB request over 100 Mbit/s and 80 ms RTT."""
    import threading

    ls = socket.create_server(("127.0.0.1", 0))

    def sink():
        c, _ = ls.accept()
        with c:
            while hdr := c.recv(8, socket.MSG_WAITALL):
                c.recv(int.from_bytes(hdr, "big"), socket.MSG_WAITALL)
                c.sendall(b"k")

    threading.Thread(target=sink, daemon=True).start()
    cmd = [sys.executable, "-m", "pi_eval", "relay", "--listen", "127.0.0.1:0", "--connect"]
    cmd += [f"127.0.0.1:{ls.getsockname()[1]}", "--mbps", "100", "--rtt-ms", "80", "--timeout", "30"]
    relay = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        host, port = json.loads(relay.stdout.readline())["relay"].rsplit(":", 1)
        times = {}
        with socket.create_connection((host, int(port)), timeout=10) as s:
            for n in (10, 1_000_000):
                t0 = time.perf_counter()
                s.sendall(n.to_bytes(8, "big") + bytes(n))
                assert s.recv(1) == b"k"
                times[n] = time.perf_counter() - t0
        assert json.loads(relay.stdout.readline())["relay_done"]["bytes_up"] == 1_000_026
    finally:
        if relay.poll() is None:
            relay.kill()
        ls.close()
    assert 0.079 < times[10] < 0.5, times  # one RTT
    assert 0.159 < times[1_000_000] < 1.0, times  # RTT + 8 Mbit / 100 Mbit/s

"""The server: plaintext weights plus a *public* TenSEAL context (public, relinearization and Galois keys).

It never holds a secret key: the context it receives is checked (``is_private()`` False, ``has_secret_key()``
False) and a context that carries one is refused.  It is a frame handler: each uplink frame yields exactly one
downlink frame, so the same object serves the in-process and the TCP transport.
"""

from __future__ import annotations

import socket
import time
import traceback

import tenseal as ts

from .channel import ChannelError, Message, recv_frame
from .rawpoly import RawCKKS
from .refresh import MaskSpec, ServerMasker
from .schedule import Schedule


class ServerSecurityError(RuntimeError):
    pass


class _Timer:
    def __init__(self):
        self.he = 0.0

    def he_call(self, f, *a):
        t0 = time.perf_counter()
        r = f(*a)
        self.he += time.perf_counter() - t0
        return r


class Server:
    def __init__(self, schedule: Schedule, *, threads: int = 1):
        self.sched = schedule
        self.threads = threads
        self.ctx: ts.Context | None = None
        self.masker: ServerMasker | None = None  # mode B (hiding refresh), built once the public context is known
        self.regs: dict[str, list[list]] = {}
        self.pc = 0
        self.done = False
        self.aborted: str | None = None
        self.step_stats: dict[str, dict] = {}
        self.received: list[str] = []  # kinds/labels of every frame received (for the TCP key audit)
        self.t = _Timer()
        self.bytes_in = self.bytes_out = 0  # as seen by the server (the stats reply itself excluded)
        self.setup_stats: dict = {}
        # plaintext weights, encoded once (server-side setup, not traffic)
        t0 = time.perf_counter()
        self.weights = {
            name: ({k: ts.plain_tensor(M) for k, M in lw.matrices()}, [b.tolist() for b in lw.biases()])
            for name, lw in schedule.server_weights.items()
        }
        self.setup_stats["weight_encode_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ key audit
    def holds_secret_key(self) -> bool:
        return self.ctx is not None and (self.ctx.is_private() or self.ctx.has_secret_key())

    # ------------------------------------------------------------------ frame handling
    def handle(self, frame: bytes) -> bytes:
        self.bytes_in += len(frame)
        reply = self._handle(frame)
        self.bytes_out += len(reply)
        return reply

    def _handle(self, frame: bytes) -> bytes:
        try:
            msg = Message.decode(frame, receiver="server")
            self.received.append(f"{msg.kind}:{msg.label}")
            return self._dispatch(msg).encode()
        except Exception as e:  # report to the client, then stop serving
            self.aborted = f"{type(e).__name__}: {e}"
            if not isinstance(e, (ChannelError, ServerSecurityError, ValueError)):
                self.aborted += "\n" + traceback.format_exc(limit=3)
            return Message("error", "error", {"error": self.aborted}).encode()

    def _dispatch(self, msg: Message) -> Message:
        if self.aborted:
            raise RuntimeError(f"server already aborted: {self.aborted}")
        if msg.kind == "setup":
            return self._setup(msg)
        if msg.kind == "stats":
            return Message("stats", "stats", self.stats())
        if msg.kind != "data":
            raise ValueError(f"unexpected message kind {msg.kind!r}")
        if self.ctx is None:
            raise ValueError("data received before the public context")
        return self._on_data(msg)

    def _setup(self, msg: Message) -> Message:
        t0 = time.perf_counter()
        ctx = self.t.he_call(ts.context_from, msg.blobs[0], self.threads)
        if ctx.is_private() or ctx.has_secret_key():
            raise ServerSecurityError("server refuses a context that contains a secret key; send a public context")
        if not ctx.has_galois_keys() or not ctx.has_relin_keys():
            raise ValueError("public context lacks Galois or relinearization keys")
        n = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
        if n != self.sched.params.poly_modulus_degree:
            raise ValueError(f"context N={n} does not match the schedule's parameter set {self.sched.params.name}")
        self.ctx = ctx
        assert not self.holds_secret_key()
        if any(st.op == "refresh" for st in self.sched.steps):
            raw = self.t.he_call(RawCKKS, self.sched.params, ctx)
            self.masker = ServerMasker(raw, 2.0**self.sched.params.scale_bits)
        self.setup_stats["context_load_s"] = time.perf_counter() - t0
        return Message("setup_ack", "setup", {"server_has_secret_key": self.holds_secret_key()})

    def _stat(self, name: str) -> dict:
        return self.step_stats.setdefault(name, {"server_s": 0.0, "he_s": 0.0, "mm_calls": 0, "diagonals": 0})

    def _load(self, st, blobs: list[bytes], layout) -> list[list]:
        per = layout.chunks
        expect = self.sched.groups * per
        if len(blobs) != expect:
            raise ValueError(f"{st.name}: expected {expect} ciphertexts, got {len(blobs)}")
        return [
            [self.t.he_call(ts.ckks_vector_from, self.ctx, blobs[j * per + c]) for c in range(per)]
            for j in range(self.sched.groups)
        ]

    def _on_data(self, msg: Message) -> Message:
        steps = self.sched.steps
        st = steps[self.pc]
        if msg.label != st.name:
            raise ValueError(f"out-of-order message: got {msg.label!r}, expected {st.name!r}")
        t0, h0 = time.perf_counter(), self.t.he
        rec = self._stat(st.name)
        blobs = msg.blobs
        if st.op == "refresh":  # remove the mask from the client's fresh ciphertexts
            if len(blobs) != self.sched.groups * st.dst_layout.chunks:
                raise ValueError(
                    f"{st.name}: expected {self.sched.groups * st.dst_layout.chunks} ciphertexts, got {len(blobs)}"
                )
            blobs = self.t.he_call(self.masker.unmask, st.name, blobs)
        self.regs[st.dst] = self._load(st, blobs, st.dst_layout)
        rec["server_s"] += time.perf_counter() - t0
        rec["he_s"] += self.t.he - h0
        self.pc += 1
        return self._run_until_client()

    def _run_until_client(self) -> Message:
        steps = self.sched.steps
        while True:
            st = steps[self.pc]
            t0, h0 = time.perf_counter(), self.t.he
            rec = self._stat(st.name)
            if st.op == "linear":
                self._linear(st, rec)
            elif st.op == "poly":
                self.regs[st.dst] = [
                    [self.t.he_call(ct.polyval, st.fn["coeffs"]) for ct in grp] for grp in self.regs[st.src]
                ]
            elif st.op == "skip":
                pass
            elif st.op in ("client", "refresh", "output"):
                src = self.regs[st.src]
                blobs = [self.t.he_call(ct.serialize) for grp in src for ct in grp]
                if st.op == "refresh":  # every coefficient masked, see pi_eval/refresh.py
                    spec = MaskSpec(st.fn["value_bound"], st.fn["sigma"])
                    blobs = self.t.he_call(self.masker.mask, st.name, blobs, spec)
                rec["server_s"] += time.perf_counter() - t0
                rec["he_s"] += self.t.he - h0
                if st.op == "output":
                    self.done = True
                    return Message("result", st.name, {}, blobs)
                return Message("data", st.name, {}, blobs)
            else:
                raise ValueError(f"unknown step op {st.op!r}")
            rec["server_s"] += time.perf_counter() - t0
            rec["he_s"] += self.t.he - h0
            self.pc += 1

    def _linear(self, st, rec):
        mats, biases = self.weights[st.name]
        src = self.regs[st.src]
        res = self.regs[st.residual] if st.residual else None
        out = []
        for j, grp in enumerate(src):
            row = []
            for co in range(st.dst_layout.chunks):
                acc = None
                for ci, ct in enumerate(grp):
                    pt = mats.get((ci, co))
                    if pt is None:
                        continue
                    r = self.t.he_call(ct.mm, pt)
                    rec["mm_calls"] += 1
                    acc = r if acc is None else self.t.he_call(acc.__add__, r)
                if acc is None:
                    raise ValueError(f"{st.name}: output chunk {co} has no non-zero weights")
                acc = self.t.he_call(acc.__add__, biases[co])
                if res is not None:
                    acc = self.t.he_call(acc.__add__, res[j][co])
                row.append(acc)
            out.append(row)
        self.regs[st.dst] = out

    def stats(self) -> dict:
        return {
            "steps": self.step_stats,
            "he_s": self.t.he,
            "setup": self.setup_stats,
            "holds_secret_key": self.holds_secret_key(),
            "context_is_private": bool(self.ctx.is_private()) if self.ctx is not None else None,
            "received": self.received,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "aborted": self.aborted,
        }


# ---------------------------------------------------------------------------------------------- TCP server process
def serve_tcp(schedule: Schedule, threads: int, port_queue) -> None:
    """Entry point of the server process (multiprocessing spawn): listen on 127.0.0.1, serve one client."""
    srv = Server(schedule, threads=threads)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port_queue.put(lsock.getsockname()[1])
    lsock.settimeout(600)
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            try:
                frame = recv_frame(conn, "server")
            except ChannelError as e:
                srv.aborted = f"{type(e).__name__}: {e}"
                conn.sendall(Message("error", "error", {"error": srv.aborted}).encode())
                break
            if not frame:
                break
            conn.sendall(srv.handle(frame))
            if srv.aborted:
                break
    finally:
        conn.close()
        lsock.close()

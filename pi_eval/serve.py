"""TCP serving of one client per run (``python -m pi_eval serve`` and the local spawn transport).

* Every read is bounded in size (the server's current frame limit, checked from the header) and in time: the hello
  must arrive within ``handshake_timeout`` of the connection, every later frame within ``idle_timeout``.
* A connection refused at the hello (wrong key, garbage, oversized, idle, schedule mismatch) is answered with an
  error frame, logged, and closed; the server then waits for the next connection, at most ``max_attempts`` times.
* Once a client is accepted, any other connection gets a ``busy`` error frame and is closed.
* The server exits after the accepted session ends (single-shot), successfully or not.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .channel import ChannelError, FrameCodec, error_message, read_frame, send_and_close
from .server import Server


@dataclass(frozen=True)
class ServeConfig:
    idle_timeout: float = 300.0  # seconds between frames once the client is accepted (its own compute included)
    handshake_timeout: float = 10.0  # seconds from the connection to a complete hello
    accept_timeout: float = 600.0  # seconds to wait for each connection
    max_attempts: int = 5  # connections refused at the hello before the server gives up

    def __post_init__(self):
        for k in ("idle_timeout", "handshake_timeout", "accept_timeout"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0 seconds, got {getattr(self, k)}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


def parse_address(spec: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); port 0 lets the system choose (servers only)."""
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {spec!r} must be HOST:PORT with PORT in [0, 65535], e.g. 127.0.0.1:7000")
    return host.strip("[]"), int(port)


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(8)
    return s


def _log(text: str) -> None:
    print(f"pi_eval serve: {text}", file=sys.stderr, flush=True)


class _BusyResponder(threading.Thread):
    """While a session runs, answers every other connection with a ``busy`` error frame."""

    def __init__(self, lsock: socket.socket, key: bytes | None, log: Callable[[str], None]):
        super().__init__(daemon=True)
        self.lsock, self.key, self.log = lsock, key, log
        self.stop = threading.Event()
        self.refused = 0

    def run(self) -> None:
        self.lsock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, addr = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.refused += 1
            self.log(f"refused a second connection from {addr[0]}:{addr[1]} (busy)")
            frame = FrameCodec("server", self.key).seal(
                error_message("busy", "this server serves one client per run and is serving another one")
            )
            send_and_close(conn, frame, drain_s=0.5)


def _session(conn: socket.socket, srv: Server, cfg: ServeConfig, lsock, log) -> _BusyResponder | None:
    """Serve one connection until it closes or fails; returns the busy responder if the client was accepted."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    busy = None
    try:
        while True:
            timeout = cfg.idle_timeout if srv.peer_accepted else cfg.handshake_timeout
            try:
                frame = read_frame(
                    conn, limit=srv.codec.recv_limit, timeout=timeout, who="server", phase=srv.codec.phase
                )
            except ChannelError as e:
                log(f"refused: {e}")
                send_and_close(conn, srv.refuse(e))
                return busy
            if frame is None:
                return busy
            reply = srv.handle(frame)
            if srv.peer_accepted and busy is None:
                busy = _BusyResponder(lsock, srv.codec.psk, log)
                busy.start()
            if srv.aborted:
                log(f"refused: {srv.aborted}")
                send_and_close(conn, reply)
                return busy
            try:
                conn.sendall(reply)
            except OSError as e:
                log(f"client connection lost: {e}")
                return busy
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def serve(
    lsock: socket.socket, make_server: Callable[[], Server], cfg: ServeConfig = ServeConfig(), log=_log
) -> Server | None:
    """Accept connections until one client is accepted and served; returns its server (None: nobody was accepted)."""
    try:
        for attempt in range(1, cfg.max_attempts + 1):
            lsock.settimeout(cfg.accept_timeout)
            try:
                conn, addr = lsock.accept()
            except TimeoutError:
                log(f"no client within {cfg.accept_timeout:g} s; giving up")
                return None
            log(f"connection {attempt} from {addr[0]}:{addr[1]}")
            srv = make_server()
            t0 = time.perf_counter()
            busy = _session(conn, srv, cfg, lsock, log)
            if busy is not None:  # the client was accepted: single-shot, this was the run
                busy.stop.set()
                busy.join(timeout=5)
                state = "completed" if srv.done and not srv.aborted else f"ended early ({srv.aborted or 'closed'})"
                log(f"session {state} after {time.perf_counter() - t0:.2f} s")
                return srv
        log(f"{cfg.max_attempts} connections refused at the hello; giving up")
        return None
    finally:
        with contextlib.suppress(OSError):
            lsock.close()


def serve_spawned(plan, params, threads: int, key: bytes, cfg: ServeConfig, port_queue) -> None:
    """Entry point of the local spawn transport's server process: 127.0.0.1, a system-chosen port."""
    lsock = listen("127.0.0.1", 0)
    port_queue.put(lsock.getsockname()[1])
    serve(lsock, lambda: Server(plan, params, threads=threads, key=key), cfg)

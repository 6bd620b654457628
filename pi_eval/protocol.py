"""Run one encrypted inference end to end (client + server over a counted channel).

* :func:`run_protocol`: both parties from one :class:`~pi_eval.plan.ModelPlan`, in-process or with the server in a
  spawned local process over TCP (authenticated with a fresh random key); for tests and benchmarks.
* :func:`run_remote`: the client alone, holding only its :class:`~pi_eval.share.ClientShare`, against a server
  started with ``python -m pi_eval serve`` (``bench --connect``).

All three run the same protocol (hello, public context, data frames), so counts are equal.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .channel import Channel, InProcessTransport, Message, Tamper, TcpTransport
from .client import Client
from .params import DEFAULT_PARAM_SET, ParamSet, get_param_set
from .plan import ModelPlan
from .schedule import Schedule, compile_schedule
from .serve import ServeConfig, serve_spawned
from .server import Server
from .share import ClientShare
from .stats import ServerStats


@dataclass
class RunResult:
    schedule: Schedule
    logits: np.ndarray
    channel: Channel
    client: Client
    server_stats: ServerStats  # the server's own account (from its stats reply)
    wall_s: float
    online_wall_s: float
    transport: str
    server: Server | None = None  # only for the in-process transport


def _server_port(q, proc, timeout_s: float = 300.0) -> int:
    """The TCP server's port; fails at once if its process dies during start-up instead of waiting out the timeout."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            return q.get(timeout=0.5)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"the TCP server process exited during start-up (exit code {proc.exitcode})"
                ) from None
    proc.kill()
    raise TimeoutError(f"the TCP server process did not start listening within {timeout_s:.0f} s")


def _request(params: ParamSet, seq_len: int, modes: dict | None, allow_refresh: bool, poly_degree: int) -> dict:
    return {
        "params": params.name,
        "seq_len": int(seq_len),
        "modes": dict(modes or {}),
        "allow_refresh": bool(allow_refresh),
        "poly_degree": int(poly_degree),
    }


def _client(
    params: ParamSet, wte, wpe, threads: int, client: Client | None, progress: Callable[[str], None] | None
) -> Client:
    if client is None:
        client = Client(params, wte, wpe, threads=threads)
    elif client.params != params:
        raise ValueError("the reused client was built for another parameter set")
    client.he, client.step_stats, client.progress = 0.0, {}, progress
    return client


def _run_client(client, chan, sched, ids, request) -> tuple[np.ndarray, ServerStats, float]:
    """One inference, then the server's own stats (control bucket): (logits, server stats, client wall time)."""
    t_online = time.perf_counter()
    logits = client.run(chan, sched, ids, request)
    online = time.perf_counter() - t_online
    stats = chan.exchange(Message("stats", "stats"), bucket="control").meta
    return logits, ServerStats.from_dict(stats), online


def run_protocol(
    plan: ModelPlan,
    ids,
    *,
    params: str | ParamSet = DEFAULT_PARAM_SET,
    modes: dict | None = None,
    allow_refresh: bool = True,
    poly_degree: int = 2,
    transport: str = "inprocess",
    threads: int = 1,
    tamper: Tamper | None = None,
    client: Client | None = None,
    key: bytes | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """``transport``: 'inprocess' (unkeyed checksum unless ``key``) or 'tcp' (spawned server, random key);
    ``progress``: called with one line per layer the client reaches."""
    params = get_param_set(params)
    ids = np.asarray(ids)
    # the level budget is checked here, before any key or ciphertext exists
    sched = compile_schedule(plan, params, len(ids), modes, allow_refresh=allow_refresh, poly_degree=poly_degree)
    request = _request(params, len(ids), modes, allow_refresh, poly_degree)
    client = _client(params, plan.wte, plan.wpe, threads, client, progress)
    t_start = time.perf_counter()
    proc = None
    server = None
    if transport == "inprocess":
        server = Server(plan, params, threads=threads, key=key)
        tr = InProcessTransport(server.handle, tamper)
    elif transport == "tcp":
        key = key or secrets.token_bytes(32)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=serve_spawned, args=(plan, params, threads, key, ServeConfig(), q), daemon=True)
        proc.start()
        port = _server_port(q, proc)
        tr = TcpTransport("127.0.0.1", port, tamper)
    else:
        raise ValueError(f"unknown transport {transport!r}; use 'inprocess' or 'tcp'")
    chan = Channel(tr, key)
    try:
        logits, stats, online = _run_client(client, chan, sched, ids, request)
    finally:
        chan.close()
        if proc is not None:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    wall = time.perf_counter() - t_start
    return RunResult(sched, logits, chan, client, stats, wall, online, transport, server)


def run_remote(
    share: ClientShare,
    ids,
    host: str,
    port: int,
    key: bytes,
    *,
    params: str | ParamSet = DEFAULT_PARAM_SET,
    modes: dict | None = None,
    allow_refresh: bool = True,
    poly_degree: int = 2,
    threads: int = 1,
    timeout: float = 600.0,
    tamper: Tamper | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """The client of ``bench --connect``: its share only (embeddings, mode-A parameters), the server elsewhere."""
    if key is None:
        raise ValueError("a remote run needs the pre-shared key (--key-file)")
    params = get_param_set(params)
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= share.vocab_size):
        raise ValueError(f"token ids must be in [0, {share.vocab_size}), got [{ids.min()}, {ids.max()}]")
    sched = compile_schedule(
        share.skeleton(), params, len(ids), modes, allow_refresh=allow_refresh, poly_degree=poly_degree
    )
    request = _request(params, len(ids), modes, allow_refresh, poly_degree)
    client = _client(params, share.wte, share.wpe, threads, None, progress)
    t_start = time.perf_counter()
    chan = Channel(TcpTransport(host, port, tamper, timeout=timeout), key)
    try:
        logits, stats, online = _run_client(client, chan, sched, ids, request)
    finally:
        chan.close()
    return RunResult(sched, logits, chan, client, stats, time.perf_counter() - t_start, online, "connect")

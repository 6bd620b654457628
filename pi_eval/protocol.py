"""Run one encrypted inference end to end (client + server over a counted channel)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass

import numpy as np

from .channel import Channel, InProcessTransport, Message, Tamper, TcpTransport
from .client import Client
from .params import DEFAULT_PARAM_SET, ParamSet, get_param_set
from .plan import ModelPlan
from .schedule import Schedule, compile_schedule
from .server import Server, serve_tcp


@dataclass
class RunResult:
    schedule: Schedule
    logits: np.ndarray
    channel: Channel
    client: Client
    server_stats: dict
    wall_s: float
    online_wall_s: float
    transport: str
    server: Server | None = None  # only for the in-process transport


def _server_schedule(s: Schedule) -> Schedule:
    """What the server process gets at start: the schedule with its weights, no client information, no keys."""
    return Schedule(s.steps, s.params, s.seq_len, s.g, s.groups, s.w, s.server_weights, {}, s.modes)


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
) -> RunResult:
    params = get_param_set(params)
    ids = np.asarray(ids)
    # the level budget is checked here, before any key or ciphertext exists
    sched = compile_schedule(plan, params, len(ids), modes, allow_refresh=allow_refresh, poly_degree=poly_degree)
    if client is None:
        client = Client(params, plan.wte, plan.wpe, threads=threads)
    else:
        client.he, client.step_stats = 0.0, {}
        if client.params != params:
            raise ValueError("the reused client was built for another parameter set")
    t_start = time.perf_counter()
    proc = None
    server = None
    if transport == "inprocess":
        server = Server(_server_schedule(sched), threads=threads)
        tr = InProcessTransport(server.handle, tamper)
    elif transport == "tcp":
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=serve_tcp, args=(_server_schedule(sched), threads, q), daemon=True)
        proc.start()
        port = _server_port(q, proc)
        tr = TcpTransport("127.0.0.1", port, tamper)
    else:
        raise ValueError(f"unknown transport {transport!r}; use 'inprocess' or 'tcp'")
    chan = Channel(tr)
    try:
        t_online = time.perf_counter()
        logits = client.run(chan, sched, ids)
        online = time.perf_counter() - t_online
        stats = chan.exchange(Message("stats", "stats"), bucket="control").meta
    finally:
        chan.close()
        if proc is not None:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    wall = time.perf_counter() - t_start
    return RunResult(sched, logits, chan, client, stats, wall, online, transport, server)

"""User-space link emulator: a TCP relay that adds a bandwidth limit and a propagation delay (asyncio, no root).

Each direction is a link of rate R and one-way delay RTT/2: a chunk read at time t starts serializing when the link
is free, leaves it ``len * 8 / R`` later and is written out RTT/2 after that.  The queue in the relay is bounded
(about twice the bandwidth-delay product), so a faster sender is held back by TCP flow control.

What it does not emulate: the relay terminates TCP on both sides, so the end-to-end TCP congestion control never
sees the delay (no slow start over the long path), and there is no loss or jitter.  Timer resolution is about 1 ms
(epoll), which adds at most ~1 ms to a delivery after an idle period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

CHUNK = 256 << 10


@dataclass(frozen=True)
class LinkProfile:
    rate_bps: float | None  # per direction; None: delay only (the kernel shapes the rate, see pi_eval/netns.py)
    rtt_s: float

    def __post_init__(self):
        if (self.rate_bps is not None and not self.rate_bps > 0) or self.rtt_s < 0:
            raise ValueError(f"link needs rate > 0 and rtt >= 0, got rate={self.rate_bps} bps, rtt={self.rtt_s} s")

    @property
    def queue_chunks(self) -> int:
        if self.rate_bps is None:  # delay only: 16 MiB in flight at most
            return 64
        bdp = self.rate_bps / 8 * (self.rtt_s / 2 + 0.05)
        return int(2 * bdp / CHUNK) + 16


async def _link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: LinkProfile, count: list) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue(maxsize=link.queue_chunks)
    one_way = link.rtt_s / 2

    async def pump_in():
        free = 0.0
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                start = max(loop.time(), free)
                free = start + (0.0 if link.rate_bps is None else len(data) * 8 / link.rate_bps)
                await q.put((free + one_way, data))
        except (ConnectionError, OSError):
            pass
        await q.put((0.0, None))

    async def pump_out():
        try:
            while True:
                t, data = await q.get()
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    await writer.drain()
                    return
                wait = t - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                count[0] += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return

    await asyncio.gather(pump_in(), pump_out())


async def _relay(listen, target, link: LinkProfile, max_connections: int, idle_timeout: float) -> dict:
    done = asyncio.Event()
    stats = {"connections": 0, "bytes_up": 0, "bytes_down": 0}
    last, active = [time.monotonic()], [0]

    async def on_conn(cr: asyncio.StreamReader, cw: asyncio.StreamWriter):
        stats["connections"] += 1
        active[0] += 1
        try:
            sr, sw = await asyncio.open_connection(*target, limit=CHUNK)
        except OSError:
            cw.close()
            active[0] -= 1
            return
        up, down = [0], [0]
        try:
            await asyncio.gather(_link(cr, sw, link, up), _link(sr, cw, link, down))
        finally:
            for w in (sw, cw):
                with contextlib.suppress(OSError):
                    w.close()
            stats["bytes_up"] += up[0]
            stats["bytes_down"] += down[0]
            last[0] = time.monotonic()
            active[0] -= 1
            if stats["connections"] >= max_connections:
                done.set()

    server = await asyncio.start_server(on_conn, *listen, limit=CHUNK)
    host, port = server.sockets[0].getsockname()[:2]
    print(json.dumps({"relay": f"{host}:{port}", "rate_bps": link.rate_bps, "rtt_s": link.rtt_s}), flush=True)
    async with server:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=1.0)
            if not active[0] and time.monotonic() - last[0] > idle_timeout:
                stats["stopped"] = f"idle for {idle_timeout:g} s"
                break
    return stats


def run_relay(
    listen: tuple[str, int],
    target: tuple[str, int],
    link: LinkProfile,
    *,
    max_connections: int = 1,
    idle_timeout: float = 900.0,
) -> dict:
    """Relay until ``max_connections`` connections have closed (or none was open for ``idle_timeout`` s)."""
    stats = asyncio.run(_relay(listen, target, link, max_connections, idle_timeout))
    print(json.dumps({"relay_done": stats}), flush=True)
    return stats

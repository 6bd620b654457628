"""Two Linux network namespaces joined by a veth pair, optionally rate-shaped by the kernel (``tc tbf``).

For tests and benchmarks that run the two parties on separate network stacks.  Needs root and ``ip``/``tc``;
:func:`unavailable` says why it cannot run.  The kernel shapes the **rate** only: the ``netem`` qdisc (delay) is
not available on the machines this was written on, so a delay comes from :mod:`pi_eval.relay`.
Everything created is removed on exit, names are random (``pi<hex>a`` / ``pi<hex>b``), addresses 10.231.x.1/.2.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class NetnsPair:
    a: str  # namespace of the server
    b: str  # namespace of the client (and the relay)
    addr_a: str
    addr_b: str
    rate_mbit: float | None

    def prefix(self, ns: str) -> list[str]:
        """Command prefix that runs a program inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns]


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is missing"
    return None


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


@contextlib.contextmanager
def veth_pair(rate_mbit: float | None = None) -> Iterator[NetnsPair]:
    """Namespaces a and b, one veth link between them; ``rate_mbit``: ``tc tbf`` on both ends (each direction)."""
    why = unavailable()
    if why:
        raise RuntimeError(why)
    tag = secrets.token_hex(3)
    a, b, va, vb = f"pi{tag}a", f"pi{tag}b", f"pi{tag}va", f"pi{tag}vb"
    net = 10 + secrets.randbelow(200)
    pair = NetnsPair(a, b, f"10.231.{net}.1", f"10.231.{net}.2", rate_mbit)
    try:
        _run("ip", "netns", "add", a)
        _run("ip", "netns", "add", b)
        _run("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        for ns, dev, addr in ((a, va, pair.addr_a), (b, vb, pair.addr_b)):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if rate_mbit is not None:  # burst: 1 ms of traffic (>= 16 KiB), so that an idle link saves little
                burst = max(16 * 1024, int(rate_mbit * 1e6 / 8 / 1000))
                tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "400ms"]
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf)
        yield pair
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

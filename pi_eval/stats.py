"""What each party measures during a run: per-step timings and counters, the server's setup and its own summary.

The server's :class:`ServerStats` travels to the client as JSON (the ``stats`` reply, :meth:`ServerStats.to_dict`)
and is read back with :meth:`ServerStats.from_dict`; the report (:mod:`pi_eval.report`) combines both parties'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class ServerStepStats:
    server_s: float = 0.0  # wall time of the server's share of the step
    he_s: float = 0.0  # of which inside TenSEAL / SEAL primitives
    rotations: int = 0  # BSGS rotations (linear steps)
    plaintext_products: int = 0  # plaintext-ciphertext products (linear steps)
    encode_s: float = 0.0  # encoding the layer's plaintexts (linear steps)


@dataclass
class ClientStepStats:
    client_s: float = 0.0
    he_s: float = 0.0


@dataclass
class ServerSetupStats:
    plan_s: float | None = None  # BSGS plans of the schedule's linear layers (no encoding)
    galois_steps: list[int] = field(default_factory=list)  # the rotation steps the client's context must carry
    context_load_s: float | None = None  # loading and checking the public context


@dataclass
class ServerStats:
    """The server's own account of a run (as it reports it in the ``stats`` reply)."""

    steps: dict[str, ServerStepStats] = field(default_factory=dict)
    he_s: float = 0.0
    setup: ServerSetupStats = field(default_factory=ServerSetupStats)
    holds_secret_key: bool = False
    context_is_private: bool | None = None  # None: no context was loaded
    received: list[str] = field(default_factory=list)  # kind:label of every frame received (the key audit)
    bytes_in: int = 0
    bytes_out: int = 0
    aborted: str | None = None
    authenticated: bool = False
    peak_rss_bytes: int | None = None  # the server process's (shared with the client when in-process)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ServerStats:
        """From the ``stats`` reply's JSON; fields it lacks keep their defaults, unknown ones are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["steps"] = {name: _build(ServerStepStats, s) for name, s in (d.get("steps") or {}).items()}
        kw["setup"] = _build(ServerSetupStats, d.get("setup") or {})
        return cls(**kw)


def _build(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

"""The schedule's vocabulary: operations, protocol modes and kinds, and one description of what each operation does.

Every party reads a step through :data:`OPS` (who computes it, which register travels in which direction), so the
server (:mod:`pi_eval.server`), the client (:mod:`pi_eval.client`), the accounting (:mod:`pi_eval.slots`,
:mod:`pi_eval.limits`) and the tests' plaintext simulator interpret a schedule the same way.  The enums are
``StrEnum`` s: reports, digests and CSV files keep the strings they had (``"linear"``, ``"A"``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Op(StrEnum):
    """What a step does (the protocol's unit: one step, at most one round trip)."""

    INPUT = "input"  # the client sends its embedded, encrypted tokens
    LINEAR = "linear"  # the server: BSGS diagonal product, bias, residual
    CLIENT_AIDED = "client"  # mode A: the client decrypts, applies an exact function, re-encrypts
    REFRESH = "refresh"  # mode B: the hiding refresh (level reset)
    POLYNOMIAL = "poly"  # mode C: the server evaluates a polynomial under encryption
    SKIP = "skip"  # mode D: nothing to do (the architecture has no such nonlinearity)
    OUTPUT = "output"  # the server sends the logits; the client decrypts them


class Mode(StrEnum):
    """How a nonlinearity (or linear layer) is evaluated, as the report labels it."""

    SERVER_HE = "HE"  # linear layers (and input/output) under encryption on the server
    CLIENT_AIDED = "A"  # decrypt -> exact float64 function -> re-encrypt (1 round trip)
    HIDING_REFRESH = "B"  # masked level reset (1 round trip), pi_eval.refresh
    POLYNOMIAL = "C"  # polynomial under encryption (levels, no traffic)
    REMOVED = "D"  # the architecture has none


class Kind(StrEnum):
    """What a step computes: the report's grouping (``by_kind``) and the mode table's key."""

    INPUT = "input"
    LINEAR = "linear"
    LAYERNORM = "layernorm"
    ATTENTION = "attention"
    GELU = "gelu"
    RELU = "relu"
    IDENTITY = "identity"
    REFRESH = "refresh"
    OUTPUT = "output"


class Direction(StrEnum):
    UP = "up"  # client -> server
    DOWN = "down"  # server -> client


@dataclass(frozen=True)
class OpSpec:
    """One operation as every party sees it.

    ``sends_down``: the server sends the step's source register to the client (then waits for its reply, if
    ``client_replies``, or ends the run, if ``final``); ``client_replies``: the client sends the step's destination
    register; ``server_computes``: the server evaluates it locally, no message.
    """

    summary: str
    server_computes: bool = False
    sends_down: bool = False
    client_replies: bool = False
    final: bool = False  # the source register is the result the client decrypts


OPS: dict[Op, OpSpec] = {
    Op.INPUT: OpSpec("client encrypts the embedded tokens into the destination register", client_replies=True),
    Op.LINEAR: OpSpec("BSGS diagonal product of the source register, + bias (+ residual)", server_computes=True),
    Op.CLIENT_AIDED: OpSpec(
        "client decrypts the source, applies the step's function, encrypts the destination",
        sends_down=True,
        client_replies=True,
    ),
    Op.REFRESH: OpSpec(
        "server masks the register, client re-encrypts it exactly, server unmasks", sends_down=True, client_replies=True
    ),
    Op.POLYNOMIAL: OpSpec("polynomial of the source register under encryption", server_computes=True),
    Op.SKIP: OpSpec("nothing (the nonlinearity is the identity)", server_computes=True),
    Op.OUTPUT: OpSpec("server sends the logits, the client decrypts them", sends_down=True, final=True),
}
# the modes a nonlinearity may take, and its default
ALLOWED_MODES: dict[Kind, frozenset[Mode]] = {
    Kind.LAYERNORM: frozenset({Mode.CLIENT_AIDED}),
    Kind.ATTENTION: frozenset({Mode.CLIENT_AIDED}),
    Kind.GELU: frozenset({Mode.CLIENT_AIDED, Mode.POLYNOMIAL}),
    Kind.RELU: frozenset({Mode.CLIENT_AIDED, Mode.POLYNOMIAL}),
}
DEFAULT_MODES: dict[Kind, Mode] = {kind: Mode.CLIENT_AIDED for kind in ALLOWED_MODES}


def parse_modes(modes: dict | None) -> dict[Kind, Mode]:
    """``{"gelu": "C"}`` (a request's strings) -> the full mode table; unknown kinds or modes are refused."""
    out = dict(DEFAULT_MODES)
    for k, m in (modes or {}).items():
        if k not in ALLOWED_MODES:
            raise ValueError(f"unknown operation kind {k!r} in modes; known: {sorted(map(str, ALLOWED_MODES))}")
        allowed = ALLOWED_MODES[Kind(k)]
        if m not in allowed:
            raise ValueError(f"mode {m!r} not supported for {k}; allowed: {sorted(map(str, allowed))}")
        out[Kind(k)] = Mode(m)
    return out


def activation_kind(act: str) -> Kind | None:
    """The mode-table kind of an activation function (None: identity, nothing to evaluate)."""
    return Kind.RELU if act == "relu" else (Kind.GELU if act.startswith("gelu") else None)

"""Slot use: how much of each ciphertext carries payload, and the best any packing could do.

* **payload** of a register in one message: its ``T x D`` activation values (real tokens x real features).
  Replicated copies, zero-padded pieces and the zero tail of a cyclic register are *not* payload.
* **slot use** of a set of ciphertexts: ``payload / (ciphertexts x slots)``.  For a message that is the share of the
  bytes sent that carry information (a ciphertext's size does not depend on how many slots it fills).
* **bound**: the same with the fewest ciphertexts any packing needs, ``ceil(payload / slots)`` per message (or per
  ``mm`` input register).  ``slot use == bound`` means the schedule sends no ciphertext more than necessary; a bound
  below :data:`TARGET` means the shape itself cannot fill the slots (payload below ``TARGET x slots``).

Counted for the ciphertexts each operation *sends* (input, client-aided, refresh, output) and, for linear layers,
for the ciphertexts its ``mm`` calls read.  Computed from the schedule alone (no encryption needed); the report
checks the ciphertext counts against the channel's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .layout import Layout
from .ops import Direction, Op
from .schedule import Schedule, Step

TARGET = 0.75


@dataclass
class SlotCount:
    payload: int = 0
    cts: int = 0
    min_cts: int = 0
    largest: int = 0  # largest payload of one message / register

    def add(self, payload: int, cts: int, slots: int) -> None:
        self.payload += payload
        self.cts += cts
        self.min_cts += math.ceil(payload / slots)
        self.largest = max(self.largest, payload)

    def use(self, slots: int) -> float | None:
        return self.payload / (self.cts * slots) if self.cts else None

    def bound(self, slots: int) -> float | None:
        return self.payload / (self.min_cts * slots) if self.min_cts else None


def _reg(lay: Layout, seq_len: int, groups: int) -> tuple[int, int]:
    """(payload values, ciphertexts) of one register [T, D] in layout ``lay``."""
    return seq_len * lay.dim, groups * lay.chunks


def step_messages(st: Step, seq_len: int, groups: int) -> list[tuple[Direction, int, int]]:
    """(direction, payload, ciphertexts) of every message this step causes (:meth:`Step.messages`)."""
    return [(direction, *_reg(lay, seq_len, groups)) for direction, lay in st.messages()]


def step_count(st: Step, sched: Schedule) -> SlotCount | None:
    """Sent ciphertexts of a message step, or the ``mm`` input ciphertexts of a linear step; None otherwise."""
    slots, c = sched.params.slots, SlotCount()
    if st.op is Op.LINEAR:
        c.add(*_reg(st.src_layout, sched.seq_len, sched.groups), slots)
        return c
    msgs = step_messages(st, sched.seq_len, sched.groups)
    for _, payload, cts in msgs:
        c.add(payload, cts, slots)
    return c if msgs else None


@dataclass
class RunSlotUse:
    """Run-level slot use of the sent ciphertexts and of the ``mm`` (linear) inputs, with their bounds."""

    slot_use: float | None
    slot_use_bound: float | None
    slot_use_mm: float | None
    slot_use_mm_bound: float | None
    slot_use_target: float
    ciphertexts_sent_min: int
    slot_use_limit: str | None  # why the run is below the target (None: it is not)


def run_slot_use(sched: Schedule) -> RunSlotUse:
    """Run-level slot use (sent ciphertexts and ``mm`` inputs) with bounds and, when below target, the reason."""
    slots = sched.params.slots
    sent, mm = SlotCount(), SlotCount()
    for st in sched.steps:
        c = step_count(st, sched)
        if c is None:
            continue
        tot = mm if st.op is Op.LINEAR else sent
        tot.payload, tot.cts, tot.min_cts = tot.payload + c.payload, tot.cts + c.cts, tot.min_cts + c.min_cts
        tot.largest = max(tot.largest, c.largest)
    reasons = []
    for name, c in (("sent", sent), ("mm", mm)):
        if c.cts == 0:
            continue
        if c.bound(slots) < TARGET:
            reasons.append(
                f"{name}: shape-limited, best possible {c.bound(slots):.3f} < {TARGET}: payloads are T x D values "
                f"(T={sched.seq_len}, largest {c.largest}) against {slots} slots per ciphertext"
            )
        if c.cts > c.min_cts:
            reasons.append(f"{name}: schedule uses {c.cts} ciphertexts where {c.min_cts} would hold the payload")
    return RunSlotUse(
        slot_use=sent.use(slots),
        slot_use_bound=sent.bound(slots),
        slot_use_mm=mm.use(slots),
        slot_use_mm_bound=mm.bound(slots),
        slot_use_target=TARGET,
        ciphertexts_sent_min=sent.min_cts,
        slot_use_limit="; ".join(reasons) or None,
    )

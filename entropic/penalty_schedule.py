"""When the entropy penalty is on and how strongly: the coefficient λ_t of each optimizer step.

One schedule serves every route that adds the penalty (the Lightning callback and the plain-PyTorch
:class:`entropic.regularizer.EntropyPenalty`). The term starts at the first step that is at least ``start_step``
and, with a gate, at which attention has left uniform: the mean row entropy (over layers, heads and real queries)
is below ``start_when_entropy_below`` times its causal maximum. From there λ_t rises linearly to ``loss_coeff``
over ``warmup_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DEFAULT_LOSS_COEFF",
    "DEFAULT_START_BELOW",
    "DEFAULT_WARMUP_STEPS",
    "THRESHOLD_INIT_OBSERVED",
    "PenaltySchedule",
    "check_threshold_init",
]

THRESHOLD_INIT_OBSERVED = "observed"
"""``threshold_init`` value that sets θ from the per-head entropies observed at the step the penalty starts."""

# The default setting of :class:`entropic.EntropyRegularization` and of the recipes: the one the seeded CPU study
# has not shown to make the model worse (arm ``ereg_weak`` of scripts/reproduce_cpu.py; docs/reproduction.md).
# Stronger settings (λ = 0.16, or θ₀ = 0.35 switched on at 5 % of the steps) were shown worse there.
DEFAULT_LOSS_COEFF = 0.01
"""Default λ, for reduction ``"paper"`` (a mean over layers, heads and queries)."""

DEFAULT_START_BELOW = 0.9
"""Default gate: the term starts once the mean row entropy is below 90 % of its causal maximum."""

DEFAULT_WARMUP_STEPS = 150
"""Default λ warm-up after the start, in optimizer steps (10 % of the study's 1,500 steps)."""


def check_threshold_init(value: Any) -> None:
    """Raises ValueError unless ``value`` is a θ in [0, 1], an [L, H] tensor or ``"observed"``."""
    if isinstance(value, str):
        if value != THRESHOLD_INIT_OBSERVED:
            raise ValueError(
                f"threshold_init={value!r} is not supported; allowed: a number in [0, 1], an [L, H] tensor, "
                f"or {THRESHOLD_INIT_OBSERVED!r} (θ from the head entropies observed when the penalty starts)"
            )
        return
    if isinstance(value, torch.Tensor):
        if value.dim() != 2 or not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"threshold_init as a tensor must be a finite [L, H] tensor, got shape {list(value.shape)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"threshold_init must be a number in [0, 1] (a fraction of E_max = log T), an [L, H] tensor, or "
            f"{THRESHOLD_INIT_OBSERVED!r}; got {value!r}"
        )


@dataclass
class PenaltySchedule:
    """λ_t of the entropy penalty at each optimizer step.

    Args:
        loss_coeff: λ, the coefficient once warmed up (>= 0).
        start_step: first step at which the term may start (>= 0).
        start_when_entropy_below: optional gate in (0, 1]: the term starts at the first step >= ``start_step``
            whose mean row entropy is below this fraction of the causal maximum (attention has left uniform).
            None starts at ``start_step``.
        warmup_steps: λ_t = λ·min(1, (step − start + 1) / warmup_steps) after the start; 0 for none.

    Attributes:
        started_at: the step at which the term started, None before; saved by :meth:`state_dict`.
    """

    loss_coeff: float
    start_step: int = 0
    start_when_entropy_below: float | None = None
    warmup_steps: int = 0
    started_at: int | None = None

    def __post_init__(self) -> None:
        problems = []
        coeff = self.loss_coeff
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff) or coeff < 0:
            problems.append(f"loss_coeff must be a finite number >= 0, got {coeff!r}")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            problems.append(f"start_step must be an int >= 0, got {self.start_step!r}")
        gate = self.start_when_entropy_below
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 < gate <= 1):
            problems.append(
                f"start_when_entropy_below must be a fraction of the causal maximum entropy in (0, 1], or None; "
                f"got {gate!r}"
            )
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            problems.append(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.loss_coeff = float(coeff)

    @property
    def gated(self) -> bool:
        """Whether the start waits for attention to leave uniform."""
        return self.start_when_entropy_below is not None

    def maybe_start(self, step: int, entropy_fraction: Callable[[], float]) -> bool:
        """Starts the term at ``step`` if it is due; True only at the step it starts.

        ``entropy_fraction`` is called only while a gate is waiting (it may synchronize ranks or the device).
        """
        if self.started_at is not None or step < self.start_step:
            return False
        if self.gated and entropy_fraction() >= self.start_when_entropy_below:
            return False
        self.started_at = step
        return True

    def coeff(self, step: int) -> float:
        """λ_t at ``step``: 0 before the start, then the linear warm-up to ``loss_coeff``."""
        if self.started_at is None or step < self.started_at:
            return 0.0
        if self.warmup_steps:
            return self.loss_coeff * min(1.0, (step - self.started_at + 1) / self.warmup_steps)
        return self.loss_coeff

    def state_dict(self) -> dict[str, Any]:
        return {"started_at": self.started_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started_at = state.get("started_at", self.started_at)

"""What every entropic callback does to a module at ``setup``: make its attention layers record entropies."""

from __future__ import annotations

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from entropic.regularizer import prepare_model


def prepare_module(module: nn.Module, callback_name: str) -> None:
    """:func:`entropic.regularizer.prepare_model` on ``module``, saying (once, on rank zero) what it switched."""
    changed = prepare_model(module)
    if changed:
        rank_zero_info(f"{callback_name}: switched {', '.join(changed)} so attention layers record per-head entropy.")

"""Lightning's ``ThroughputMonitor`` set up for token batches: tokens/s is ``train/device/items_per_sec``."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor

__all__ = ["TokenThroughputMonitor"]


def _rows(batch: Any) -> int:
    return int(batch["input_ids"].shape[0])


def _tokens(batch: Any) -> int:
    return int(batch["input_ids"].numel())


class TokenThroughputMonitor(ThroughputMonitor):
    """:class:`~lightning.pytorch.callbacks.ThroughputMonitor` for batches with ``input_ids`` [B, T].

    Logs at the Trainer's log cadence once ``window_size`` batches have run, over the last ``window_size`` batches
    of one rank: ``train/device/items_per_sec`` (tokens/s), ``train/device/samples_per_sec`` (sequences/s),
    ``train/device/batches_per_sec`` and ``train/device/flops_per_sec`` (from the module's ``flops_per_batch``),
    with totals over ranks (no ``device/``) when there are several; the same under ``validate/``.
    """

    def __init__(self, window_size: int = 100) -> None:
        if not (isinstance(window_size, int) and window_size >= 2):
            raise ValueError(f"window_size must be an int >= 2 (batches), got {window_size!r}")
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, window_size=window_size)

"""What a run's report needs, kept from the run's own state: no logger and no metrics file required."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from entropic.io import atomic_write_json
from entropic.report import SUMMARY_FILE, RunSummary

__all__ = ["RunRecord"]


class RunRecord(Callback):
    """Keeps a run's summary (steps, validation loss, divergence, throughput, entropy bins, penalty) and writes
    ``<default_root_dir>/summary.json`` at the end of ``fit``.

    Divergence is tracked on the device (a non-finite training loss at any step), so no step waits on the host.
    Throughput counts the tokens of every training batch after the first over the wall time they took. The state
    goes into checkpoints, so a resumed run reports the whole run.
    """

    def __init__(self) -> None:
        self._nonfinite: torch.Tensor | None = None
        self._tokens = 0
        self._seconds = 0.0
        self._started: float | None = None
        self._batches = 0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._started = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach())
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite.to(bad.device) | bad
        self._batches += 1
        if self._started is not None and self._batches > 1:  # the first batch pays one-off setup costs
            ids = batch.get("input_ids") if isinstance(batch, dict) else None
            if isinstance(ids, torch.Tensor):
                self._tokens += ids.numel() * trainer.world_size
                self._seconds += time.perf_counter() - self._started

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The run's summary now (the fields of :class:`entropic.report.RunSummary`)."""
        metrics = trainer.callback_metrics

        def metric(key: str) -> float | None:
            value = metrics.get(key)
            return None if value is None else float(value)

        val_loss = metric("val/loss")
        monitor = _callback(trainer, "AttentionEntropyMonitor")
        regularizer = _callback(trainer, "EntropyRegularization")
        bins = [None] * 4
        if monitor is not None and monitor.last_metrics:
            bins = [monitor.last_metrics.get(f"entropy/bin_{k}_share") for k in range(4)]
        hparams = getattr(pl_module, "hparams", {}) or {}
        root = Path(trainer.default_root_dir)
        return asdict(
            RunSummary(
                run_dir=str(root),
                arch=str(hparams["arch"]) if "arch" in hparams else None,
                steps=int(trainer.global_step),
                val_loss=val_loss,
                val_ppl=metric("val/ppl"),
                diverged=bool(self._nonfinite is not None and bool(self._nonfinite))
                or (val_loss is not None and not math.isfinite(val_loss)),
                tokens_per_sec=self._tokens / self._seconds if self._seconds > 0 else None,
                bin_shares=bins,
                entropy_penalty=None if regularizer is None else regularizer.last_penalty,
                figures=sorted(str(p.relative_to(root)) for p in root.rglob("*.png")) if root.is_dir() else [],
            )
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            atomic_write_json(Path(trainer.default_root_dir) / SUMMARY_FILE, self.summary(trainer, pl_module))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "nonfinite": bool(self._nonfinite) if self._nonfinite is not None else False,
            "tokens": self._tokens,
            "seconds": self._seconds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._nonfinite = torch.tensor(bool(state_dict.get("nonfinite", False)))
        self._tokens = int(state_dict.get("tokens", 0))
        self._seconds = float(state_dict.get("seconds", 0.0))


def _callback(trainer: pl.Trainer, name: str) -> Any:
    return next((c for c in trainer.callbacks if type(c).__name__ == name), None)

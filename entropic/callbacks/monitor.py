"""Per-(layer, head) attention entropy of a training run: logging, figures, collapse and overload detection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from entropic.callbacks.plotting import plot_bin_histogram, plot_head_heatmap, plot_layer_history
from entropic.callbacks.wiring import prepare_module
from entropic.functional import entropic_overload, entropy_bin_shares, entropy_collapse
from entropic.metrics import HeadEntropyMean
from entropic.ops.recording import EntropyRecorder, find_recorder
from entropic.regularizer import query_mask_from_batch

__all__ = ["AttentionEntropyMonitor"]

_ACTIONS = ("warn", "stop", "ignore")


class AttentionEntropyMonitor(Callback):
    r"""Tracks the mean attention entropy of every (layer, head) during training.

    At ``setup`` it makes the module's model record per-row entropies: our models always do, and Hugging Face
    models that run sdpa or eager attention are switched to the entropic attention (said once, on rank zero).
    After every training batch it adds the batch's detached row entropies to per-(layer, head) sums and counts, a
    :class:`entropic.metrics.HeadEntropyMean` (mean over batch rows and query positions; queries where the batch's
    ``attention_mask`` is 0 are left out). At the Trainer's log cadence (``log_every_n_steps``) torchmetrics
    reduces the sums and counts over DDP ranks, so the logged value is the mean over all ranks' batches since the
    last log, logged to every configured logger at Lightning's logging step (the one its own ``self.log`` uses):

    - ``entropy/layer_{l}/head_{h}`` (nats; only with ``log_heads=True``), ``entropy/layer_{l}/mean``,
      ``entropy/mean``;
    - ``entropy/bin_{k}_share`` for k = 0..3, the share of heads in the paper's bins [0, max/4), [max/4, max/2),
      [max/2, 3max/4), [3max/4, max], with max the largest observed head entropy.

    Detection, on the same reduced values (identical on all ranks):

    - *entropy collapse* (:func:`entropic.functional.entropy_collapse`): a non-finite head entropy (checked at
      every log), or, from ``detect_from_step`` on, a layer of the deeper half in which at least
      ``collapse_head_share`` of the heads are below ``collapse_fraction`` × the causal maximum mean entropy
      at the batch's sequence length;
    - *entropic overload* (:func:`entropic.functional.entropic_overload`): from ``detect_from_step`` on, more than
      ``overload_threshold`` of all heads in the top bin. (At initialization nearly every head is near-uniform,
      which is overload by definition, hence the delay.)

    Each is reported with ``rank_zero_warn`` when it starts (``"warn"``), ignored (``"ignore"``), or stops training
    (``"stop"``): ``trainer.should_stop`` is set from ``strategy.reduce_boolean_decision`` and the reason is kept in
    :attr:`stop_reason` and logged as a warning.

    At every validation end (not the sanity check) and at fit end, rank zero writes three PNGs into ``figure_dir``
    (default ``<trainer.log_dir or default_root_dir>/entropy_figures``): ``entropy_heatmap_step{N}.png`` (layer ×
    head, with values), ``entropy_layers_step{N}.png`` (layer means over the logged steps) and
    ``entropy_bins_step{N}.png`` (the four bins); their paths are appended to :attr:`figure_paths`.

    Args:
        log_heads: log one scalar per head (L·H keys) besides the per-layer means and bins.
        figure_dir: where the figures go; None for the default above.
        write_figures: set False to write none.
        on_collapse: ``"warn"``, ``"stop"`` or ``"ignore"``.
        on_overload: ``"warn"``, ``"stop"`` or ``"ignore"``.
        collapse_fraction: a head is near zero below this fraction of the causal maximum (default 0.05, i.e.
            0.19 nats at T=128; flags the deepest layers of the paper's diverging Softmax-only model).
        collapse_head_share: share of a deep layer's heads that must be near zero for it to count (default 0.5).
        overload_threshold: share of heads in the top bin above which overload is reported (default 0.2: the
            paper's overloaded LayerNorm-free models have 23-58%, healthy ones about 10% or less).
        detect_from_step: first optimizer step at which near-zero collapse and overload are checked (non-finite
            entropies are checked from the start).

    Example::

        trainer = Trainer(callbacks=[AttentionEntropyMonitor(on_collapse="stop")], log_every_n_steps=50)
    """

    def __init__(
        self,
        *,
        log_heads: bool = True,
        figure_dir: str | os.PathLike[str] | None = None,
        write_figures: bool = True,
        on_collapse: str = "warn",
        on_overload: str = "warn",
        collapse_fraction: float = 0.05,
        collapse_head_share: float = 0.5,
        overload_threshold: float = 0.2,
        detect_from_step: int = 100,
    ) -> None:
        problems = []
        for name, value in (("on_collapse", on_collapse), ("on_overload", on_overload)):
            if value not in _ACTIONS:
                problems.append(f"{name} must be one of {_ACTIONS}, got {value!r}")
        if not (isinstance(collapse_fraction, (int, float)) and 0 < collapse_fraction < 1):
            problems.append(f"collapse_fraction must be in (0, 1), got {collapse_fraction!r}")
        if not (isinstance(collapse_head_share, (int, float)) and 0 < collapse_head_share <= 1):
            problems.append(f"collapse_head_share must be in (0, 1], got {collapse_head_share!r}")
        if not (isinstance(overload_threshold, (int, float)) and 0 <= overload_threshold <= 1):
            problems.append(f"overload_threshold must be in [0, 1], got {overload_threshold!r}")
        if not (isinstance(detect_from_step, int) and detect_from_step >= 0):
            problems.append(f"detect_from_step must be an int >= 0, got {detect_from_step!r}")
        if problems:
            raise MisconfigurationException("AttentionEntropyMonitor: " + "; ".join(problems))
        self.log_heads = log_heads
        self.figure_dir = None if figure_dir is None else Path(figure_dir)
        self.write_figures = write_figures
        self.on_collapse = on_collapse
        self.on_overload = on_overload
        self.collapse_fraction = float(collapse_fraction)
        self.collapse_head_share = float(collapse_head_share)
        self.overload_threshold = float(overload_threshold)
        self._context = 2  # sequence length of the tracked batches (largest seen)
        self.detect_from_step = detect_from_step
        # Window since the last log: per-(layer, head) sums and counts of row entropies.
        self._stats: HeadEntropyMean | None = None
        self.history: list[dict[str, Any]] = []  # {"step": int, "head_mean": [[float]*H]*L}, reduced over ranks
        self.last_metrics: dict[str, float] = {}
        self.figure_paths: list[Path] = []
        self.stop_reason: str | None = None
        self._active: dict[str, bool] = {"collapse": False, "overload": False}
        self._warned_empty = False
        self._recorder: EntropyRecorder | None = None
        self._seen_global_step = 0  # trainer.global_step after the previous training batch

    # ------------------------------------------------------------------ wiring
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        prepare_module(pl_module, "AttentionEntropyMonitor")
        self._recorder = find_recorder(pl_module)
        if self.write_figures and self.figure_dir is None:
            # Resolved here, on every rank: trainer.log_dir broadcasts, so it must not run in a rank-zero-only path.
            self.figure_dir = Path(trainer.log_dir or trainer.default_root_dir) / "entropy_figures"

    # ------------------------------------------------------------------ accumulation and logging
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        entropies = [] if self._recorder is None else self._recorder.entropies
        if not entropies:
            if not self._warned_empty:
                rank_zero_warn(
                    f"AttentionEntropyMonitor: no attention layer of {type(pl_module).__name__} recorded entropies; "
                    "nothing is tracked (does its model use the attention interface or entropic.models?)."
                )
                self._warned_empty = True
            return
        n_layer, n_head = len(entropies), int(entropies[0].shape[1])
        if self._stats is None or tuple(self._stats.total.shape) != (n_layer, n_head):
            self._stats = HeadEntropyMean(n_layer, n_head).to(entropies[0].device)
        with torch.no_grad():
            self._stats.update(entropies, query_mask_from_batch(batch))  # padded queries are left out
        self._context = max(self._context, int(entropies[0].shape[-1]))
        if self._log_cadence_reached(trainer):
            self._flush(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_global_step = trainer.global_step  # restored by Lightning on resume

    def _log_cadence_reached(self, trainer: pl.Trainer) -> bool:
        """True on the batch whose optimizer step completes a multiple of ``log_every_n_steps``.

        Read from ``trainer.global_step`` (public, and already advanced when ``on_train_batch_end`` runs), so
        accumulation batches never log and several optimizers stepping in one batch count once.
        """
        every = trainer.log_every_n_steps
        previous, self._seen_global_step = self._seen_global_step, trainer.global_step
        return every > 0 and trainer.global_step // every > previous // every

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Reduce what is left since the last log (every rank runs this hook, so the collective is safe here).
        self._flush(trainer, final=True)

    def _flush(self, trainer: pl.Trainer, final: bool = False) -> None:
        if self._stats is None or not self._stats.update_called:  # no batch since the last log
            return
        head_mean = self._stats.compute().cpu().numpy()  # [L, H]; sums and counts reduced over ranks by torchmetrics
        self._stats.reset()
        # Lightning logs a step's training metrics at the step's 0-based index; use the same x-axis.
        step = max(trainer.global_step - 1, 0)
        if final and self.history and self.history[-1]["step"] == step:
            return
        self.history.append({"step": int(step), "head_mean": head_mean.tolist()})
        metrics = self._metrics(head_mean)
        self.last_metrics = metrics
        for logger in trainer.loggers:  # loggers write on rank zero only
            logger.log_metrics(metrics, step=step)
        self._detect(trainer, head_mean, trainer.global_step)

    def _metrics(self, head_mean: np.ndarray) -> dict[str, float]:
        metrics: dict[str, float] = {}
        n_layer, n_head = head_mean.shape
        for layer in range(n_layer):
            if self.log_heads:
                for head in range(n_head):
                    metrics[f"entropy/layer_{layer}/head_{head}"] = float(head_mean[layer, head])
            metrics[f"entropy/layer_{layer}/mean"] = float(head_mean[layer].mean())
        metrics["entropy/mean"] = float(head_mean.mean())
        metrics.update(entropy_bin_shares(torch.as_tensor(head_mean)).as_dict())
        return metrics

    # ------------------------------------------------------------------ detection
    def diagnose(self, head_mean: np.ndarray, step: int) -> dict[str, str | None]:
        """Collapse and overload findings for [L, H] head means at ``step``: a message, or None if healthy."""
        findings: dict[str, str | None] = {"collapse": None, "overload": None}
        ent = torch.as_tensor(np.asarray(head_mean, dtype=np.float64))
        collapse = entropy_collapse(
            ent, context_size=self._context, fraction=self.collapse_fraction, min_head_share=self.collapse_head_share
        )
        if collapse.nonfinite:
            findings["collapse"] = (
                f"entropy collapse: non-finite attention entropy in (layer, head) {list(collapse.nonfinite_heads[:8])}"
            )
            return findings
        if step < self.detect_from_step:
            return findings
        if collapse.collapsed:
            findings["collapse"] = (
                f"entropy collapse: in layers {list(collapse.collapsed_layers)} at least "
                f"{self.collapse_head_share:.0%} of the heads have mean entropy below {collapse.floor:.3f} nats; "
                f"layer means {np.round(ent.mean(dim=1).numpy(), 3).tolist()}"
            )
        overload = entropic_overload(ent, threshold=self.overload_threshold)
        if overload.overloaded:
            findings["overload"] = (
                f"entropic overload: {overload.share:.0%} of the heads are in the top entropy bin [3max/4, max] "
                f"(max {overload.max_value:.3f} nats; threshold {self.overload_threshold:.0%}); per-layer shares "
                f"{[round(x, 2) for x in overload.layer_shares]}"
            )
        return findings

    def _detect(self, trainer: pl.Trainer, head_mean: np.ndarray, step: int) -> None:
        findings = self.diagnose(head_mean, step)
        stop = False
        for kind, action in (("collapse", self.on_collapse), ("overload", self.on_overload)):
            message = findings[kind]
            starting = message is not None and not self._active[kind]
            self._active[kind] = message is not None
            if message is None or action == "ignore":
                continue
            if action == "stop":
                stop = True
                self.stop_reason = f"AttentionEntropyMonitor stopped training at step {step}: {message}"
            elif starting:
                rank_zero_warn(f"AttentionEntropyMonitor (step {step}): {message}")
        if self.on_collapse == "stop" or self.on_overload == "stop":
            # Collective on every rank at the same cadence; the inputs are already identical after the all-reduce.
            decision = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if decision:
                trainer.should_stop = True
                if self.stop_reason:
                    rank_zero_warn(self.stop_reason)

    # ------------------------------------------------------------------ figures
    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._write_figures(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_figures(trainer)

    def _write_figures(self, trainer: pl.Trainer) -> None:
        if not (self.write_figures and trainer.is_global_zero and self.history and self.figure_dir):
            return
        try:
            self.figure_paths.extend(self.plot(self.figure_dir))
        except Exception as err:  # a plotting problem must never kill a training run
            rank_zero_warn(f"AttentionEntropyMonitor: could not write figures to {self.figure_dir}: {err!r}")

    def plot(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Writes the three figures for the latest logged entropies; returns their paths."""
        latest = self.history[-1]
        step = latest["step"]
        head_mean = np.asarray(latest["head_mean"], dtype=np.float64)
        steps = [entry["step"] for entry in self.history]
        layer_means = np.asarray([np.asarray(e["head_mean"]).mean(axis=1) for e in self.history])
        directory = Path(directory)
        return [
            plot_head_heatmap(head_mean, directory / f"entropy_heatmap_step{step}.png", title=f"step {step}"),
            plot_layer_history(steps, layer_means, directory / f"entropy_layers_step{step}.png"),
            plot_bin_histogram(head_mean, directory / f"entropy_bins_step{step}.png"),
        ]

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        # The partial window since the last log is not saved: under DDP it would be rank zero's alone.
        return {
            "history": list(self.history),
            "active": dict(self._active),
            "stop_reason": self.stop_reason,
            "context": self._context,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._active = dict(state_dict.get("active", self._active))
        self.stop_reason = state_dict.get("stop_reason")
        self._context = state_dict.get("context", self._context)

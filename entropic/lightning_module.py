"""The LightningModule that recipes train: one architecture of the paper, AdamW, warm-up then linear decay.

Entropy tracking and regularization are not in here: recipes add :class:`entropic.AttentionEntropyMonitor` and
:class:`entropic.EntropyRegularization` as Trainer callbacks, exactly as a user would on their own module.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from transformers import get_constant_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup

from entropic.models import EntropicConfig, EntropicForCausalLM

# Parameters whose names contain one of these are excluded from weight decay: gains, biases, LayerNorms, and the
# learnable scalars of the method (FFN scaling, temperatures, entropy thresholds).
_NO_DECAY_MARKERS = ("bias", "ln_", "alpha", "beta", "temperature", "threshold")


def _matmul_parameter_count(model: EntropicForCausalLM) -> int:
    """Weights that multiply activations once per token: every matrix but the embedding tables, plus the LM head
    (counted even when it is tied to the token embedding, since its product is computed)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    count = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embeddings:
        count += head.weight.numel()
    return count


class EntropicLM(pl.LightningModule):
    """Causal language modelling of one paper architecture.

    Args:
        arch: a preset name of :meth:`entropic.models.EntropicConfig.from_preset`, e.g. ``"SM(t)+ScFuFFN"``.
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        n_embd: model width.
        n_positions: context length T (the data's block size must not exceed it).
        vocab_size: tokenizer size; recipes link it from the data module.
        model_overrides: any further :class:`EntropicConfig` fields (e.g. ``{"attention_backend": "torch"}``).
        learning_rate: peak learning rate of AdamW (the paper's setting is 1e-3).
        weight_decay: decoupled weight decay, not applied to gains, biases, norms and the method's scalars.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_fraction: share of the total steps spent in linear warm-up (the paper: 0.05).
        min_lr_fraction: learning rate at the last step, as a fraction of the peak (linear decay to it).
    """

    def __init__(
        self,
        arch: str = "SM(t)+ScFuFFN",
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        n_positions: int = 128,
        vocab_size: int = 8192,
        model_overrides: dict[str, Any] | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_fraction: float = 0.05,
        min_lr_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if not 0.0 <= min_lr_fraction <= 1.0:
            raise ValueError(f"min_lr_fraction must be in [0, 1], got {min_lr_fraction}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")
        self.save_hyperparameters()
        config = EntropicConfig.from_preset(
            arch,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            n_positions=n_positions,
            vocab_size=vocab_size,
            **(model_overrides or {}),
        )
        self.model = EntropicForCausalLM(config)
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor after each batch
        self._matmul_params = _matmul_parameter_count(self.model)

    @property
    def context_size(self) -> int:
        """The model's context length T."""
        return self.model.config.n_positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.flops_per_batch = self._training_flops(tuple(batch["input_ids"].shape))

    def _training_flops(self, shape: tuple[int, int]) -> int:
        """Estimated forward + backward FLOPs of one batch of ``shape`` = [B, T] tokens (PaLM, appendix B):
        6 per matmul weight per token, plus 12·L·d·T per token for the attention scores and their use."""
        rows, seq = shape
        config = self.model.config
        per_token = 6 * self._matmul_params + 12 * config.n_layer * config.n_embd * seq
        return per_token * rows * seq

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            self.log("val/ppl", torch.exp(val_loss.detach().float()), sync_dist=False)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("test/loss", loss, sync_dist=True)
        return loss

    def on_test_epoch_end(self) -> None:
        test_loss = self.trainer.callback_metrics.get("test/loss")
        if test_loss is not None:
            self.log("test/ppl", torch.exp(test_loss.detach().float()))

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: matrices decay, everything in ``_NO_DECAY_MARKERS`` (and every 0-/1-D tensor) does not."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            skip = param.dim() < 2 or any(marker in name for marker in _NO_DECAY_MARKERS)
            (no_decay if skip else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameter_groups(), lr=self.hparams.learning_rate, betas=self.hparams.betas, eps=self.hparams.eps
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(self.hparams.warmup_fraction * total_steps)
        if self.hparams.min_lr_fraction >= 1.0:
            scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
        else:  # the paper's schedule (Hugging Face "linear", or "polynomial" of power 1 with a floor)
            scheduler = get_polynomial_decay_schedule_with_warmup(
                optimizer,
                num_warmup_steps=warmup,
                num_training_steps=total_steps,
                lr_end=self.hparams.learning_rate * self.hparams.min_lr_fraction,
                power=1.0,
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

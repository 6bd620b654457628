"""Entropy regularization for Hugging Face ``transformers.Trainer`` users (needs ``accelerate``: the ``hf`` extra).

:class:`EntropyRegularizedTrainer` is a ``Trainer`` that switches the model to the entropy-recording attention,
adds the scheduled term λ_t · L_entropy of an :class:`entropic.regularizer.EntropyPenalty` to the training loss,
trains θ in an optimizer group of its own and saves θ (with the schedule's state) in every checkpoint.

Example::

    from entropic.hf_trainer import EntropyRegularizedTrainer
    from entropic.regularizer import EntropyPenalty

    penalty = EntropyPenalty.for_model(model, loss_coeff=0.01, warmup_steps=100)
    trainer = EntropyRegularizedTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                                        entropy_penalty=penalty)
    trainer.train()
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from entropic.regularizer import EntropyPenalty, prepare_model

__all__ = ["PENALTY_FILE", "EntropyRegularizedTrainer"]

PENALTY_FILE = "entropy_penalty.pt"
"""File in each checkpoint folder holding θ and the schedule's state."""


class EntropyRegularizedTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss is the model's loss + λ_t · L_entropy.

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        entropy_penalty: the thresholds and the schedule; it must have ``loss_coeff`` set (λ), so its schedule
            (start step, gate, warm-up, θ from observed entropies) runs on the Trainer's ``global_step``.
        entropy_weight_decay: weight decay of θ's optimizer group (default 0).

    Raises:
        ValueError: ``entropy_penalty`` is missing, has no ``loss_coeff``, or does not match the model's
            layers and heads.
    """

    def __init__(
        self, *args: Any, entropy_penalty: EntropyPenalty | None = None, entropy_weight_decay: float = 0.0, **kwargs
    ) -> None:
        if not isinstance(entropy_penalty, EntropyPenalty) or entropy_penalty.schedule is None:
            raise ValueError(
                "EntropyRegularizedTrainer needs entropy_penalty=EntropyPenalty.for_model(model, loss_coeff=...) "
                f"with loss_coeff set; got {entropy_penalty!r}"
            )
        super().__init__(*args, **kwargs)
        prepare_model(self.model)
        self.entropy_penalty = entropy_penalty.to(self.args.device)
        self.entropy_weight_decay = float(entropy_weight_decay)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        theta = self.entropy_penalty.thresholds
        if theta.requires_grad and not any(p is theta for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": [theta], "weight_decay": self.entropy_weight_decay})
        return optimizer

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        attention_mask = inputs.get("attention_mask")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            term = self.entropy_penalty(
                self.accelerator.unwrap_model(model), attention_mask=attention_mask, step=self.state.global_step
            )
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                # The Trainer will not divide this loss by the accumulation steps; a per-batch mean term must be.
                term = term / self.current_gradient_accumulation_steps
            loss = loss + term.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.entropy_penalty.state_dict(), os.path.join(output_dir, PENALTY_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, PENALTY_FILE)):
            state = torch.load(os.path.join(checkpoint, PENALTY_FILE), map_location=self.args.device)
            self.entropy_penalty.load_state_dict(state)  # in place: the optimizer keeps the same θ tensor
        super()._load_optimizer_and_scheduler(checkpoint)

"""Entropy regularization (the paper's Algorithm 1) for an existing LightningModule, as a Trainer callback.

How the loss term gets in. Lightning gives callbacks no way to change the loss (the return value of
``on_before_backward`` is discarded), so at ``setup`` this callback wraps the module's ``training_step`` (an
instance attribute; the class is untouched and the original is put back at ``teardown``). The wrapper calls the
user's step, then returns ``loss + λ_t · penalty``, the penalty being computed from the row entropies the attention
layers recorded during that step's forward. Everything Lightning does to a returned loss therefore applies to the
whole sum: the division by ``accumulate_grad_batches``, the fp16 GradScaler of ``16-mixed``, autocast of
``bf16-mixed`` (the penalty itself is computed in fp32) and the DDP gradient all-reduce.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from entropic.callbacks.wiring import prepare_module
from entropic.functional import (
    DEFAULT_THRESHOLD,
    entropy_and_max_totals,
    head_entropy,
    heads_in_band,
)
from entropic.ops.recording import EntropyRecorder
from entropic.penalty_schedule import (
    DEFAULT_LOSS_COEFF,
    DEFAULT_START_BELOW,
    DEFAULT_WARMUP_STEPS,
    THRESHOLD_INIT_OBSERVED,
    PenaltySchedule,
    check_threshold_init,
)
from entropic.regularizer import (
    attention_logit_parameters,
    entropy_penalty_from_entropies,
    find_attention_dims,
    find_model_thresholds,
    find_recorder,
    make_thresholds,
    query_mask_from_batch,
    validate_penalty_args,
)

__all__ = ["EntropyRegularization"]


class EntropyRegularization(Callback):
    r"""Adds λ·L_entropy (paper, Algorithm 1) to the training loss of any LightningModule.

    The module's model must record attention entropies: our models do, and Hugging Face models using the
    attention interface (GPT-2, Llama, ...) are switched from sdpa/eager to the entropic attention at ``setup``.

    Thresholds θ ([L, H], fractions of E_max = log T): where they live.

    - Our models own ``entropy_thresholds`` (a model parameter): the callback uses them, the user's optimizer
      over ``self.parameters()`` trains them, and they are saved with the model.
    - Any other model (Hugging Face or custom): the callback owns θ. It is not registered on the user's module, so
      the module's ``state_dict`` stays exactly its own and a strict ``MyLM.load_from_checkpoint(path)`` works.
      θ is saved in (and restored from) this callback's state in the Trainer checkpoint, and the callback adds it
      to the first optimizer of ``configure_optimizers`` as a group of its own (weight decay 0; ``param_group``
      sets other options, e.g. ``{"lr": 1e-2}``). Read it as :attr:`thresholds`.

    With ``learnable_thresholds=False`` θ is fixed.

    Manual optimization: the callback cannot add to a loss it never sees, so it raises a clear error unless
    ``training_step`` adds the term itself with ``loss = loss + reg.penalty(self)`` before ``manual_backward``.

    Padded queries (where the batch's ``attention_mask`` is 0) are left out of the penalty.

    Logged every step via ``pl_module.log`` (rank zero's value, no cross-rank sync):
    ``train/entropy_penalty`` (the unweighted penalty), ``train/entropy_penalty_weighted`` (λ_t·penalty, what is
    added to the loss) and ``train/entropy_coeff`` (λ_t). At the log cadence only (every ``log_every_n_steps``):
    ``train/entropy_heads_in_band`` (share of heads within ±γ·E_max of their target) and, with
    ``log_grad_ratio``, ``train/entropy_grad_ratio``: ‖∇(λ·penalty)‖ / ‖∇loss‖ over the parameters that shape the
    attention logits (W_q, W_k or a fused qkv, temperatures), with the full λ, so it shows what the term does
    to those weights against the language-model loss even before it starts (it costs about one extra backward pass
    at each log step).

    Args:
        loss_coeff: λ, default 0.01. The paper's 1e-5 (CodeParrot) and 5e-5 (Languini) multiply per-query
            penalties summed over 128 × 128-token micro-batches, i.e. reduction ``"per_query"``; with the default
            ``"paper"`` reduction (a mean over those queries) the same gradient needs about 16,384 × that (0.16
            for 1e-5). The defaults of λ, θ (``"observed"``), the gate (0.9) and the warm-up (150 steps) are the
            setting the seeded CPU study did not find worse than training without the term; at the paper's λ
            it was worse (docs/reproduction.md). Pass ``start_when_entropy_below=None, warmup_steps=0`` for a
            term active from ``start_step`` at full strength.
        tolerance: γ; deviations within γ·E_max are not penalized. Paper: 0.2.
        reduction: ``"paper"`` (Algorithm 1) or ``"per_query"`` (the authors' released code).
        context_size: T in E_max = log T. None (default): the sequence length of each training batch, i.e. the
            last dimension of the recorded row entropies (the authors' code does the same).
        learnable_thresholds: θ trainable (a parameter) or fixed (a buffer).
        threshold_init: ``"observed"`` (default): at the step the term starts, θ (the model's own or the
            callback's) is set to the head entropies of that step / log T, averaged over all ranks, so every head
            starts on its target (before that, a θ the callback owns holds
            :data:`entropic.functional.DEFAULT_THRESHOLD`); or a fixed initial θ: a float in [0, 1] or an [L, H]
            tensor (ignored when the model owns thresholds).
        param_group: options of θ's optimizer group when the callback owns θ (a dict, e.g. ``{"lr": 1e-2}``;
            ``weight_decay`` defaults to 0). With a model that owns θ: False (default) relies on the user's
            optimizer; True or a dict adds θ to the first optimizer as its own group.
        start_step: optimizer step at which the term starts (before it, λ_t = 0).
        start_fraction: alternative to ``start_step``: a fraction of ``trainer.estimated_stepping_batches``
            (the authors' unreleased code started after 5-10% of the steps).
        start_when_entropy_below: a gate in (0, 1]: from ``start_step`` on, the term starts at the first step
            whose mean row entropy (layers, heads, real queries; averaged over ranks) is below this fraction of
            its causal maximum, i.e. once attention has left uniform. None: no gate.
        warmup_steps: λ_t rises linearly from λ/warmup_steps to λ over this many steps after the start.
        log_grad_ratio: log ``train/entropy_grad_ratio`` at the log cadence.
        num_layers, num_heads: L and H when they cannot be read from the model's config.

    Raises:
        MisconfigurationException: on invalid arguments, or when L and H cannot be determined.

    Example::

        trainer = Trainer(callbacks=[AttentionEntropyMonitor(), EntropyRegularization()])
        trainer.fit(my_lightning_module)
    """

    def __init__(
        self,
        loss_coeff: float = DEFAULT_LOSS_COEFF,
        tolerance: float = 0.2,
        reduction: str = "paper",
        context_size: int | None = None,
        *,
        learnable_thresholds: bool = True,
        threshold_init: float | torch.Tensor | str = THRESHOLD_INIT_OBSERVED,
        param_group: bool | Mapping[str, Any] = False,
        start_step: int = 0,
        start_fraction: float | None = None,
        start_when_entropy_below: float | None = DEFAULT_START_BELOW,
        warmup_steps: int = DEFAULT_WARMUP_STEPS,
        log_grad_ratio: bool = True,
        num_layers: int | None = None,
        num_heads: int | None = None,
    ) -> None:
        problems = []
        try:
            validate_penalty_args(tolerance, reduction, context_size)
        except ValueError as err:
            problems.append(str(err))
        try:
            schedule = PenaltySchedule(loss_coeff, start_step, start_when_entropy_below, warmup_steps)
        except ValueError as err:
            problems.append(str(err))
        if start_fraction is not None and not (
            isinstance(start_fraction, (int, float))
            and not isinstance(start_fraction, bool)
            and 0 <= start_fraction < 1
        ):
            problems.append(f"start_fraction must be in [0, 1) or None, got {start_fraction!r}")
        if start_fraction is not None and start_step:
            problems.append(f"give start_step ({start_step}) or start_fraction ({start_fraction}), not both")
        if not isinstance(param_group, (bool, Mapping)):
            problems.append(f"param_group must be a bool or a dict of optimizer group options, got {param_group!r}")
        try:
            check_threshold_init(threshold_init)
        except ValueError as err:
            problems.append(str(err))
        if not isinstance(log_grad_ratio, bool):
            problems.append(f"log_grad_ratio must be a bool, got {log_grad_ratio!r}")
        if problems:
            raise MisconfigurationException("EntropyRegularization: " + "; ".join(problems))
        self.schedule = schedule
        self.loss_coeff = schedule.loss_coeff
        self.tolerance = float(tolerance)
        self.reduction = reduction
        self.context_size = context_size
        self.learnable_thresholds = learnable_thresholds
        self.threshold_init = threshold_init
        self.param_group = param_group
        self.start_step = start_step
        self.start_fraction = start_fraction
        self.warmup_steps = warmup_steps
        self.log_grad_ratio = log_grad_ratio
        self.num_layers = num_layers
        self.num_heads = num_heads
        self._start_resolved = start_fraction is None
        self._query_mask: torch.Tensor | None = None
        self._recorder: EntropyRecorder | None = None
        self._owned_thresholds: nn.Parameter | None = None
        self._saved_thresholds: torch.Tensor | None = None
        self._penalty_taken = False
        self._thresholds: torch.Tensor | None = None
        self._wrapped: pl.LightningModule | None = None
        self._trainer: pl.Trainer | None = None
        self.last_penalty: float | None = None
        self.last_coeff: float = 0.0

    @property
    def state_key(self) -> str:
        # Not keyed on λ: a run resumed with another coefficient keeps its θ and its schedule position.
        return self._generate_state_key(reduction=self.reduction)

    @property
    def thresholds(self) -> torch.Tensor:
        """θ [L, H]: the module's ``entropy_thresholds`` (available after ``setup``)."""
        if self._thresholds is None:
            raise RuntimeError("EntropyRegularization.thresholds exists only after Trainer setup")
        return self._thresholds

    # ------------------------------------------------------------------ setup / teardown
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        prepare_module(pl_module, "EntropyRegularization")
        for module in pl_module.modules():
            coeff = getattr(getattr(module, "config", None), "entropy_coeff", 0.0)
            if isinstance(coeff, (int, float)) and coeff > 0:
                raise MisconfigurationException(
                    f"EntropyRegularization: {type(module).__name__} already adds entropy_coeff={coeff} · penalty to "
                    "its own loss; set its config's entropy_coeff to 0 and let the callback schedule λ, or drop the "
                    "callback (the term would be counted twice)"
                )
        self._recorder = find_recorder(pl_module)
        if self._recorder is None:
            raise MisconfigurationException(
                f"EntropyRegularization: {type(pl_module).__name__} holds no model that records attention entropies. "
                "Use one of our models or a Hugging Face model (switched to the entropic attention at setup); a "
                "custom model whose attention calls entropic.ops.record_row_entropy needs "
                "entropic.ops.recording.attach_recorder(model) once."
            )
        self._thresholds = self._resolve_thresholds(pl_module)
        self._trainer = trainer
        self._wrap(pl_module)

    def _resolve_thresholds(self, pl_module: pl.LightningModule) -> torch.Tensor:
        owned = find_model_thresholds(pl_module)  # the model's own, or ours from an earlier fit
        if owned is not None:
            return owned
        dims = find_attention_dims(pl_module)
        if self.num_layers is not None or self.num_heads is not None:
            dims = (self.num_layers or (dims or (0, 0))[0], self.num_heads or (dims or (0, 0))[1])
        if dims is None or 0 in dims:
            raise MisconfigurationException(
                f"EntropyRegularization cannot infer the number of layers and heads of {type(pl_module).__name__} "
                "(no Hugging Face config with num_hidden_layers/num_attention_heads found): pass num_layers= and "
                "num_heads=, or give the model an `entropy_thresholds` [L, H] parameter."
            )
        try:
            value = DEFAULT_THRESHOLD if self.threshold_init == THRESHOLD_INIT_OBSERVED else self.threshold_init
            init = make_thresholds(*dims, value)
        except ValueError as err:
            raise MisconfigurationException(f"EntropyRegularization: {err}") from err
        try:
            device = next(pl_module.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        # Held by the callback, not registered on the user's module: the module's state_dict stays its own (a
        # strict load_from_checkpoint works), θ travels in this callback's checkpoint state, and the callback adds
        # it to the first optimizer as a group of its own.
        theta = nn.Parameter(init.to(device), requires_grad=self.learnable_thresholds)
        if self._saved_thresholds is not None:
            with torch.no_grad():
                theta.copy_(self._saved_thresholds.to(device))
        self._owned_thresholds = theta
        return theta

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        if self._wrapped is not None:
            self._unwrap()
        step = pl_module.training_step

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._recorder.clear()
            self._query_mask = query_mask_from_batch(args[0] if args else kwargs.get("batch"))
            return self._add_penalty(pl_module, step(*args, **kwargs))

        if not pl_module.automatic_optimization:

            @functools.wraps(step)
            def training_step(*args: Any, **kwargs: Any) -> Any:
                self._recorder.clear()
                self._query_mask = query_mask_from_batch(args[0] if args else kwargs.get("batch"))
                self._penalty_taken = False
                output = step(*args, **kwargs)
                if not self._penalty_taken:
                    raise MisconfigurationException(
                        f"EntropyRegularization: {type(pl_module).__name__} uses manual optimization, so the "
                        "callback cannot add the entropy penalty to its loss. Add it in training_step, before "
                        "manual_backward: `loss = loss + reg.penalty(self)`, with `reg` this callback "
                        "(e.g. found as self.trainer.callbacks)."
                    )
                return output

        pl_module.training_step = training_step  # instance attribute shadows the class method
        if (self._owned_thresholds is not None and self.learnable_thresholds) or self.param_group is not False:
            configure = pl_module.configure_optimizers

            @functools.wraps(configure)
            def configure_optimizers() -> Any:
                output = configure()
                self._add_param_group(output)
                return output

            pl_module.configure_optimizers = configure_optimizers
        self._wrapped = pl_module

    def _unwrap(self) -> None:
        module = self._wrapped
        if module is None:
            return
        for name in ("training_step", "configure_optimizers"):
            if name in module.__dict__:
                delattr(module, name)
        self._wrapped = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unwrap()

    def _add_param_group(self, optim_conf: Any) -> None:
        optimizer = _first_optimizer(optim_conf)
        if optimizer is None:
            raise MisconfigurationException(
                "EntropyRegularization(param_group=...) found no optimizer in what configure_optimizers returned: "
                f"{type(optim_conf).__name__}"
            )
        theta = self.thresholds
        if any(p is theta for group in optimizer.param_groups for p in group["params"]):
            return  # already trained by the user's optimizer (e.g. over self.parameters())
        options = {"weight_decay": 0.0}
        if isinstance(self.param_group, Mapping):
            options.update(self.param_group)
        optimizer.add_param_group({"params": [theta], **options})

    # ------------------------------------------------------------------ the loss term
    def _resolve_start(self, trainer: pl.Trainer) -> None:
        if self._start_resolved:
            return
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise MisconfigurationException(
                f"EntropyRegularization(start_fraction={self.start_fraction}) needs a finite number of training "
                "steps (set max_steps or max_epochs with a sized dataloader), or use start_step="
            )
        self.schedule.start_step = int(self.start_fraction * total)
        self._start_resolved = True

    def coeff_at(self, step: int) -> float:
        """λ_t at optimizer step ``step`` (0 before the start, then a linear warm-up to ``loss_coeff``)."""
        return self.schedule.coeff(step)

    @property
    def started_at(self) -> int | None:
        """The optimizer step at which the term started, or None."""
        return self.schedule.started_at

    def _reduced(self, trainer: pl.Trainer | None, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over data-parallel ranks."""
        if trainer is None or trainer.world_size == 1:
            return value
        return trainer.strategy.reduce(value, reduce_op="sum")

    def _entropy_fraction(self, trainer: pl.Trainer | None, entropies: list[torch.Tensor]) -> float:
        total, total_max = self._reduced(trainer, entropy_and_max_totals(entropies, self._query_mask)).tolist()
        return total / total_max if total_max > 0 else 1.0

    def _set_observed_thresholds(self, trainer: pl.Trainer | None, entropies: list[torch.Tensor]) -> None:
        mask = self._query_mask
        rows = float(mask.sum()) if mask is not None else entropies[0].shape[0] * entropies[0].shape[-1]
        sums = head_entropy(entropies, mask).double() * rows  # [L, H]
        packed = self._reduced(trainer, torch.cat([sums.flatten(), sums.new_tensor([rows])]))
        means = (packed[:-1] / packed[-1].clamp_min(1)).view_as(sums)
        context = self.context_size or int(entropies[0].shape[-1])
        theta = self.thresholds
        with torch.no_grad():
            theta.copy_((means / math.log(context)).clamp(0.0, 1.0).to(theta.dtype))

    def _is_log_step(self, trainer: pl.Trainer | None) -> bool:
        return (
            trainer is not None
            and bool(getattr(trainer, "training", False))
            and (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0
        )

    def _grad_ratio(self, loss: torch.Tensor, penalty: torch.Tensor) -> float | None:
        """‖∇(λ·penalty)‖ / ‖∇loss‖ over the attention-logit parameters; None when either has no graph."""
        params = attention_logit_parameters(self._recorder)
        if not params or not loss.requires_grad or not penalty.requires_grad:
            return None

        def norm(output: torch.Tensor) -> float:
            grads = torch.autograd.grad(output, params, retain_graph=True, allow_unused=True)
            return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))

        loss_norm = norm(loss)
        return self.loss_coeff * norm(penalty) / loss_norm if loss_norm > 0 else None

    def penalty(self, pl_module: pl.LightningModule, loss: torch.Tensor | None = None) -> torch.Tensor:
        """λ_t · penalty of the forward that just ran in ``training_step`` (the scheduled term, logged).

        With automatic optimization the callback adds it to the returned loss itself. With manual optimization
        call it in ``training_step`` after the forward and before ``manual_backward``::

            loss = loss + reg.penalty(self)

        Args:
            pl_module: the module being trained.
            loss: the language-model loss of the step; only used for the gradient-ratio diagnostic.

        Returns:
            A scalar fp32 tensor with the graph of the forward and of θ (0 · penalty before the start, so θ stays
            in the graph for DDP).
        """
        self._penalty_taken = True
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        if trainer is not None:
            self._resolve_start(trainer)
        entropies = self._recorder.entropies if self._recorder is not None else []
        if not entropies:
            raise RuntimeError(
                f"EntropyRegularization: no attention layer of {type(pl_module).__name__} recorded entropies during "
                "training_step. Its model must run the entropic attention (our models, or a Hugging Face model "
                "using the attention interface, switched at setup); custom attention modules need to call "
                "entropic.ops.record_row_entropy."
            )
        if self.schedule.maybe_start(step, lambda: self._entropy_fraction(trainer, entropies)):
            if self.threshold_init == THRESHOLD_INIT_OBSERVED:
                self._set_observed_thresholds(trainer, entropies)
            rank_zero_info(f"EntropyRegularization: the penalty starts at step {step}.")
        coeff = self.schedule.coeff(step)
        theta = self.thresholds if self.learnable_thresholds else self.thresholds.detach()
        penalty = entropy_penalty_from_entropies(
            entropies,
            theta,
            context_size=self.context_size,
            tolerance=self.tolerance,
            reduction=self.reduction,
            query_mask=self._query_mask,
        )
        detached = penalty.detach()
        self.last_penalty, self.last_coeff = None, coeff
        if trainer is not None and getattr(trainer, "training", False):
            batch_size = int(entropies[0].shape[0])
            log = functools.partial(pl_module.log, on_step=True, on_epoch=False, batch_size=batch_size)
            log("train/entropy_penalty", detached)
            log("train/entropy_penalty_weighted", coeff * detached)
            log("train/entropy_coeff", coeff)
            if self._is_log_step(trainer):
                self.last_penalty = float(detached)
                context = self.context_size or int(entropies[0].shape[-1])
                in_band = heads_in_band(
                    head_entropy(entropies, self._query_mask), theta, context_size=context, tolerance=self.tolerance
                )
                log("train/entropy_heads_in_band", in_band)
                if self.log_grad_ratio and loss is not None:
                    ratio = self._grad_ratio(loss, penalty)
                    if ratio is not None:
                        log("train/entropy_grad_ratio", ratio)
        return coeff * penalty

    def _add_penalty(self, pl_module: pl.LightningModule, output: Any) -> Any:
        if output is None:  # the user skipped this batch
            return output
        loss = output["loss"] if isinstance(output, Mapping) else output
        if not isinstance(loss, torch.Tensor):
            raise MisconfigurationException(
                "EntropyRegularization expects training_step to return a loss tensor or a dict with a 'loss' tensor, "
                f"got {type(output).__name__}"
            )
        # Always added, even with λ_t = 0, so θ stays in the graph (DDP expects every parameter used).
        total = loss + self.penalty(pl_module, loss).to(loss.dtype)
        if isinstance(output, Mapping):
            return {**output, "loss": total}
        return total

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.schedule.state_dict(),
            "start_step": self.schedule.start_step if self._start_resolved else None,
            "last_coeff": self.last_coeff,
            "last_penalty": self.last_penalty,
            "thresholds": None if self._owned_thresholds is None else self._owned_thresholds.detach().cpu().clone(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The schedule position itself is trainer.global_step, which Lightning restores; keep the resolved start
        # so a start_fraction does not move if the run is resumed with a different step budget, and the step at
        # which a gated term started.
        self.schedule.load_state_dict(state_dict)
        if state_dict.get("start_step") is not None:
            self.schedule.start_step = int(state_dict["start_step"])
            self._start_resolved = True
        self.last_coeff = state_dict.get("last_coeff", self.last_coeff)
        saved = state_dict.get("thresholds")
        if saved is not None:  # θ owned by this callback (foreign models); restored in place, the optimizer holds it
            self._saved_thresholds = saved
            if self._owned_thresholds is not None:
                with torch.no_grad():
                    self._owned_thresholds.copy_(saved.to(self._owned_thresholds.device))
        self.last_penalty = state_dict.get("last_penalty", self.last_penalty)


def _first_optimizer(conf: Any) -> torch.optim.Optimizer | None:
    if isinstance(conf, torch.optim.Optimizer):
        return conf
    if isinstance(conf, Mapping):
        return _first_optimizer(conf.get("optimizer"))
    if isinstance(conf, (list, tuple)):
        for item in conf:
            found = _first_optimizer(item)
            if found is not None:
                return found
    return None

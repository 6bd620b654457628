"""The entropy penalty of a model's last forward, for plain PyTorch and Hugging Face training loops.

This is the single implementation behind :class:`entropic.EntropyRegularization` (the Lightning callback);
use it directly when you do not train with Lightning. Attention layers that run the entropic attention
(our models, and Hugging Face models switched with :func:`prepare_model`) record each query row's entropy
during forward, with its autograd graph, so the penalty back-propagates into the attention without
``output_attentions`` and without materializing any attention matrix.

Example (plain PyTorch / Hugging Face)::

    from transformers import GPT2Config, GPT2LMHeadModel
    from entropic.regularizer import EntropyPenalty, prepare_model

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64))
    prepare_model(model)                                # sdpa/eager -> the entropy-recording attention
    penalty = EntropyPenalty.for_model(model)           # learnable thresholds [L, H], init DEFAULT_THRESHOLD
    opt = torch.optim.AdamW([*model.parameters(), *penalty.parameters()], lr=1e-3)
    for batch in loader:
        loss = model(**batch).loss
        loss = loss + 0.01 * penalty(model, attention_mask=batch["attention_mask"])  # λ · L_entropy (Alg. 1)
        loss.backward(); opt.step(); opt.zero_grad()

With ``loss_coeff`` set, the module applies the schedule itself (a gated start, a λ warm-up, θ from the observed
entropies) and returns λ_t · L_entropy; call it once per optimizer step, or pass ``step=``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from entropic.functional import (
    DEFAULT_THRESHOLD,
    REDUCTIONS,
    entropy_penalty,
    head_entropy,
    mean_entropy_fraction,
)
from entropic.hf import use_entropic_attention
from entropic.ops.recording import EntropyRecorder, clear_row_entropies, collect_row_entropies, find_recorder
from entropic.penalty_schedule import THRESHOLD_INIT_OBSERVED, PenaltySchedule, check_threshold_init

__all__ = [
    "EntropyPenalty",
    "clear_row_entropies",
    "collect_row_entropies",
    "entropy_penalty_from_entropies",
    "entropy_penalty_from_model",
    "find_attention_dims",
    "find_model_thresholds",
    "find_recorder",
    "prepare_model",
    "query_mask_from_batch",
    "thresholds_from_entropies",
]

THRESHOLDS_ATTR = "entropy_thresholds"
"""Name under which models (ours) own learnable [L, H] thresholds, and the callback registers its own."""


# --------------------------------------------------------------------------------------------------
# Model discovery and switching to the entropic attention.
# --------------------------------------------------------------------------------------------------
def _hf_models(model: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face PreTrainedModels inside ``model`` (``model`` itself included)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        nested = any(prefix == "" or name.startswith(prefix + ".") for prefix, _ in found)
        if isinstance(module, PreTrainedModel) and not nested:
            found.append((name, module))
    return [m for _, m in found]


def find_attention_dims(model: nn.Module) -> tuple[int, int] | None:
    """(num_layers, num_heads) from the config of the (first) transformer in ``model``, or None if unknown."""
    for sub in _hf_models(model) or [model]:
        config = getattr(sub, "config", None)
        if config is None:
            continue
        layers = next((getattr(config, a) for a in ("num_hidden_layers", "n_layer") if hasattr(config, a)), None)
        heads = next((getattr(config, a) for a in ("num_attention_heads", "n_head") if hasattr(config, a)), None)
        if isinstance(layers, int) and isinstance(heads, int):
            return layers, heads
    return None


def find_model_thresholds(model: nn.Module) -> torch.Tensor | None:
    """The [L, H] ``entropy_thresholds`` a model owns (our models may), searched over its submodules."""
    for module in model.modules():
        value = getattr(module, THRESHOLDS_ATTR, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def prepare_model(model: nn.Module) -> list[str]:
    """Makes every transformer in ``model`` record per-row attention entropies during forward.

    Hugging Face models running ``sdpa`` or ``eager`` (or any other built-in attention) are switched to the
    ``"entropic"`` attention implementation; our own models already record. Each gets a recorder
    (:func:`entropic.ops.recording.find_recorder`). Idempotent.

    Returns:
        A description of each model that was switched, e.g. ``["GPT2LMHeadModel: sdpa -> entropic"]``;
        empty when nothing had to change.
    """
    changed = []
    for hf_model in _hf_models(model):
        before = getattr(hf_model.config, "_attn_implementation", None)
        if use_entropic_attention(hf_model):
            after = getattr(hf_model.config, "_attn_implementation", None)
            changed.append(f"{type(hf_model).__name__}: {before} -> {after}")
    return changed


# --------------------------------------------------------------------------------------------------
# Public penalty API.
# --------------------------------------------------------------------------------------------------
def validate_penalty_args(tolerance: float, reduction: str, context_size: int | None) -> None:
    """Raises ValueError naming the bad value and what is allowed."""
    if not 0.0 <= float(tolerance) < 1.0:
        raise ValueError(f"tolerance must be in [0, 1) (a fraction of log(context_size)), got {tolerance!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if context_size is not None and (not isinstance(context_size, int) or context_size < 2):
        raise ValueError(
            f"context_size must be an int >= 2 or None (the batch's sequence length), got {context_size!r}"
        )


def entropy_penalty_from_model(
    model: nn.Module,
    thresholds: torch.Tensor,
    *,
    context_size: int | None = None,
    tolerance: float = 0.2,
    reduction: str = "paper",
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unweighted entropy penalty (paper, Algorithm 1) of ``model``'s last forward.

    Args:
        model: a model whose attention layers record row entropies (see :func:`prepare_model`).
        thresholds: [L, H] fractions θ of E_max; each head is pulled towards θ·E_max.
        context_size: T in E_max = log(T). None (default) uses the sequence length of the last forward.
        tolerance: γ; deviations within γ·E_max are not penalized.
        reduction: ``"paper"`` (squared deviation of the query-averaged head entropy, mean over heads and
            layers) or ``"per_query"`` (the authors' released code: per query, summed over batch and queries).
        query_mask: optional bool [B, T], True for real tokens (the batch's ``attention_mask``); padded queries
            are left out.

    Returns:
        A scalar fp32 tensor with the autograd graph of the forward and of ``thresholds``.

    Raises:
        RuntimeError: no attention layer of ``model`` recorded entropies in its last forward.
        ValueError: bad arguments, or thresholds whose shape does not match [L, H].
    """
    validate_penalty_args(tolerance, reduction, context_size)
    entropies = recorded_entropies(model)
    return entropy_penalty_from_entropies(
        entropies,
        thresholds,
        context_size=context_size,
        tolerance=tolerance,
        reduction=reduction,
        query_mask=query_mask,
    )


def recorded_entropies(model: nn.Module) -> list[torch.Tensor]:
    """The row entropies of ``model``'s last forward (L of [B, H, T]); RuntimeError when it recorded none."""
    entropies = collect_row_entropies(model)
    if not entropies:
        raise RuntimeError(
            f"{type(model).__name__} recorded no attention entropies in its last forward: call "
            "entropic.regularizer.prepare_model(model) first (it switches Hugging Face models from sdpa/eager "
            "to the entropic attention), and compute the penalty after a forward pass."
        )
    return entropies


def entropy_penalty_from_entropies(
    row_entropies: Sequence[torch.Tensor] | torch.Tensor,
    thresholds: torch.Tensor,
    *,
    context_size: int | None = None,
    tolerance: float = 0.2,
    reduction: str = "paper",
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Like :func:`entropy_penalty_from_model`, from L recorded [B, H, T] row entropies (or one [L, B, H, T])."""
    row_entropy = (
        torch.stack([e.float() for e in row_entropies])
        if not isinstance(row_entropies, torch.Tensor)
        else row_entropies.float()
    )
    expected = (row_entropy.shape[0], row_entropy.shape[2])
    if tuple(thresholds.shape) != expected:
        raise ValueError(
            f"thresholds must have shape [L, H] = {list(expected)} for this model, got {list(thresholds.shape)}"
        )
    context = context_size if context_size is not None else row_entropy.shape[-1]
    return entropy_penalty(
        row_entropy,
        thresholds.to(row_entropy.device),
        context_size=context,
        tolerance=tolerance,
        reduction=reduction,
        query_mask=query_mask,
    )


def query_mask_from_batch(batch: Any) -> torch.Tensor | None:
    """The bool [B, T] mask of real tokens of a batch (its ``attention_mask``), or None when it has none."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.to(torch.bool)
    return None


def thresholds_from_entropies(
    row_entropies: Sequence[torch.Tensor] | torch.Tensor, context_size: int, query_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """θ [L, H] that puts every head exactly on its target: the observed head entropy / log T, clipped to [0, 1]."""
    return (head_entropy(row_entropies, query_mask) / math.log(context_size)).clamp(0.0, 1.0).detach()


_QUERY_KEY_NAME_PARTS = ("q_proj", "k_proj", "query", "key", "c_attn", "qkv", "temperature")


def attention_logit_parameters(recorder: EntropyRecorder) -> list[nn.Parameter]:
    """The parameters that shape the attention logits (W_q, W_k, fused qkv, temperature) of the recording layers.

    Found by name inside the modules that recorded entropies in the recorder's last forward; a fused qkv
    projection (GPT-2's ``c_attn``) counts whole. Falls back to every parameter of those modules when no name
    matches.
    """
    modules = recorder.modules()
    found = [
        p
        for module in modules
        for name, p in module.named_parameters()
        if p.requires_grad and any(part in name for part in _QUERY_KEY_NAME_PARTS)
    ]
    return found or [p for module in modules for p in module.parameters() if p.requires_grad]


class EntropyPenalty(nn.Module):
    """Learnable (or fixed) per-(layer, head) thresholds and the penalty of a model's last forward.

    Without ``loss_coeff`` it returns the unweighted penalty and the caller multiplies by λ. With ``loss_coeff`` it
    follows a :class:`~entropic.penalty_schedule.PenaltySchedule` and returns λ_t · penalty.

    Args:
        num_layers: L.
        num_heads: H.
        init: initial θ (a fraction of E_max = log T): a float in [0, 1], an [L, H] tensor, or ``"observed"``
            (θ set from the head entropies of the step at which the penalty starts; needs ``loss_coeff``).
            Default :data:`entropic.functional.DEFAULT_THRESHOLD`.
        learnable: whether θ is an ``nn.Parameter`` (else a buffer, saved but not trained).
        tolerance: γ (the paper uses 0.2).
        reduction: ``"paper"`` or ``"per_query"``.
        context_size: T in E_max = log T; None uses the sequence length of the last forward.
        loss_coeff: λ; None returns the unweighted penalty (and takes no schedule options).
        start_step, start_when_entropy_below, warmup_steps: the schedule (see
            :class:`~entropic.penalty_schedule.PenaltySchedule`); steps count calls of ``forward`` unless
            ``step=`` is passed.

    Raises:
        ValueError: a bad value, named with what is allowed.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        *,
        init: float | torch.Tensor | str = DEFAULT_THRESHOLD,
        learnable: bool = True,
        tolerance: float = 0.2,
        reduction: str = "paper",
        context_size: int | None = None,
        loss_coeff: float | None = None,
        start_step: int = 0,
        start_when_entropy_below: float | None = None,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        validate_penalty_args(tolerance, reduction, context_size)
        check_threshold_init(init)
        scheduled = (
            start_step or start_when_entropy_below is not None or warmup_steps or init == THRESHOLD_INIT_OBSERVED
        )
        if loss_coeff is None and scheduled:
            raise ValueError(
                "start_step, start_when_entropy_below, warmup_steps and init='observed' need loss_coeff= (the "
                "module then returns λ_t · penalty); got loss_coeff=None"
            )
        self.tolerance, self.reduction, self.context_size = float(tolerance), reduction, context_size
        self.schedule = (
            None
            if loss_coeff is None
            else PenaltySchedule(loss_coeff, start_step, start_when_entropy_below, warmup_steps)
        )
        self.observed_init = init == THRESHOLD_INIT_OBSERVED
        thresholds = make_thresholds(num_layers, num_heads, DEFAULT_THRESHOLD if self.observed_init else init)
        if learnable:
            self.thresholds = nn.Parameter(thresholds)
        else:
            self.register_buffer("thresholds", thresholds)
        self.calls = 0

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> EntropyPenalty:
        """Builds thresholds sized from ``model``'s config (num_hidden_layers / num_attention_heads)."""
        dims = find_attention_dims(model)
        if dims is None:
            raise ValueError(f"cannot infer (layers, heads) from {type(model).__name__}; pass them explicitly")
        return cls(*dims, **kwargs)

    def forward(
        self, model: nn.Module, *, attention_mask: torch.Tensor | None = None, step: int | None = None
    ) -> torch.Tensor:
        """The penalty of ``model``'s last forward: unweighted, or λ_t · penalty with ``loss_coeff``.

        Args:
            model: the model that just ran forward (see :func:`prepare_model`).
            attention_mask: the batch's [B, T] mask (1 = token); padded queries are left out.
            step: the optimizer step, for the schedule; default: the number of earlier calls.
        """
        query_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        entropies = recorded_entropies(model)
        step = self.calls if step is None else step
        self.calls += 1
        coeff = 1.0
        if self.schedule is not None:
            started = self.schedule.maybe_start(step, lambda: mean_entropy_fraction(entropies, query_mask))
            if started and self.observed_init:
                context = self.context_size or int(entropies[0].shape[-1])
                with torch.no_grad():
                    self.thresholds.copy_(thresholds_from_entropies(entropies, context, query_mask))
            coeff = self.schedule.coeff(step)
        penalty = entropy_penalty_from_entropies(
            entropies,
            self.thresholds,
            context_size=self.context_size,
            tolerance=self.tolerance,
            reduction=self.reduction,
            query_mask=query_mask,
        )
        return penalty if self.schedule is None else coeff * penalty

    def get_extra_state(self) -> dict[str, Any]:
        return {"calls": self.calls, "schedule": None if self.schedule is None else self.schedule.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", self.calls))
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])


def make_thresholds(num_layers: int, num_heads: int, init: float | torch.Tensor) -> torch.Tensor:
    """An fp32 [L, H] tensor of initial thresholds; raises ValueError on a bad shape or value."""
    if not (isinstance(num_layers, int) and isinstance(num_heads, int) and num_layers > 0 and num_heads > 0):
        raise ValueError(f"num_layers and num_heads must be positive ints, got {num_layers!r}, {num_heads!r}")
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (num_layers, num_heads):
            raise ValueError(f"threshold init must have shape [{num_layers}, {num_heads}], got {list(init.shape)}")
        return init.detach().float().clone()
    if not isinstance(init, (int, float)) or not math.isfinite(init):
        raise ValueError(f"threshold init must be a finite float or an [L, H] tensor, got {init!r}")
    return torch.full((num_layers, num_heads), float(init))

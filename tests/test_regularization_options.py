"""The regularizer's options (issue: a gated start, a λ warm-up, θ from observed entropies, padding, diagnostics).

Each option rejects bad values by name; the gate fires at the step attention leaves uniform; θ "observed" puts
every head on its target; padded queries, right or left, do not change the penalty of the real tokens.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from entropic.callbacks import AttentionEntropyMonitor, EntropyRegularization
from entropic.functional import (
    DEFAULT_THRESHOLD,
    entropy_penalty,
    head_entropy,
    mean_entropy_fraction,
)
from entropic.models import EntropicConfig, EntropicForCausalLM
from entropic.penalty_schedule import THRESHOLD_INIT_OBSERVED, PenaltySchedule
from entropic.regularizer import EntropyPenalty

VOCAB, T, B = 64, 16, 4
SIZES = {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": VOCAB, "n_positions": T}


def tiny_model(preset: str = "SM+LN+G", **overrides) -> EntropicForCausalLM:
    torch.manual_seed(0)
    return EntropicForCausalLM(EntropicConfig.from_preset(preset, **{**SIZES, **overrides}))


# ------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_when_entropy_below": 0.0}, r"start_when_entropy_below must be a fraction .* in \(0, 1\].*got 0\.0"),
        ({"start_when_entropy_below": 1.5}, r"start_when_entropy_below .* got 1\.5"),
        ({"start_when_entropy_below": "half"}, r"start_when_entropy_below .* got 'half'"),
        ({"warmup_steps": -1}, r"warmup_steps must be an int >= 0, got -1"),
        ({"warmup_steps": 2.5}, r"warmup_steps must be an int >= 0, got 2\.5"),
        ({"start_step": -3}, r"start_step must be an int >= 0, got -3"),
        ({"loss_coeff": float("nan")}, r"loss_coeff must be a finite number >= 0, got nan"),
        ({"loss_coeff": -0.1}, r"loss_coeff must be a finite number >= 0, got -0\.1"),
        ({"threshold_init": "mean"}, r"threshold_init='mean' is not supported; allowed: .*'observed'"),
        ({"threshold_init": 1.5}, r"threshold_init must be a number in \[0, 1\].*got 1\.5"),
        ({"log_grad_ratio": "yes"}, r"log_grad_ratio must be a bool, got 'yes'"),
    ],
)
def test_callback_rejects_bad_values_by_name(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        EntropyRegularization(**{"loss_coeff": 0.1, **kwargs})


def test_plain_penalty_rejects_bad_values_and_schedules_without_a_coefficient():
    with pytest.raises(ValueError, match=r"start_when_entropy_below .* got 2"):
        EntropyPenalty(2, 2, loss_coeff=0.1, start_when_entropy_below=2)
    with pytest.raises(ValueError, match=r"threshold_init='median' is not supported"):
        EntropyPenalty(2, 2, init="median")
    with pytest.raises(ValueError, match=r"need loss_coeff="):
        EntropyPenalty(2, 2, warmup_steps=10)
    with pytest.raises(ValueError, match=r"need loss_coeff="):
        EntropyPenalty(2, 2, init="observed")


def test_one_default_threshold_everywhere():
    assert EntropicConfig().threshold_init == DEFAULT_THRESHOLD
    assert EntropyRegularization().threshold_init == THRESHOLD_INIT_OBSERVED  # set from the entropies at the start
    assert torch.all(EntropyPenalty(2, 3).thresholds == DEFAULT_THRESHOLD)
    model = tiny_model("SM(t)+ScFuFFN")
    assert torch.all(model.entropy_thresholds == DEFAULT_THRESHOLD)


# ------------------------------------------------------------------------------------------ schedule
def test_schedule_waits_for_the_start_step_and_the_gate_then_warms_up():
    schedule = PenaltySchedule(1.0, start_step=10, start_when_entropy_below=0.8, warmup_steps=4)
    fractions = {step: (0.95 if step < 12 else 0.7) for step in range(20)}
    calls = []

    def fraction_at(step):
        def read():
            calls.append(step)
            return fractions[step]

        return read

    coeffs = []
    for step in range(20):
        schedule.maybe_start(step, fraction_at(step))
        coeffs.append(schedule.coeff(step))
    assert schedule.started_at == 12
    assert calls == [10, 11, 12]  # the entropy is read only while the gate waits, and only from start_step on
    assert coeffs[:12] == [0.0] * 12
    assert coeffs[12:17] == [0.25, 0.5, 0.75, 1.0, 1.0]
    restored = PenaltySchedule(1.0, start_when_entropy_below=0.8)
    restored.load_state_dict(schedule.state_dict())
    assert restored.coeff(12) == 1.0 and restored.coeff(11) == 0.0


def test_mean_entropy_fraction_is_one_for_uniform_and_zero_for_one_hot_attention():
    uniform = torch.arange(1, T + 1).float().log().expand(2, B, 3, T)  # [L, B, H, T]: log(keys) per query
    assert mean_entropy_fraction(uniform) == pytest.approx(1.0)
    assert mean_entropy_fraction(torch.zeros(2, B, 3, T)) == 0.0
    assert mean_entropy_fraction(uniform * 0.5) == pytest.approx(0.5)


class _SharpenAttention(Callback):
    """At optimizer step ``at``, makes every head's attention far from uniform (large query/key weights)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                for block in pl_module.model.transformer.h:
                    block.attn.q_proj.weight.normal_(0, 3.0)
                    block.attn.k_proj.weight.normal_(0, 3.0)


class _TinyLM(pl.LightningModule):
    """A user's module: our model, SGD with lr 0 (weights change only when a test says so)."""

    def __init__(self, model: EntropicForCausalLM) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Records(Logger):
    name, version = "records", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


def _batches(n: int, padding: str | None = None) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (B, T), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if padding is not None:
            batch.update(_pad(ids, padding))
        out.append(batch)
    return out


def _fit(model, callbacks, batches, ckpt_path=None, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **{"logger": False, "log_every_n_steps": 1, "enable_checkpointing": False, **kwargs},
    )
    trainer.fit(_TinyLM(model), torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def _zero_query_keys(model: EntropicForCausalLM) -> EntropicForCausalLM:
    """Uniform causal attention: every logit is 0."""
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.q_proj, block.attn.k_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return model


def test_gate_fires_at_the_step_attention_leaves_uniform():
    model = _zero_query_keys(tiny_model())
    reg = EntropyRegularization(
        loss_coeff=0.5,
        start_when_entropy_below=0.9,
        warmup_steps=2,
        log_grad_ratio=False,
        threshold_init=DEFAULT_THRESHOLD,
    )
    logger = _Records()
    _fit(model, [reg, _SharpenAttention(at=3)], _batches(6), logger=logger)
    assert reg.started_at == 3
    coeffs = {step: m["train/entropy_coeff"] for step, m in logger.rows if "train/entropy_coeff" in m}
    assert [coeffs[s] for s in range(6)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.5]


def test_gate_never_fires_while_attention_stays_uniform():
    reg = EntropyRegularization(
        loss_coeff=0.5,
        start_when_entropy_below=0.99,
        log_grad_ratio=False,
        warmup_steps=0,
        threshold_init=DEFAULT_THRESHOLD,
    )
    _fit(_zero_query_keys(tiny_model()), [reg], _batches(3))
    assert reg.started_at is None and reg.last_coeff == 0.0


def test_observed_thresholds_put_every_head_on_its_target_at_the_start():
    model = tiny_model("SM(t)+ScFuFFN")
    reg = EntropyRegularization(
        loss_coeff=0.5,
        start_step=2,
        threshold_init="observed",
        log_grad_ratio=False,
        start_when_entropy_below=None,
        warmup_steps=0,
    )
    seen = {}

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # after the optimizer step of step 2 (lr 0: nothing moved)
                with torch.no_grad():
                    out = pl_module.model(**batch)
                seen["heads"] = head_entropy(list(out.row_entropies))
                seen["theta"] = model.entropy_thresholds.detach().clone()
                seen["penalty"] = reg.last_penalty

    batches = _batches(4)
    for batch in batches:  # the same batch every step, so the entropies at the start are those of the probe
        batch["input_ids"], batch["labels"] = batches[0]["input_ids"], batches[0]["labels"]
    _fit(model, [reg, Probe()], batches)
    assert reg.started_at == 2
    torch.testing.assert_close(seen["theta"], (seen["heads"] / math.log(T)).clamp(0, 1), rtol=0, atol=1e-6)
    assert not torch.allclose(seen["theta"], torch.full_like(seen["theta"], DEFAULT_THRESHOLD))


def test_diagnostics_are_logged_at_the_log_cadence_only():
    model = tiny_model("SM(t)+ScFuFFN")
    reg = EntropyRegularization(
        loss_coeff=0.5, start_when_entropy_below=None, warmup_steps=0, threshold_init=DEFAULT_THRESHOLD
    )
    logger = _Records()
    _fit(model, [reg], _batches(6), logger=logger, log_every_n_steps=3)
    ratios = {step: m["train/entropy_grad_ratio"] for step, m in logger.rows if "train/entropy_grad_ratio" in m}
    bands = {step: m["train/entropy_heads_in_band"] for step, m in logger.rows if "train/entropy_heads_in_band" in m}
    assert sorted(ratios) == sorted(bands) == [2, 5]
    assert all(r > 0 and math.isfinite(r) for r in ratios.values())
    assert all(0.0 <= b <= 1.0 for b in bands.values())


def test_grad_ratio_equals_an_independent_computation():
    """λ·‖∇P‖/‖∇CE‖ over W_q, W_k and the temperature, recomputed here from the model's own forward."""
    model = tiny_model("SM(t)+ScFuFFN")
    batch = _batches(1)[0]
    out = model(**batch)
    params = [p for n, p in model.named_parameters() if any(s in n for s in ("q_proj", "k_proj", "temperature"))]
    penalty = entropy_penalty(
        list(out.row_entropies), model.entropy_thresholds, context_size=T, tolerance=0.2, reduction="paper"
    )

    def norm(value):
        grads = torch.autograd.grad(value, params, retain_graph=True)
        return math.sqrt(sum(float(g.square().sum()) for g in grads))

    expected = 0.5 * norm(penalty) / norm(out.loss)
    reg = EntropyRegularization(
        loss_coeff=0.5, start_when_entropy_below=None, warmup_steps=0, threshold_init=DEFAULT_THRESHOLD
    )
    logger = _Records()
    _fit(model, [reg], [batch], logger=logger)
    (logged,) = [m["train/entropy_grad_ratio"] for _, m in logger.rows if "train/entropy_grad_ratio" in m]
    assert logged == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------ padding
LENGTHS = (16, 11, 7, 3)


def _pad(ids: torch.Tensor, side: str) -> dict[str, torch.Tensor]:
    """Right or left padding of rows with LENGTHS real tokens; left padding keeps each token's position."""
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, T - length :] = 1
    out = {"attention_mask": mask}
    if side == "left":
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return out


def _real_token_entropies(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [1, H, sum(LENGTHS)]: each row's real tokens run alone, without padding, then concatenated."""
    rows = [model(ids[i : i + 1, :length]).row_entropies for i, length in enumerate(LENGTHS)]
    return [torch.cat([r[layer] for r in rows], dim=-1) for layer in range(len(rows[0]))]


@pytest.mark.parametrize("reduction", ["paper", "per_query"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_the_penalty_of_the_real_tokens(side, reduction):
    model = tiny_model("SM(t)+ScFuFFN").eval()
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(3))
    padding = _pad(ids, side)
    penalty = EntropyPenalty(2, 2, init=torch.tensor([[0.2, 0.4], [0.6, 0.3]]), reduction=reduction, context_size=T)
    with torch.no_grad():
        model(ids, **padding)
        padded = penalty(model, attention_mask=padding["attention_mask"])
        unmasked = penalty(model)
        reference = entropy_penalty(
            _real_token_entropies(model, ids),
            penalty.thresholds,
            context_size=T,
            tolerance=0.2,
            reduction=reduction,
        )
    torch.testing.assert_close(padded, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked, reference, rtol=1e-3)  # the padded queries would have changed it


@pytest.mark.parametrize("side", ["right", "left"])
def test_monitor_means_and_callback_penalty_leave_padding_out(side):
    batches = _batches(1, padding=side)
    model = tiny_model("SM(t)+ScFuFFN")
    with torch.no_grad():
        reference_heads = head_entropy(_real_token_entropies(model.eval(), batches[0]["input_ids"]))
        model(**batches[0])
        theta = model.entropy_thresholds
        reference_penalty = entropy_penalty(
            _real_token_entropies(model, batches[0]["input_ids"]), theta, context_size=T, reduction="paper"
        )
    model.train()
    monitor = AttentionEntropyMonitor(write_figures=False)
    reg = EntropyRegularization(
        loss_coeff=0.5,
        log_grad_ratio=False,
        start_when_entropy_below=None,
        warmup_steps=0,
        threshold_init=DEFAULT_THRESHOLD,
    )
    _fit(model, [monitor, reg], batches)
    logged = torch.tensor(monitor.history[-1]["head_mean"], dtype=torch.float32)
    torch.testing.assert_close(logged, reference_heads, rtol=1e-5, atol=1e-6)
    assert reg.last_penalty == pytest.approx(float(reference_penalty), rel=1e-5)


# ------------------------------------------------------------------------------------------ plain PyTorch
def test_plain_penalty_schedule_returns_the_weighted_term():
    model = tiny_model("SM(t)+ScFuFFN")
    batch = _batches(1)[0]
    penalty = EntropyPenalty(2, 2, loss_coeff=2.0, start_step=1, warmup_steps=2, context_size=T)
    values = []
    for _ in range(4):
        model(**batch)
        values.append(penalty(model).detach())
    model(**batch)
    unweighted = EntropyPenalty(2, 2, context_size=T)(model)
    assert float(values[0]) == 0.0
    torch.testing.assert_close(values[1], 1.0 * unweighted)  # λ/2 at the first step of the warm-up
    torch.testing.assert_close(values[2], 2.0 * unweighted)
    assert penalty.schedule.started_at == 1
    restored = EntropyPenalty(2, 2, loss_coeff=2.0, start_step=1, warmup_steps=2, context_size=T)
    restored.load_state_dict(penalty.state_dict())
    assert restored.calls == 4 and restored.schedule.started_at == 1


def test_plain_penalty_observed_init_and_gate():
    model = _zero_query_keys(tiny_model())
    batch = _batches(1)[0]
    penalty = EntropyPenalty(2, 2, loss_coeff=1.0, init="observed", start_when_entropy_below=0.9, context_size=T)
    out = model(**batch)
    assert float(penalty(model)) == 0.0 and penalty.schedule.started_at is None  # uniform: the gate waits
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.q_proj.weight.normal_(0, 3.0)
            block.attn.k_proj.weight.normal_(0, 3.0)
    out = model(**batch)
    assert float(penalty(model)) == 0.0  # started, and every head sits on its observed target
    assert penalty.schedule.started_at == 1
    expected = (head_entropy(list(out.row_entropies)) / math.log(T)).clamp(0, 1)
    torch.testing.assert_close(penalty.thresholds.detach(), expected)


def test_a_resumed_run_keeps_its_gated_start_and_observed_thresholds(tmp_path):
    """A run resumed after the gate fired neither fires it again nor re-observes θ: the warm-up goes on."""

    def regularization() -> EntropyRegularization:
        return EntropyRegularization(
            loss_coeff=0.5, start_when_entropy_below=0.9, warmup_steps=4, threshold_init="observed", log_grad_ratio=False
        )  # fmt: skip

    model, reg = _zero_query_keys(tiny_model("SM(t)+ScFuFFN")), regularization()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    _fit(model, [reg, _SharpenAttention(at=2), checkpoints], _batches(6), enable_checkpointing=True)
    assert reg.started_at == 2
    theta = model.entropy_thresholds.detach().clone()  # set at step 2; SGD with lr 0 keeps it

    resumed_model, resumed = _zero_query_keys(tiny_model("SM(t)+ScFuFFN")), regularization()
    logger = _Records()
    _fit(resumed_model, [resumed], _batches(6), ckpt_path=next(tmp_path.glob("*step=4.ckpt")), logger=logger)
    assert resumed.started_at == 2
    torch.testing.assert_close(resumed_model.entropy_thresholds, theta, rtol=0, atol=0)
    coeffs = [m["train/entropy_coeff"] for _, m in logger.rows if "train/entropy_coeff" in m]
    assert coeffs == pytest.approx([0.5 * 3 / 4, 0.5])  # steps 4 and 5 of a warm-up that started at step 2

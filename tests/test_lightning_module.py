"""The recipes' LightningModule: AdamW groups and the paper's learning-rate schedule (transformers' own)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from entropic.lightning_module import EntropicLM

SIZES = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 16, "vocab_size": 64}


def _lrs(module: EntropicLM, total: int) -> list[float]:
    module._trainer = SimpleNamespace(estimated_stepping_batches=total)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_linear_warmup_then_linear_decay_to_the_floor():
    module = EntropicLM("SM(t)+ScFuFFN", **SIZES, learning_rate=1e-3, warmup_fraction=0.1, min_lr_fraction=0.1)
    lrs = _lrs(module, 100)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway through the decay
    assert lrs[100] == pytest.approx(1e-4)
    assert all(b <= a for a, b in itertools.pairwise(lrs[10:]))


def test_constant_after_warmup_when_the_floor_is_the_peak():
    module = EntropicLM("SM+LN+G", **SIZES, learning_rate=2e-3, warmup_fraction=0.05, min_lr_fraction=1.0)
    lrs = _lrs(module, 40)
    assert lrs[0] == 0.0 and lrs[2:] == [pytest.approx(2e-3)] * 39


def test_thresholds_and_scalars_are_not_decayed():
    module = EntropicLM("SM(t)+ScFuFFN", **SIZES)
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "model.transformer.entropy_thresholds",
        "model.transformer.h.0.ffn_scale.alpha",
        "model.transformer.h.0.attn.temperature.log_temperature",
    }
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == pytest.approx(0.1)


def test_flops_per_batch_is_the_palm_estimate():
    """6 FLOPs per matmul weight per token (all projections and the tied LM head, no embedding lookups) plus
    12·L·d·T per token for the attention scores, read by Lightning's ThroughputMonitor."""
    module = EntropicLM("SM+LN+G", **SIZES)
    L, d, V = SIZES["n_layer"], SIZES["n_embd"], SIZES["vocab_size"]
    rows, seq = 3, 16
    module.on_train_batch_start({"input_ids": torch.zeros(rows, seq, dtype=torch.long)}, 0)
    per_token = 6 * (12 * L * d * d + V * d) + 12 * L * d * seq
    assert module.flops_per_batch == per_token * rows * seq

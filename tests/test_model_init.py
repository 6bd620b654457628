"""Weight init follows GPT-2 for every preset, and the baseline preset is GPT-2 itself (same logits)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import GPT2Config, GPT2LMHeadModel

from entropic.models import EntropicConfig, EntropicForCausalLM, preset_names

SIZES = {"n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 512, "n_positions": 64}
STD = 0.02


def _initialized_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight the init wrote: spectral norm trains W/σ(W) from it; weight norm starts equal to it."""
    if parametrize.is_parametrized(linear, "weight") and hasattr(linear.parametrizations.weight, "original"):
        return linear.parametrizations.weight.original
    return linear.weight


def _residual_and_other_linears(model: EntropicForCausalLM) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights of the linears that write into the residual stream, and of the other block linears."""
    residual, other = [], []
    for block in model.transformer.h:
        residual.append(block.attn.c_proj)
        other += [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj]
        if hasattr(block.mlp, "c_fused"):
            residual.append(block.mlp.c_fused)
        else:
            residual.append(block.mlp.c_proj)
            other.append(block.mlp.c_fc)
    return [_initialized_weight(m) for m in residual], [_initialized_weight(m) for m in other]


@pytest.mark.parametrize("preset", preset_names())
def test_residual_projections_get_gpt2_depth_scaled_init(preset):
    torch.manual_seed(0)
    model = EntropicForCausalLM(EntropicConfig.from_preset(preset, **SIZES))
    residual, other = _residual_and_other_linears(model)
    scaled = STD / math.sqrt(2 * SIZES["n_layer"])  # 0.00707 at L=4
    with torch.no_grad():
        # >= 16K entries per matrix: the sample std is within 2% of the true one; the two stds differ 2.8x.
        for weight in residual:
            assert float(weight.std()) == pytest.approx(scaled, rel=0.03)
        for weight in other:
            assert float(weight.std()) == pytest.approx(STD, rel=0.03)
        assert float(model.transformer.wte.weight.std()) == pytest.approx(STD, rel=0.03)


def _gpt2_with_mapped_weights(model: EntropicForCausalLM) -> GPT2LMHeadModel:
    """A Hugging Face GPT2LMHeadModel holding ``model``'s weights (GPT-2's Conv1D stores W transposed)."""
    cfg = model.config
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            activation_function="gelu",  # exact erf GELU, as nn.GELU()
            layer_norm_epsilon=cfg.layer_norm_epsilon,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
    ).eval()
    ours = model.transformer
    with torch.no_grad():
        gpt2.transformer.wte.weight.copy_(ours.wte.weight)
        gpt2.transformer.wpe.weight.copy_(ours.wpe.weight)
        for theirs, block in zip(gpt2.transformer.h, ours.h, strict=True):
            attn = block.attn
            theirs.ln_1.load_state_dict(block.ln_1.state_dict())
            theirs.ln_2.load_state_dict(block.ln_2.state_dict())
            theirs.attn.c_attn.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).T)
            theirs.attn.c_attn.bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
            theirs.attn.c_proj.weight.copy_(attn.c_proj.weight.T)
            theirs.attn.c_proj.bias.copy_(attn.c_proj.bias)
            theirs.mlp.c_fc.weight.copy_(block.mlp.c_fc.weight.T)
            theirs.mlp.c_fc.bias.copy_(block.mlp.c_fc.bias)
            theirs.mlp.c_proj.weight.copy_(block.mlp.c_proj.weight.T)
            theirs.mlp.c_proj.bias.copy_(block.mlp.c_proj.bias)
        gpt2.transformer.ln_f.load_state_dict(ours.ln_f.state_dict())
    return gpt2


def test_baseline_preset_matches_huggingface_gpt2_logits():
    torch.manual_seed(0)
    model = EntropicForCausalLM(
        EntropicConfig.from_preset("SM+LN+G", **SIZES, attention_backend="torch", dropout=0.0)
    ).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped or dropped one shows
        for name, param in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    gpt2 = _gpt2_with_mapped_weights(model)
    ids = torch.randint(0, SIZES["vocab_size"], (3, SIZES["n_positions"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, gpt2(ids).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # tied, as GPT-2's

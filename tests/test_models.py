"""The model family: every paper preset builds, trains, saves, loads and generates; the switches do what they say."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoConfig, AutoModelForCausalLM

import entropic.models.modeling as modeling
from entropic.models import PRESETS, EntropicConfig, EntropicForCausalLM, EntropicModel, preset_names
from entropic.ops import collect_row_entropies

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 64, "n_positions": 16}
L, H, T_MAX = TINY["n_layer"], TINY["n_head"], TINY["n_positions"]


def tiny(preset: str, **overrides) -> EntropicForCausalLM:
    return EntropicForCausalLM(EntropicConfig.from_preset(preset, **{**TINY, **overrides})).eval()


def tokens(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_by_hand(model: EntropicForCausalLM, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_the_papers_architectures_are_all_presets():
    names = preset_names()
    for name in ("SM+LN+G", "SM+LN+R", "SM+LN", "SM+G", "SM+R", "SM", "SM+ScFFN", "SM+ScFuFFN", "SM(t)+ScFuFFN"):
        assert name in names
    for kind in ("WNorm", "SNorm"):
        for targets in ("FFN", "QK", "QK+FFN", "QKV+FFN", "QKVO+FFN"):
            assert f"SM+{kind}({targets})" in names
    assert names == list(PRESETS)
    assert EntropicConfig.from_preset("SM(t)+ScFuFFN").learnable_thresholds


@pytest.mark.parametrize("preset", preset_names())
def test_preset_trains_round_trips_and_generates(preset, tmp_path):
    torch.manual_seed(0)
    model = tiny(preset).train()
    x = tokens()
    out = model(x, labels=x)
    assert out.logits.shape == (2, 10, TINY["vocab_size"])
    assert torch.isfinite(out.loss)
    # A smooth entropy-to-threshold term, so the thresholds (unused by forward) also receive gradient.
    loss = out.loss
    if model.entropy_thresholds is not None:
        head_entropy = torch.stack([e.mean(dim=(0, 2)) for e in out.row_entropies])  # [L, H]
        loss = loss + ((head_entropy - model.entropy_thresholds * math.log(T_MAX)) ** 2).mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{preset}: {name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{preset}: {name} has a non-finite gradient"

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is EntropicForCausalLM
    for field in EntropicConfig.__annotations__:
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key, value in original_state.items():
        assert torch.equal(value, loaded_state[key]), key
    with torch.no_grad():
        # Bitwise-equal weights; BLAS may still round differently on the loaded (differently aligned) storage,
        # which spectral norm's sigma = u·W·v exposes at the 1e-7 level.
        atol = 1e-6 if "SNorm" in preset else 0.0
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0.0, atol=atol)

        prompt = x[:, :4]
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert generated.shape == (2, 8)
        assert torch.equal(generated, greedy_by_hand(model, prompt, 4))
        assert torch.equal(generated, model.generate(prompt, max_new_tokens=4, do_sample=False))
        if not atol:
            assert torch.equal(generated, loaded.generate(prompt, max_new_tokens=4, do_sample=False))


def test_auto_classes_know_the_model(tmp_path):
    config = EntropicConfig.from_preset("SM+ScFuFFN", **TINY)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, EntropicForCausalLM)
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, EntropicConfig) and reloaded.fuse_ffn and reloaded.ffn_stabilizer == "scaling"
    assert reloaded.hidden_size == 32 and reloaded.num_hidden_layers == L and reloaded.max_position_embeddings == 16


def test_fused_ffn_is_one_square_linear_with_8x_fewer_weights():
    unfused, fused = tiny("SM"), tiny("SM+ScFuFFN")
    linears = [m for m in fused.transformer.h[0].mlp.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(32, 32)]

    def ffn_weights(model: EntropicForCausalLM) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n and n.endswith("weight"))

    assert ffn_weights(unfused) == L * 2 * 4 * 32 * 32
    assert ffn_weights(fused) == L * 32 * 32


def test_fused_identity_ffn_equals_the_unfused_one_with_merged_weights():
    unfused, fused = tiny("SM"), tiny("SM", fuse_ffn=True)
    state = {k: v for k, v in unfused.state_dict().items() if ".mlp." not in k}
    with torch.no_grad():
        for block in range(L):
            mlp = unfused.transformer.h[block].mlp
            w_in, b_in, w_out, b_out = mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias
            state[f"transformer.h.{block}.mlp.c_fused.weight"] = w_out @ w_in
            state[f"transformer.h.{block}.mlp.c_fused.bias"] = w_out @ b_in + b_out
    fused.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        expected = unfused(x).logits
        torch.testing.assert_close(fused(x).logits, expected, rtol=1e-5, atol=1e-5)
        fused.transformer.h[1].mlp.c_fused.weight.mul_(1.5)  # the comparison can fail
        assert (fused(x).logits - expected).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["SM+G", "SM+R", "SM", "SM+ScFFN", "SM+ScFuFFN", "SM(t)+ScFuFFN", "SM+WNorm(FFN)"])
def test_layernorm_free_presets_have_no_layernorm_in_blocks(preset):
    model = tiny(preset)
    assert not [n for n, m in model.transformer.h.named_modules() if isinstance(m, nn.LayerNorm)]
    assert isinstance(model.transformer.ln_f, nn.LayerNorm)  # kept, as in the authors' code
    assert not isinstance(tiny("SM", ln_final=False).transformer.ln_f, nn.LayerNorm)
    baseline = tiny("SM+LN+G")
    assert sum(isinstance(m, nn.LayerNorm) for m in baseline.transformer.h.modules()) == 2 * L


def test_activations_follow_the_preset():
    assert isinstance(tiny("SM+LN+G").transformer.h[0].mlp.act, nn.GELU)
    assert isinstance(tiny("SM+R").transformer.h[0].mlp.act, nn.ReLU)
    assert isinstance(tiny("SM+LN").transformer.h[0].mlp.act, nn.Identity)


def test_temperature_preset_starts_at_the_papers_init():
    model = tiny("SM(t)+ScFuFFN")
    for block in range(L):
        torch.testing.assert_close(
            model.transformer.h[block].attn.temperature.temperature, torch.full((H, T_MAX), 0.01), rtol=1e-6, atol=0
        )


def test_temperature_shapes_and_neutral_init():
    per_query = tiny("SM(t)+ScFuFFN", temperature_init=1.0)
    per_head = tiny("SM(t)+ScFuFFN", attn_temperature="head")
    for block in range(L):
        assert per_query.transformer.h[block].attn.temperature.log_temperature.shape == (H, T_MAX)
        assert per_head.transformer.h[block].attn.temperature.temperature.shape == (H,)
    assert tiny("SM+ScFuFFN").transformer.h[0].attn.temperature is None
    # t = 1 at init: the same function as the model without temperature.
    plain = tiny("SM+ScFuFFN", learnable_thresholds=True)
    plain.load_state_dict({k: v for k, v in per_query.state_dict().items() if "temperature" not in k})
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(per_query(x).logits, plain(x).logits, rtol=0, atol=0)


def test_temperature_moves_entropy_between_zero_and_the_causal_maximum():
    model = tiny("SM(t)+ScFuFFN")
    x = tokens(length=12)
    causal_max = torch.log(torch.arange(1, 13, dtype=torch.float32))  # query i sees i + 1 keys
    with torch.no_grad():
        for block in model.transformer.h:  # logits of order 10 at t = 1
            block.attn.q_proj.weight.normal_()
            block.attn.k_proj.weight.normal_()

        def row_entropies(temperature: float) -> tuple[torch.Tensor, ...]:
            for block in model.transformer.h:
                block.attn.temperature.log_temperature.fill_(math.log(temperature))
            return model(x).row_entropies

        hot, cold = row_entropies(1e4), row_entropies(1e-3)
    for layer in range(L):
        torch.testing.assert_close(hot[layer], causal_max.expand(2, H, 12), rtol=0, atol=1e-3)
        assert cold[layer][..., 1:].mean() < 0.25 * causal_max[1:].mean()


def test_thresholds_are_an_L_by_H_parameter():
    model = tiny("SM(t)+ScFuFFN", threshold_init=0.4)
    assert isinstance(model.entropy_thresholds, nn.Parameter)
    assert model.entropy_thresholds is model.transformer.entropy_thresholds
    torch.testing.assert_close(model.entropy_thresholds.detach(), torch.full((L, H), 0.4))
    assert "transformer.entropy_thresholds" in dict(model.named_parameters())
    assert tiny("SM+ScFuFFN").entropy_thresholds is None


def test_row_entropies_are_recorded_per_layer_with_grad():
    model = tiny("SM+LN+G")
    out = model(tokens(length=9))
    assert len(out.row_entropies) == L
    recorded = collect_row_entropies(model)
    for layer, (returned, stored) in enumerate(zip(out.row_entropies, recorded, strict=True)):
        assert returned is stored
        assert model.transformer.h[layer].attn.layer_idx == layer
        assert returned.shape == (2, H, 9) and returned.dtype == torch.float32 and returned.requires_grad
        causal_max = torch.log(torch.arange(1, 10, dtype=torch.float32))
        assert (returned >= -1e-6).all() and (returned <= causal_max + 1e-5).all()
    sum(e.sum() for e in out.row_entropies).backward()
    assert model.transformer.h[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_config_backend_reaches_the_attention_op(monkeypatch):
    seen = []
    original = modeling.entropic_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "entropic_attention", spy)
    tiny("SM", attention_backend="reference")(tokens())
    assert seen == ["reference"] * L


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM(t)+ScFuFFN"])
def test_left_padding_changes_nothing_for_real_tokens(preset):
    model = tiny(preset)
    with torch.no_grad():  # distinct temperature per head and position, so their indexing is tested too
        for block in model.transformer.h:
            if block.attn.temperature is not None:
                block.attn.temperature.log_temperature.uniform_(-0.5, 0.5)
    full, short = tokens(1, 7, seed=2), tokens(1, 4, seed=3)
    pad = 3
    batch = torch.cat([full, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(padded[0], model(full).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[1, pad:], model(short).logits[0], rtol=1e-5, atol=1e-5)
        unmasked = model(batch, position_ids=positions).logits
        assert (unmasked[1, pad:] - padded[1, pad:]).abs().max() > 1e-3  # the mask is what makes them equal

        generated = model.generate(batch, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(generated[1, pad:], model.generate(short, max_new_tokens=3, do_sample=False)[0])


def test_right_padded_labels_are_ignored():
    model = tiny("SM+LN+G")
    x = tokens(1, 8)
    labels = x.clone()
    labels[:, 5:] = -100
    with torch.no_grad():
        expected = model(x[:, :5], labels=x[:, :5]).loss
        torch.testing.assert_close(model(x, attention_mask=(labels != -100).long(), labels=labels).loss, expected)


def test_ffn_scaling_computes_beta_x_plus_ffn_over_alpha():
    model = tiny("SM+ScFFN")
    block = model.transformer.h[0]
    with torch.no_grad():
        block.ffn_scale.alpha.fill_(2.0)
        block.ffn_scale.beta.fill_(0.5)
        x = torch.randn(2, 6, 32)
        positions = torch.arange(6).unsqueeze(0)
        after_attn = x + block.attn(block.ln_1(x), positions, None)[0]
        expected = 0.5 * after_attn + block.mlp(block.ln_2(after_attn)) / 2.0
        torch.testing.assert_close(block(x, positions, None)[0], expected)
    assert tiny("SM").transformer.h[0].ffn_scale is None


@pytest.mark.parametrize("targets", ["ffn", "qk", "qk+ffn", "qkv+ffn", "qkvo+ffn"])
def test_static_norms_reparameterize_exactly_the_targets(targets):
    kind = {"ffn": "FFN", "qk": "QK", "qk+ffn": "QK+FFN", "qkv+ffn": "QKV+FFN", "qkvo+ffn": "QKVO+FFN"}[targets]
    torch.manual_seed(0)
    plain = tiny("SM")
    torch.manual_seed(0)
    weight_normed = tiny(f"SM+WNorm({kind})")
    spectral = tiny(f"SM+SNorm({kind})")
    letters = targets.split("+")[0] if targets != "ffn" else ""
    for block in spectral.transformer.h:
        expected = {"q_proj": "q" in letters, "k_proj": "k" in letters, "v_proj": "v" in letters}
        expected |= {"c_proj": "o" in letters}
        for name, normalized in expected.items():
            assert parametrize.is_parametrized(getattr(block.attn, name)) == normalized, name
        assert parametrize.is_parametrized(block.mlp.c_fc) == ("ffn" in targets)
        for linear in (m for m in block.modules() if isinstance(m, nn.Linear) and parametrize.is_parametrized(m)):
            # W / sigma, with sigma = u·W·v the power-iteration estimate of the largest singular value (a lower
            # bound, which tightens by one iteration per training step).
            original, (power,) = linear.parametrizations.weight.original, linear.parametrizations.weight
            sigma = power._u @ original @ power._v
            torch.testing.assert_close(linear.weight * sigma, original)
            assert 1.0 - 1e-4 < torch.linalg.matrix_norm(linear.weight.detach(), ord=2).item() < 1.2
    x = tokens()
    with torch.no_grad():  # weight norm starts as W = ‖W‖·W/‖W‖: same function as the plain model
        torch.testing.assert_close(weight_normed(x).logits, plain(x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"activation": "gelu", "fuse_ffn": True}, ValueError, r"fuse_ffn=True needs activation='identity'.*'gelu'"),
        ({"n_embd": 30, "n_head": 4}, ValueError, r"n_embd=30 must be divisible by n_head=4"),
        ({"activation": "swish"}, ValueError, r"activation='swish' is not supported; allowed: 'gelu', 'relu'"),
        ({"ffn_stabilizer": "layer_scale"}, ValueError, r"ffn_stabilizer='layer_scale'.*allowed: 'none', 'scaling'"),
        ({"norm_targets": "qk"}, ValueError, r"norm_targets='qk' has an effect only with ffn_stabilizer"),
        ({"attn_temperature": "query"}, ValueError, r"attn_temperature='query'.*allowed: 'none', 'head_query'"),
        ({"attention_backend": "cuda"}, ValueError, r"attention_backend='cuda'.*allowed: 'auto'"),
        ({"temperature_init": 0.0}, ValueError, r"temperature_init must be > 0.0, got 0.0"),
        ({"threshold_init": 1.5}, ValueError, r"threshold_init must be <= 1.0, got 1.5"),
        ({"n_layer": 0}, ValueError, r"n_layer must be a positive int, got 0"),
        ({"ln_attn": "yes"}, TypeError, r"ln_attn must be a bool, got 'yes'"),
        ({"dropout": 1.0}, ValueError, r"dropout must be < 1"),
        ({"use_cache": True}, ValueError, r"use_cache=True is not supported"),
    ],
)
def test_bad_config_values_are_refused(overrides, error, match):
    with pytest.raises(error, match=match):
        EntropicConfig(**{**TINY, **overrides})


def test_bad_preset_or_override_is_refused():
    with pytest.raises(ValueError, match=r"unknown preset 'SM\+LN\+X'; known presets: SM\+LN\+G, SM\+LN\+R"):
        EntropicConfig.from_preset("SM+LN+X")
    with pytest.raises(ValueError, match=r"unknown config override\(s\) \['n_layers'\]; allowed: vocab_size"):
        EntropicConfig.from_preset("SM", n_layers=2)
    with pytest.raises(ValueError, match=r"fuse_ffn=True needs activation='identity'"):
        EntropicConfig.from_preset("SM+ScFuFFN", activation="relu")


def test_bad_inputs_are_refused():
    model = tiny("SM+LN+G")
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds the context n_positions=16"):
        model(tokens(1, 17))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, seq_len\] = \(2, 10\)"):
        model(tokens(), attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq_len\]"):
        model(tokens()[0])
    with pytest.raises(ValueError, match=r"output_attentions=True is not supported"):
        model(tokens(), output_attentions=True)
    assert isinstance(model.transformer, EntropicModel)

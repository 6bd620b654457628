"""The "entropic" attention implementation inside Hugging Face transformers models."""

from __future__ import annotations

import copy
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from entropic import hf
from entropic.hf import is_entropic_attention, register_entropic_attention, use_entropic_attention
from entropic.ops import clear_row_entropies, collect_row_entropies
from entropic.ops.recording import EntropyRecorder

VOCAB, T = 64, 13


def gpt2_config(**overrides):
    kw = dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def llama_config():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def build_pair(cls, cfg):
    """(eager model, entropic model) with identical weights; separate configs (transformers shares them)."""
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours.load_state_dict(eager.state_dict())
    assert use_entropic_attention(ours)
    return eager, ours


def batch(padding):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[1, -5:] = 0
        mask[2, -1:] = 0
    return ids, mask


def eager_entropies(attentions):
    return [-(a * torch.log(a.clamp_min(1e-30))).sum(-1) for a in attentions]


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_matches_eager_logits_and_entropies(arch, padding):
    cls, cfg = (GPT2LMHeadModel, gpt2_config()) if arch == "gpt2" else (LlamaForCausalLM, llama_config())
    eager, ours = build_pair(cls, cfg)
    ids, mask = batch(padding)
    kwargs = {} if padding is None else {"attention_mask": mask}
    with torch.no_grad():
        ref = eager(ids, output_attentions=True, **kwargs)
        got = ours(ids, **kwargs)
    valid = mask.bool()  # padding positions are meaningless (eager spreads fully masked rows uniformly)
    torch.testing.assert_close(got.logits[valid], ref.logits[valid], rtol=0, atol=1e-5)
    ents = collect_row_entropies(ours)
    assert len(ents) == cfg.num_hidden_layers
    for layer, (h_ours, h_eager) in enumerate(zip(ents, eager_entropies(ref.attentions), strict=False)):
        assert h_ours.shape == (3, cfg.num_attention_heads, T) and h_ours.dtype == torch.float32
        rows = valid[:, None, :].expand_as(h_ours)
        torch.testing.assert_close(h_ours[rows], h_eager[rows], rtol=0, atol=1e-5, msg=f"layer {layer}")


def test_gradients_flow_through_entropies():
    _, ours = build_pair(GPT2LMHeadModel, gpt2_config())
    ids, mask = batch("left")
    ours(ids, attention_mask=mask)
    ents = collect_row_entropies(ours)
    assert all(h.requires_grad for h in ents)
    torch.stack(ents).sum().backward()
    for block in ours.transformer.h:
        grad = block.attn.c_attn.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Entropy gradients match eager's autograd through output_attentions.
    eager, _ = build_pair(GPT2LMHeadModel, gpt2_config())
    out = eager(ids, attention_mask=mask, output_attentions=True)
    valid = mask.bool()[:, None, :]
    sum(h.masked_fill(~valid, 0).sum() for h in eager_entropies(out.attentions)).backward()
    ours.zero_grad()
    ours(ids, attention_mask=mask)
    sum(h.masked_fill(~valid, 0).sum() for h in collect_row_entropies(ours)).backward()
    for (name, p_e), (_, p_o) in zip(eager.named_parameters(), ours.named_parameters(), strict=False):
        if p_e.grad is not None:
            torch.testing.assert_close(p_o.grad, p_e.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_switching_is_idempotent_and_reported():
    register_entropic_attention()
    register_entropic_attention()
    cfg = gpt2_config()
    model = GPT2LMHeadModel._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    assert not is_entropic_attention(model)
    assert use_entropic_attention(model) is True
    assert is_entropic_attention(model)
    assert use_entropic_attention(model) is False
    built = GPT2LMHeadModel._from_config(copy.deepcopy(cfg), attn_implementation="entropic")
    assert is_entropic_attention(built)


def test_dropout_uses_pre_dropout_entropy():
    eager, ours = build_pair(GPT2LMHeadModel, gpt2_config(attn_pdrop=0.5))
    ids, mask = batch("right")
    with torch.no_grad():
        ours(ids, attention_mask=mask)
    eval_ents = [h.clone() for h in collect_row_entropies(ours)]
    ours.train()
    hf._warned.discard("dropout")
    with pytest.warns(RuntimeWarning, match="dropout"):
        torch.manual_seed(0)
        train_out = ours(ids, attention_mask=mask)
    # Layer 0 sees the same input in both modes (no embedding/residual dropout), so its entropy, taken
    # from the pre-dropout probabilities, must not change; later layers see dropped-out activations.
    torch.testing.assert_close(collect_row_entropies(ours)[0], eval_ents[0], rtol=0, atol=1e-6)
    # Same dropout draws as eager: identical logits in training mode.
    eager.train()
    torch.manual_seed(0)
    ref = eager(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(train_out.logits[valid], ref.logits[valid], rtol=0, atol=1e-5)


def test_general_mask_falls_back_to_dense_and_matches():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    window = torch.ones(9, 9, dtype=torch.bool).tril() & ~torch.ones(9, 9, dtype=torch.bool).tril(-3)
    mask = window.view(1, 1, 9, 9).expand(2, 1, 9, 9)
    assert hf._decode_mask(mask, 2, 9, 9) is None

    class Module(torch.nn.Module):
        is_causal = True

    module = Module().eval()
    hf._warned.discard("mask")
    recorder = EntropyRecorder()
    recorder.begin()
    with pytest.warns(RuntimeWarning, match="materialized"):
        out, weights = hf.entropic_attention_forward(module, q, k, v, mask, scaling=0.5)
    recorder.end()
    assert weights is None and out.shape == (2, 9, 2, 8)
    s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    p = s.softmax(-1)
    torch.testing.assert_close(out, (p @ v).transpose(1, 2))
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    (recorded,) = recorder.entropies
    torch.testing.assert_close(recorded, h)


def test_mask_decoding():
    pad = torch.tensor([[True] * 6, [False, False] + [True] * 4])
    tri = torch.ones(6, 6, dtype=torch.bool).tril()
    causal_padded = (tri & pad[:, None, :]).unsqueeze(1)
    causal, kpm = hf._decode_mask(causal_padded, 2, 6, 6)
    assert causal and torch.equal(kpm, pad)
    causal, kpm = hf._decode_mask(tri.view(1, 1, 6, 6), 2, 6, 6)
    assert causal and kpm is None
    causal, kpm = hf._decode_mask(pad[:, None, None, :].expand(2, 1, 6, 6), 2, 6, 6)
    assert not causal and torch.equal(kpm, pad)
    # eager-style additive masks are recognized too
    additive = torch.where(causal_padded, 0.0, torch.finfo(torch.float32).min)
    as_bool, bias = hf._to_bool_mask(additive)
    assert bias is None and torch.equal(as_bool, causal_padded)


def test_unsupported_features_raise():
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="s_aux"):
        hf.entropic_attention_forward(torch.nn.Module(), q, k, v, None, s_aux=torch.zeros(2))


def test_cached_generation_runs():
    eager, ours = build_pair(GPT2LMHeadModel, gpt2_config())
    ids, mask = batch("left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = eager.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        clear_row_entropies(ours)
        b = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)

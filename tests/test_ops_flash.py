"""The fused CPU flash path of the "torch" backend: exact against the eager oracle, values and gradients."""

from __future__ import annotations

import pytest
import torch

import entropic.ops as ops
from entropic.ops.flash_cpu import flash_cpu_applies, flash_entropic_attention
from entropic.ops.fused_cpu import DISABLE_ENV
from entropic.ops.reference import reference_entropic_attention


def _inputs(dtype=torch.float32, t_q=17, t_k=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, t_q, 8, generator=g, dtype=dtype).requires_grad_(True)
    k = torch.randn(2, 3, t_k, 8, generator=g, dtype=dtype).requires_grad_(True)
    v = torch.randn(2, 3, t_k, 8, generator=g, dtype=dtype).requires_grad_(True)
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("temperature", [None, "head_query", "head"])
def test_values_and_gradients_match_the_eager_oracle(causal, temperature):
    q, k, v = _inputs()
    temp = None
    if temperature == "head_query":
        temp = (torch.rand(3, 17, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_(True)
    elif temperature == "head":
        temp = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    out, ent = flash_entropic_attention(q, k, v, causal=causal, scale=0.4, temperature=temp)
    ref_out, ref_ent = reference_entropic_attention(q, k, v, causal=causal, scale=0.4, temperature=temp)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=2e-6)
    w_out = torch.randn_like(out, generator=torch.Generator().manual_seed(2))
    w_ent = torch.randn_like(ent, generator=torch.Generator().manual_seed(3))
    inputs = (q, k, v) if temp is None else (q, k, v, temp)
    grads = torch.autograd.grad((out * w_out).sum() + (ent * w_ent).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_out * w_out).sum() + (ref_ent * w_ent).sum(), inputs)
    for name, got, want in zip(("q", "k", "v", "temperature"), grads, ref_grads, strict=False):
        # fp32 sums over up to 2·17 rows: the temperature gradient is the largest and gets a relative tolerance
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_entropy_gradient_passes_gradcheck_in_fp64():
    q, k, v = _inputs(torch.float64, t_q=6, t_k=6)
    entropy_only = lambda q, k, v: flash_entropic_attention(q, k, v, causal=True, scale=0.5)[1]  # noqa: E731
    assert torch.autograd.gradcheck(entropy_only, (q, k, v), atol=1e-5)


def test_dispatch_takes_the_flash_path_only_where_it_is_exact(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "1")  # the flash path is the fallback of the fused C++ kernel
    calls = []
    real = ops.flash_entropic_attention
    monkeypatch.setattr(ops, "flash_entropic_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _inputs()
    ops.entropic_attention(q, k, v, backend="torch")
    assert calls == [1]
    pad = torch.ones(2, 17, dtype=torch.bool)
    pad[1, :3] = False
    ops.entropic_attention(q, k, v, backend="torch", key_padding_mask=pad)  # padding: chunked path
    ops.entropic_attention(*_inputs(torch.float64), backend="torch")  # fp64: chunked, exact to 1e-12
    q2, k2, v2 = _inputs(t_q=5, t_k=17)
    ops.entropic_attention(q2, k2, v2, backend="torch", causal=True)  # bottom-right causal alignment: chunked
    assert calls == [1]
    assert not flash_cpu_applies(q2, k2, True, None) and flash_cpu_applies(q2, k2, False, None)

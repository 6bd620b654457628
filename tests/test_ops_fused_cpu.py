"""The fused C++ CPU kernel of the "torch" backend: exact against the eager oracle, and how the dispatch picks it.

The extension must compile here (CI has a C++ compiler): a build failure fails these tests, it does not skip them.
"""

from __future__ import annotations

import pytest
import torch

import entropic.ops as ops
from entropic.ops import fused_cpu
from entropic.ops.fused_cpu import DISABLE_ENV, fused_cpu_applies, fused_entropic_attention, load_extension
from entropic.ops.reference import reference_entropic_attention


def _inputs(b, h, t_q, t_k, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_(True) for t in (t_q, t_k, t_k))


def _temperature(kind, h, t_q):
    if kind == "head_query":
        return (torch.rand(h, t_q, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_(True)
    if kind == "head":
        return (torch.rand(h, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_(True)
    return None


def _values_and_grads(fn, q, k, v, temp, causal, scale):
    out, ent = fn(q, k, v, causal=causal, scale=scale, temperature=temp)
    w_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    w_ent = torch.randn(ent.shape, generator=torch.Generator().manual_seed(3), dtype=ent.dtype)
    inputs = (q, k, v) if temp is None else (q, k, v, temp)
    grads = torch.autograd.grad((out * w_out).sum() + (ent * w_ent).sum(), inputs)
    return [out, ent, *grads]


NAMES = ("out", "entropy", "dq", "dk", "dv", "dtemperature")


def test_the_extension_compiles_and_finds_blas():
    ext = load_extension()
    assert ext is not None, "the fused CPU extension did not build (see the warning)"
    assert ext.has_blas()


@pytest.mark.parametrize(
    ("b", "h", "t_q", "t_k", "d", "causal", "block"),
    [
        (2, 3, 37, 37, 16, True, 16),  # three blocks, the last one partial
        (2, 3, 37, 37, 16, False, 16),
        (1, 1, 1, 1, 8, True, 64),  # one query, one key
        (1, 2, 64, 64, 32, True, 64),  # exactly one block
        (2, 2, 5, 23, 8, False, 4),  # fewer queries than keys, not causal
        (3, 2, 23, 9, 8, False, 64),  # more queries than keys, not causal
    ],
)
@pytest.mark.parametrize("temperature", [None, "head_query", "head"])
def test_values_and_gradients_match_the_eager_oracle(monkeypatch, b, h, t_q, t_k, d, causal, block, temperature):
    monkeypatch.setattr(fused_cpu, "BLOCK_ROWS", block)
    q, k, v = _inputs(b, h, t_q, t_k, d)
    temp = _temperature(temperature, h, t_q)
    got = _values_and_grads(fused_entropic_attention, q, k, v, temp, causal, 0.4)
    want = _values_and_grads(reference_entropic_attention, q, k, v, temp, causal, 0.4)
    for name, a, e in zip(NAMES, got, want, strict=False):
        assert a.dtype == e.dtype == torch.float32, name
        # The temperature gradient sums over the batch (and the queries for [H]): a relative tolerance too.
        torch.testing.assert_close(a, e, rtol=1e-4 if name == "dtemperature" else 1e-5, atol=1e-5, msg=name)


def test_strided_inputs_from_a_bthd_layout_are_read_in_place():
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 19, 3, 3, 8, generator=g).requires_grad_(True)  # [B, T, (q, k, v), H, D]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, T, D] views, row stride 3·H·D
    assert q.stride(-1) == 1 and not q.is_contiguous()
    got = fused_entropic_attention(q, k, v, causal=True, scale=0.35)
    grad_got = torch.autograd.grad(got[0].sum() + got[1].sum(), qkv)[0]
    want = reference_entropic_attention(q, k, v, causal=True, scale=0.35)
    grad_want = torch.autograd.grad(want[0].sum() + want[1].sum(), qkv)[0]
    for a, e in zip((*got, grad_got), (*want, grad_want), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("used", ["out", "entropy"])
def test_one_output_alone_has_the_oracles_gradients(used):
    q, k, v = _inputs(2, 2, 13, 13, 8)
    index = 0 if used == "out" else 1
    kw = dict(allow_unused=True, materialize_grads=True)  # the entropy does not depend on v: dv = 0
    got = torch.autograd.grad(fused_entropic_attention(q, k, v, causal=True, scale=0.5)[index].sum(), (q, k, v), **kw)
    want = torch.autograd.grad(
        reference_entropic_attention(q, k, v, causal=True, scale=0.5)[index].sum(), (q, k, v), **kw
    )
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_both_outputs_pass_gradcheck_in_fp64(monkeypatch, causal):
    monkeypatch.setattr(fused_cpu, "BLOCK_ROWS", 4)
    q, k, v = _inputs(1, 2, 7, 7, 4, dtype=torch.float64)
    t = (torch.rand(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5).requires_grad_(True)

    def fn(q, k, v, t):
        return fused_entropic_attention(q, k, v, causal=causal, scale=0.7, temperature=t)

    assert torch.autograd.gradcheck(fn, (q, k, v, t))


def test_dispatch_takes_the_fused_kernel_for_fp32_cpu_and_the_flag_turns_it_off(monkeypatch):
    calls = []
    real_fused, real_flash = ops.fused_entropic_attention, ops.flash_entropic_attention
    monkeypatch.setattr(ops, "fused_entropic_attention", lambda *a, **kw: calls.append("fused") or real_fused(*a, **kw))
    monkeypatch.setattr(ops, "flash_entropic_attention", lambda *a, **kw: calls.append("flash") or real_flash(*a, **kw))
    q, k, v = _inputs(2, 3, 11, 11, 8)
    ops.entropic_attention(q, k, v)
    assert calls == ["fused"]
    pad = torch.ones(2, 11, dtype=torch.bool)
    pad[0, :2] = False
    ops.entropic_attention(q, k, v, key_padding_mask=pad)  # key padding: the chunked path
    ops.entropic_attention(*_inputs(2, 3, 11, 11, 8, dtype=torch.float64))  # fp64: the chunked path
    q2, k2, v2 = _inputs(1, 1, 4, 9, 8)
    ops.entropic_attention(q2, k2, v2, causal=True)  # bottom-right causal alignment: the chunked path
    assert calls == ["fused"]
    assert not fused_cpu_applies(q2, k2, v2, True, None) and fused_cpu_applies(q2, k2, v2, False, None)
    monkeypatch.setenv(DISABLE_ENV, "1")
    ops.entropic_attention(q, k, v)
    assert calls == ["fused", "flash"]


def test_a_failed_build_warns_once_and_the_dispatch_falls_back(monkeypatch):
    def broken_build():
        raise OSError("no compiler")

    monkeypatch.setattr(fused_cpu, "_state", {})
    monkeypatch.setattr(fused_cpu, "_build", broken_build)
    q, k, v = _inputs(1, 2, 9, 9, 8)
    with pytest.warns(RuntimeWarning, match="no compiler") as record:
        out, ent = ops.entropic_attention(q, k, v)
        ops.entropic_attention(q, k, v)
    assert len(record) == 1
    want = reference_entropic_attention(q, k, v)
    torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unavailable"):
        fused_entropic_attention(q, k, v, causal=True, scale=0.5)

"""The chunked PyTorch path of entropic attention against autograd oracles, and the backend dispatch."""

from __future__ import annotations

import math

import pytest
import torch

import entropic.ops as ops
from entropic.ops import entropic_attention, reference_entropic_attention
from entropic.ops.torch_attention import torch_entropic_attention


def oracle(q, k, v, *, causal=True, scale=None, temperature=None, key_padding_mask=None, compute_dtype=None):
    """Dense softmax attention + entropy, differentiated by autograd; NaN-free gradients under masking.

    ``compute_dtype=None`` computes in fp32 (fp64 for fp64 inputs); pass the input dtype to get
    "plain PyTorch in low precision" for FlashAttention's tolerance rule.
    """
    b, h, t_q, d = q.shape
    t_k = k.shape[-2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    cd = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    if temperature is not None:
        t = temperature.to(cd)
        s = s / (t.view(1, h, 1, 1) if t.dim() == 1 else t.view(1, h, t_q, 1))
    vis = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal:
        vis = vis.tril(diagonal=t_k - t_q)
    vis = vis.view(1, 1, t_q, t_k)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.view(b, 1, 1, t_k)
    anyv = vis.any(-1, keepdim=True)
    s0 = s.masked_fill(~vis, 0.0)
    lse = torch.logsumexp(s.masked_fill(~vis, float("-inf")).masked_fill(~anyv, 0.0), -1, keepdim=True)
    p = torch.exp(s0 - lse) * vis
    ent = ((lse - (p * s0).sum(-1, keepdim=True)) * anyv).squeeze(-1)
    out = torch.matmul(p, v.to(cd))
    return out, ent


B, H, D = 2, 3, 16


def make_inputs(t_q=37, t_k=None, temp=None, pad=False, dtype=torch.float32, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    t_k = t_q if t_k is None else t_k
    q = torch.randn(B, H, t_q, d, generator=g).to(dtype)
    k = torch.randn(B, H, t_k, d, generator=g).to(dtype)
    v = torch.randn(B, H, t_k, d, generator=g).to(dtype)
    t = None
    if temp == "HT":
        t = torch.rand(H, t_q, generator=g) + 0.5
    elif temp == "H":
        t = torch.rand(H, generator=g) + 0.5
    mask = None
    if pad:
        mask = torch.ones(B, t_k, dtype=torch.bool)
        mask[0, :5] = False  # left padding: the first causal rows of batch 0 see no key at all
        mask[1, -7:] = False  # right padding
    return q, k, v, t, mask


def run_with_grads(fn, q, k, v, t, mask, causal, seed=1, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    t_leaf = None if t is None else t.detach().clone().requires_grad_()
    out, ent = fn(*leaves, causal=causal, temperature=t_leaf, key_padding_mask=mask, **kw)
    g = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out.shape, generator=g).to(out.dtype)
    d_ent = torch.randn(ent.shape, generator=g).to(ent.dtype)
    ((out * d_out).float().sum() + (ent * d_ent).float().sum()).backward()
    grads = [x.grad for x in leaves] + ([t_leaf.grad] if t_leaf is not None else [])
    return [out, ent, *grads]


NAMES = ["out", "entropy", "dq", "dk", "dv", "dtemperature"]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("temp", [None, "HT", "H"])
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_matches_fp32_autograd(causal, temp, pad):
    q, k, v, t, mask = make_inputs(t_q=37, temp=temp, pad=pad)  # 37 = 2 full chunks of 16 + 5
    ours = run_with_grads(torch_entropic_attention, q, k, v, t, mask, causal, chunk_size=16)
    ref = run_with_grads(oracle, q, k, v, t, mask, causal)
    for name, a, b in zip(NAMES, ours, ref, strict=False):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5, msg=name)
    # Forward also against the project's eager reference.
    out_r, ent_r = reference_entropic_attention(q, k, v, causal=causal, temperature=t, key_padding_mask=mask)
    torch.testing.assert_close(ours[0], out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ent_r, rtol=1e-5, atol=1e-5)


def test_gradients_match_reference_where_reference_is_finite():
    # Without masking the project's eager reference has finite gradients: compare with it directly.
    q, k, v, t, _ = make_inputs(t_q=29, temp="HT")
    ours = run_with_grads(torch_entropic_attention, q, k, v, t, None, False, chunk_size=8)
    ref = run_with_grads(reference_entropic_attention, q, k, v, t, None, False)
    for name, a, b in zip(NAMES, ours, ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 128])
def test_chunk_size_does_not_change_result(chunk):
    q, k, v, t, mask = make_inputs(t_q=37, temp="HT", pad=True)
    base = run_with_grads(torch_entropic_attention, q, k, v, t, mask, True, chunk_size=37)
    got = run_with_grads(torch_entropic_attention, q, k, v, t, mask, True, chunk_size=chunk)
    for name, a, b in zip(NAMES, got, base, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_query_and_key_lengths_differ(causal):
    q, k, v, t, mask = make_inputs(t_q=9, t_k=23, temp="HT", pad=True)
    ours = run_with_grads(torch_entropic_attention, q, k, v, t, mask, causal, chunk_size=4)
    ref = run_with_grads(oracle, q, k, v, t, mask, causal)
    for name, a, b in zip(NAMES, ours, ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    out_r, ent_r = reference_entropic_attention(q, k, v, causal=causal, temperature=t, key_padding_mask=mask)
    torch.testing.assert_close(ours[0], out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ent_r, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zero_and_nan_free():
    q, k, v, t, _ = make_inputs(t_q=12, temp="H")
    mask = torch.ones(B, 12, dtype=torch.bool)
    mask[0] = False  # batch row 0 sees nothing
    mask[1, :4] = False  # causal rows 0..3 of batch 1 see nothing
    out, ent, dq, dk, dv, dt = run_with_grads(torch_entropic_attention, q, k, v, t, mask, True, chunk_size=5)
    for x in (out, ent, dq, dk, dv, dt):
        assert torch.isfinite(x).all()
    assert (out[0] == 0).all() and (ent[0] == 0).all()
    assert (out[1, :, :4] == 0).all() and (ent[1, :, :4] == 0).all()
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (ent[1, :, 4:] >= 0).all()


def test_entropy_is_fp32_and_out_keeps_dtype():
    q, k, v, _, _ = make_inputs(t_q=8, dtype=torch.float16)
    out, ent = torch_entropic_attention(q, k, v)
    assert out.dtype == torch.float16 and ent.dtype == torch.float32


def test_gradcheck_float64():
    q, k, v, t, mask = make_inputs(t_q=6, temp="HT", pad=True, dtype=torch.float64, d=4)
    t = t.double()
    mask[1, -2:] = False
    inputs = tuple(x.detach().clone().requires_grad_() for x in (q, k, v, t))

    def fn(q_, k_, v_, t_):
        return torch_entropic_attention(q_, k_, v_, causal=True, temperature=t_, key_padding_mask=mask, chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)

    def fn_h(q_, k_, v_, t_):
        return torch_entropic_attention(q_, k_, v_, causal=False, temperature=t_[:, 0], chunk_size=5)

    assert torch.autograd.gradcheck(fn_h, inputs, eps=1e-6, atol=1e-6)


def _rel_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("temp,pad", [(None, False), ("HT", True), ("H", True)])
def test_low_precision_flashattention_rule(dtype, causal, temp, pad):
    """Error vs the fp32 reference ≤ 2× the error of plain PyTorch in the same low precision (+ small atol)."""
    q, k, v, t, mask = make_inputs(t_q=45, temp=temp, pad=pad, dtype=dtype, d=32)
    ours = run_with_grads(torch_entropic_attention, q, k, v, t, mask, causal, chunk_size=16)
    low = run_with_grads(oracle, q, k, v, t, mask, causal, compute_dtype=dtype)
    # fp32 reference on the same (rounded) inputs
    ref = run_with_grads(oracle, q.float(), k.float(), v.float(), t, mask, causal)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    for name, a, lo, r in zip(NAMES, ours, low, ref, strict=False):
        assert torch.isfinite(a).all(), name
        err_ours, err_low = _rel_err(a, r), _rel_err(lo, r)
        atol = 1e-3 * max(1.0, r.abs().max().item())
        assert err_ours <= 2 * err_low + atol, f"{name}: ours {err_ours:.3g} vs plain {dtype} {err_low:.3g}"


def _saved_bytes(fn, t_len, causal=True):
    q, k, v, t, mask = make_inputs(t_q=t_len, temp="HT", pad=True, d=16)
    leaves = [x.requires_grad_() for x in (q, k, v, t)]
    storages: dict[int, int] = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out, ent = fn(*leaves[:3], causal=causal, temperature=leaves[3], key_padding_mask=mask)
    (out.sum() + ent.sum()).backward()
    return sum(storages.values())


def test_saved_tensors_are_linear_in_sequence_length():
    small, large = 256, 1024
    ours_small = _saved_bytes(torch_entropic_attention, small)
    ours_large = _saved_bytes(torch_entropic_attention, large)
    ref_large = _saved_bytes(oracle, large)
    # What the chunked path keeps: q, k, v, temperature, mask, LSE and entropy: O(T) bytes.
    per_row = B * H * (3 * 16 + 2) * 4 + H * 4 + B  # bytes per query position, fp32
    assert ours_large >= 3 * B * H * large * 16 * 4  # the hook did see q, k, v
    assert ours_large <= 1.1 * per_row * large, ours_large
    assert ours_large / ours_small < 4.5  # linear (4×), not quadratic (16×)
    assert ref_large > 8 * B * H * large * large  # the dense oracle keeps several [B, H, T, T] fp32 tensors
    assert ours_large * 50 < ref_large


# ---------------------------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_uses_torch_path():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    q, k, v, t, mask = make_inputs(t_q=20, temp="H", pad=True)
    a = entropic_attention(q, k, v, temperature=t, key_padding_mask=mask)
    b = torch_entropic_attention(q, k, v, temperature=t, key_padding_mask=mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_explicit_backends_agree(backend):
    q, k, v, t, mask = make_inputs(t_q=20, temp="HT", pad=True)
    out, ent = entropic_attention(q, k, v, causal=False, temperature=t, key_padding_mask=mask, backend=backend)
    out_r, ent_r = oracle(q, k, v, causal=False, temperature=t, key_padding_mask=mask)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_r, rtol=1e-5, atol=1e-5)


def test_unknown_backend_lists_allowed():
    q, k, v, _, _ = make_inputs(t_q=4)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*'auto', 'triton', 'torch', 'reference'"):
        entropic_attention(q, k, v, backend="cuda")


def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _, _ = make_inputs(t_q=4)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*backend=\"torch\""):
        entropic_attention(q, k, v, backend="triton")


def test_triton_without_kernels_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "_load_triton_kernel", lambda: (None, "entropic_kernels has no triton_entropic_attention"))
    q, k, v, _, _ = make_inputs(t_q=4)
    with pytest.raises(RuntimeError, match=r"unavailable: entropic_kernels has no triton_entropic_attention"):
        entropic_attention(q, k, v, backend="triton")


def test_triton_dispatch_passes_the_contract(monkeypatch):
    calls = {}

    def fake(q, k, v, *, causal, scale, temperature, key_padding_mask):
        calls.update(causal=causal, scale=scale, temperature=temperature, key_padding_mask=key_padding_mask)
        return torch_entropic_attention(
            q, k, v, causal=causal, scale=scale, temperature=temperature, key_padding_mask=key_padding_mask
        )

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "_load_triton_kernel", lambda: (fake, ""))
    q, k, v, t, mask = make_inputs(t_q=6, temp="H", pad=True)
    entropic_attention(q, k, v, causal=False, scale=0.3, temperature=t, key_padding_mask=mask, backend="triton")
    assert calls["causal"] is False and calls["scale"] == 0.3
    assert calls["temperature"] is t and calls["key_padding_mask"] is mask


@pytest.mark.triton
def test_triton_interpreter_matches_torch_path_if_available():
    import os

    fn, why = ops._load_triton_kernel()
    if fn is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(f"needs TRITON_INTERPRET=1 and the kernels ({why or 'interpreter off'})")
    q, k, v, t, mask = make_inputs(t_q=37, temp="HT", pad=True, d=32)
    ours = run_with_grads(lambda *a, **kw: entropic_attention(*a, backend="triton", **kw), q, k, v, t, mask, True)
    ref = run_with_grads(oracle, q, k, v, t, mask, True)
    for name, a, b in zip(NAMES, ours, ref, strict=False):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v, t, m: (q[0], k, v, t, m), ValueError, r"q must have shape \[B, H, T, D\]"),
        (lambda q, k, v, t, m: (q, k[:, :2], v, t, m), ValueError, r"k shape .* does not match q shape"),
        (lambda q, k, v, t, m: (q, k, v[:, :, :3], t, m), ValueError, r"v shape .* does not match k shape"),
        (lambda q, k, v, t, m: (q, k, v[..., :8], t, m), ValueError, r"v head dim 8 differs"),
        (lambda q, k, v, t, m: (q, k, v.half(), t, m), TypeError, r"share one dtype"),
        (lambda q, k, v, t, m: (q.long(), k.long(), v.long(), t, m), TypeError, r"q must be float16"),
        (lambda q, k, v, t, m: (q, k, v, torch.ones(H + 1), m), ValueError, r"temperature must have shape \[H\]"),
        (lambda q, k, v, t, m: (q, k, v, torch.ones(H, 3), m), ValueError, r"\[H, T\] = \[3, 10\]"),
        (lambda q, k, v, t, m: (q, k, v, t, m.long()), TypeError, r"key_padding_mask must be a bool tensor"),
        (lambda q, k, v, t, m: (q, k, v, t, m[:, :5]), ValueError, r"key_padding_mask must have shape \[B, Tk\]"),
    ],
)
def test_bad_inputs_raise(mutate, exc, match):
    q, k, v, t, mask = make_inputs(t_q=10, temp="H", pad=True)
    q, k, v, t, mask = mutate(q, k, v, t, mask)
    with pytest.raises(exc, match=match):
        entropic_attention(q, k, v, temperature=t, key_padding_mask=mask)


def test_chunk_size_must_be_positive():
    q, k, v, _, _ = make_inputs(t_q=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        torch_entropic_attention(q, k, v, chunk_size=0)

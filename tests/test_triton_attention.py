"""Triton entropic attention under the CPU interpreter (TRITON_INTERPRET=1) against an fp32 autograd reference.

Tolerances follow FlashAttention's rule: in fp16 the kernel's error against the fp32 reference must be at most
2x the error of plain PyTorch computing the same thing in fp16 (plus a small floor); in fp32 the kernel must match
directly (1e-4 scale). Checked: out, row entropy, dQ, dK, dV and d(temperature).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the import of entropic_kernels (kernels are JIT-defined then)

import math
import subprocess
import sys

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton is a Linux dependency of the project
    pytest.skip("triton is not importable on this machine", allow_module_level=True)

import entropic_kernels
from entropic_kernels import interpreter_enabled, triton_entropic_attention

from entropic.ops.reference import reference_entropic_attention

pytestmark = [
    pytest.mark.triton,
    # The interpreter evaluates both branches of tl.where; masked lanes may warn in numpy.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

B, H = 2, 2


def eager_attention(q, k, v, *, causal, scale=None, temperature=None, key_padding_mask=None):
    """Plain PyTorch attention + entropy in the dtype of the inputs (no upcast), NaN-free gradients.

    In fp32 this is the autograd reference; in fp16 it is the "plain PyTorch in low precision" baseline of
    FlashAttention's tolerance rule.
    """
    _, heads, t_q, dim = q.shape
    t_k = k.shape[-2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if temperature is not None:
        t = temperature.to(q.dtype)
        t = t.view(1, heads, 1, 1) if t.dim() == 1 else t.view(1, heads, t_q, 1)
        logits = logits / t
    visible = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal:
        visible = torch.tril(visible, diagonal=t_k - t_q)
    visible = visible.view(1, 1, t_q, t_k)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.view(-1, 1, 1, t_k)
    logits = logits.masked_fill(~visible, -1e4 if q.dtype == torch.float16 else -1e30)
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp() * visible
    safe_log = log_probs.masked_fill(~visible, 0.0)
    entropy = -(probs * safe_log).sum(-1)
    out = torch.matmul(probs, v)
    return out, entropy.float()


def make_inputs(t_q, dim, dtype, temp, pad, seed=0, t_k=None):
    gen = torch.Generator().manual_seed(seed)
    t_k = t_q if t_k is None else t_k
    q = torch.randn(B, H, t_q, dim, generator=gen).to(dtype)
    k = torch.randn(B, H, t_k, dim, generator=gen).to(dtype)
    v = torch.randn(B, H, t_k, dim, generator=gen).to(dtype)
    if temp == "HT":
        t = 0.5 + torch.rand(H, t_q, generator=gen)
    elif temp == "H":
        t = 0.5 + torch.rand(H, generator=gen)
    else:
        t = None
    kpm = None
    if pad:
        kpm = torch.ones(B, t_k, dtype=torch.bool)
        kpm[0, t_k - 5 :] = False  # right padding
        kpm[1, : t_k // 2 + 1] = False  # left padding: with causal, the first rows see no key at all
    d_out = torch.randn(B, H, t_q, dim, generator=gen)
    d_ent = torch.randn(B, H, t_q, generator=gen)
    return q, k, v, t, kpm, d_out, d_ent


def run(fn, q, k, v, t, kpm, d_out, d_ent, causal, dtype):
    """Forward + backward of ``fn`` with inputs cast to ``dtype``; returns fp32 out, entropy and grads."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    temp = t.detach().clone().requires_grad_() if t is not None else None
    out, ent = fn(*leaves, causal=causal, temperature=temp, key_padding_mask=kpm)
    loss = (out.float() * d_out).sum() + (ent.float() * d_ent).sum()
    loss.backward()
    res = {"out": out.float(), "ent": ent.float()}
    for name, x in zip(("dq", "dk", "dv"), leaves, strict=False):
        res[name] = x.grad.float()
    if temp is not None:
        res["dt"] = temp.grad.float()
    return res


def max_err(a, b):
    return (a - b).abs().max().item()


CASES = [(16, 64), (37, 32)]  # (T, D); BLOCK 16 under the interpreter, so 37 leaves a partial block


@pytest.mark.parametrize("t_len,dim", CASES)
@pytest.mark.parametrize("pad", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("temp", [None, "HT", "H"], ids=["notemp", "tempHT", "tempH"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fp32_matches_reference(causal, temp, pad, t_len, dim):
    q, k, v, t, kpm, d_out, d_ent = make_inputs(t_len, dim, torch.float32, temp, pad)
    tri = run(triton_entropic_attention, q, k, v, t, kpm, d_out, d_ent, causal, torch.float32)
    ref = run(eager_attention, q, k, v, t, kpm, d_out, d_ent, causal, torch.float32)
    # The test's eager reference agrees with the project oracle in the forward pass.
    o_oracle, h_oracle = reference_entropic_attention(q, k, v, causal=causal, temperature=t, key_padding_mask=kpm)
    torch.testing.assert_close(ref["out"], o_oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref["ent"], h_oracle, atol=1e-5, rtol=1e-5)
    assert set(tri) == set(ref)
    for name in ref:
        assert torch.isfinite(tri[name]).all(), name
        torch.testing.assert_close(tri[name], ref[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("t_len,dim", CASES)
@pytest.mark.parametrize("pad", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("temp", [None, "HT", "H"], ids=["notemp", "tempHT", "tempH"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fp16_flash_attention_rule(causal, temp, pad, t_len, dim):
    """|triton_fp16 - ref_fp32| <= 2 |torch_fp16 - ref_fp32| + floor, for every output and gradient."""
    q, k, v, t, kpm, d_out, d_ent = make_inputs(t_len, dim, torch.float16, temp, pad, seed=1)
    q, k, v = q.float(), k.float(), v.float()  # exactly representable in fp16
    ref = run(eager_attention, q, k, v, t, kpm, d_out, d_ent, causal, torch.float32)
    low = run(eager_attention, q, k, v, t, kpm, d_out, d_ent, causal, torch.float16)
    tri = run(triton_entropic_attention, q, k, v, t, kpm, d_out, d_ent, causal, torch.float16)
    for name in ref:
        assert torch.isfinite(tri[name]).all(), name
        err_tri = max_err(tri[name], ref[name])
        err_low = max_err(low[name], ref[name])
        # Floor: a few fp16 ulps at the magnitude of the reference.
        floor = 4 * torch.finfo(torch.float16).eps * max(ref[name].abs().max().item(), 1.0)
        assert err_tri <= 2 * err_low + floor, f"{name}: triton err {err_tri:.3g} vs fp16 torch err {err_low:.3g}"


@pytest.mark.parametrize("t_len,dim", [(70, 128), (33, 48)])
def test_other_head_dims(t_len, dim):
    """D=128 (several key blocks) and a head dim that is not a power of two (masked head-dim lanes)."""
    q, k, v, t, kpm, d_out, d_ent = make_inputs(t_len, dim, torch.float32, "HT", True, seed=7)
    tri = run(triton_entropic_attention, q, k, v, t, kpm, d_out, d_ent, True, torch.float32)
    ref = run(eager_attention, q, k, v, t, kpm, d_out, d_ent, True, torch.float32)
    for name in ref:
        torch.testing.assert_close(tri[name], ref[name], atol=1e-4, rtol=1e-4)


def test_fully_masked_rows_give_zero_and_no_nan():
    q, k, v, _, _, d_out, d_ent = make_inputs(37, 32, torch.float32, None, False, seed=2)
    kpm = torch.ones(B, 37, dtype=torch.bool)
    kpm[1, :20] = False  # causal rows 0..19 of batch 1 see nothing
    kpm[0, :] = False  # batch 0 sees nothing at all
    tri = run(triton_entropic_attention, q, k, v, None, kpm, d_out, d_ent, True, torch.float32)
    ref = run(eager_attention, q, k, v, None, kpm, d_out, d_ent, True, torch.float32)
    for name, x in tri.items():
        assert torch.isfinite(x).all(), name
        torch.testing.assert_close(x, ref[name], atol=1e-4, rtol=1e-4)
    assert (tri["out"][0] == 0).all() and (tri["ent"][0] == 0).all()
    assert (tri["out"][1, :, :20] == 0).all() and (tri["ent"][1, :, :20] == 0).all()
    assert (tri["dq"][0] == 0).all() and (tri["dk"][0] == 0).all() and (tri["dv"][0] == 0).all()


@pytest.mark.parametrize("t_q,t_k", [(21, 40), (40, 21)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_different_query_and_key_lengths(causal, t_q, t_k):
    """Tq != Tk (bottom-right aligned causal mask, like the reference), padded, with [H, Tq] temperature."""
    q, k, v, t, kpm, d_out, d_ent = make_inputs(t_q, 32, torch.float32, "HT", True, seed=3, t_k=t_k)
    tri = run(triton_entropic_attention, q, k, v, t, kpm, d_out, d_ent, causal, torch.float32)
    ref = run(eager_attention, q, k, v, t, kpm, d_out, d_ent, causal, torch.float32)
    for name in ref:
        torch.testing.assert_close(tri[name], ref[name], atol=1e-4, rtol=1e-4)


def test_gradient_through_one_output_only():
    """Only entropy (or only out) in the loss: the other incoming gradient is None/zeros."""
    q, k, v, t, _, _, _ = make_inputs(16, 32, torch.float32, "H", False, seed=4)
    for pick in (0, 1):
        grads = []
        for fn in (triton_entropic_attention, eager_attention):
            leaves = [x.clone().requires_grad_() for x in (q, k, v, t)]
            outs = fn(*leaves[:3], causal=True, temperature=leaves[3])
            outs[pick].float().square().sum().backward()
            grads.append([torch.zeros_like(x) if x.grad is None else x.grad for x in leaves])
        for a, b in zip(*grads, strict=False):  # entropy does not depend on v: the reference leaves v.grad None
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_scale_argument_and_output_dtypes():
    q, k, v, _, _, _, _ = make_inputs(16, 32, torch.float16, None, False, seed=5)
    out, ent = triton_entropic_attention(q, k, v, causal=False, scale=0.3)
    assert out.dtype == torch.float16 and out.shape == q.shape
    assert ent.dtype == torch.float32 and ent.shape == q.shape[:3]
    ref_out, ref_ent = reference_entropic_attention(q.float(), k.float(), v.float(), causal=False, scale=0.3)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ent, ref_ent, atol=2e-3, rtol=2e-3)


def test_bf16_under_interpreter_runs_fp32_kernels_and_is_correct():
    """bf16 math is wrong in the interpreter, so bf16 inputs are upcast on the host: results must be right.

    The comparison is against the fp32 reference on the same (bf16-representable) inputs; the only error left is
    the final rounding of ``out`` to bf16, and gradients come back in bf16.
    """
    assert interpreter_enabled()
    q, k, v, t, kpm, d_out, d_ent = make_inputs(37, 32, torch.bfloat16, "HT", True, seed=6)
    q, k, v = q.float(), k.float(), v.float()
    d_out = d_out.to(torch.bfloat16).float()  # the gradient of a bf16 output arrives in bf16
    ref = run(eager_attention, q, k, v, t, kpm, d_out, d_ent, True, torch.float32)
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    temp = t.clone().requires_grad_()
    out, ent = triton_entropic_attention(*leaves, causal=True, temperature=temp, key_padding_mask=kpm)
    assert out.dtype == torch.bfloat16 and ent.dtype == torch.float32
    ((out.float() * d_out).sum() + (ent * d_ent).sum()).backward()
    assert all(x.grad.dtype == torch.bfloat16 for x in leaves)
    bf16_eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(out.float(), ref["out"], atol=2 * bf16_eps, rtol=bf16_eps)
    torch.testing.assert_close(ent, ref["ent"], atol=1e-4, rtol=1e-4)
    for name, x in zip(("dq", "dk", "dv"), leaves, strict=False):
        torch.testing.assert_close(x.grad.float(), ref[name], atol=2 * bf16_eps, rtol=bf16_eps)
    torch.testing.assert_close(temp.grad, ref["dt"], atol=1e-4, rtol=1e-4)


def test_input_validation():
    q, k, v, _, _, _, _ = make_inputs(16, 32, torch.float32, None, False)
    with pytest.raises(ValueError, match="temperature"):
        triton_entropic_attention(q, k, v, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        triton_entropic_attention(q, k, v, key_padding_mask=torch.ones(B, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="fp16, bf16 and fp32"):
        triton_entropic_attention(q.double(), k.double(), v.double())


def test_package_flags():
    assert entropic_kernels.TRITON_AVAILABLE
    assert entropic_kernels.interpreter_enabled()


def test_cpu_without_interpreter_raises_clear_error():
    code = (
        "import os, torch\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "import entropic_kernels as ek\n"
        "assert ek.TRITON_AVAILABLE and not ek.interpreter_enabled()\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "try:\n"
        "    ek.triton_entropic_attention(q, q, q)\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e), e\n"
        "    print('OK')\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_import_without_triton_does_not_fail():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "import torch, entropic_kernels as ek\n"
        "assert not ek.TRITON_AVAILABLE and ek.TRITON_IMPORT_ERROR\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "try:\n"
        "    ek.triton_entropic_attention(q, q, q)\n"
        "except RuntimeError as e:\n"
        "    assert 'needs Triton' in str(e), e\n"
        "    print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_double_backward_is_refused():
    q, k, v, _, _, _, _ = make_inputs(16, 32, torch.float32, None, False)
    q.requires_grad_()
    _out, ent = triton_entropic_attention(q, k, v)
    (grad_q,) = torch.autograd.grad(ent.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_q.sum().backward()


_SM90_COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import entropic_kernels.attention as A

target = GPUTarget("cuda", 90, 32)
ints = {"H", "T_Q", "T_K", "CAUSAL_OFFSET", "Q_BUCKET", "K_BUCKET"}
fp32_ptrs = {"TEMP", "LSE", "ENT", "DELTA", "DENT", "DT"}


def build(fn, dtype, consts, warps):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ints:
            sig[name] = "i32"
        elif name == "sm_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "*" + ("fp32" if name in fp32_ptrs else "u8" if name == "KPM" else dtype)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                            options={"num_warps": warps, "num_stages": 3})
    assert kernel.asm["cubin"], fn
    return kernel


flags = dict(CAUSAL=True, HAS_TEMP=True, HAS_KPM=True, IEEE_DOT=False, HEAD_DIM=64, BLOCK_D=64)
fwd = build(A._entropic_attn_fwd, "bf16", dict(flags, BLOCK_M=128, BLOCK_N=64), 4)
assert "async_copy" in fwd.asm["ttgir"], "K/V loads are not software-pipelined"
build(A._entropic_attn_bwd_dkdv, "bf16", dict(flags, BLOCK_M=64, BLOCK_N=64), 4)
build(A._entropic_attn_bwd_dq, "bf16", dict(flags, BLOCK_M=64, BLOCK_N=64), 4)
build(A._entropic_attn_bwd_preprocess, "bf16", dict(BLOCK_M=64, BLOCK_D=64, HEAD_DIM=64), 4)
print("OK")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile (bf16, D=64, causal + temperature + padding) to an sm_90 cubin with the bundled ptxas.

    Catches interpreter-only constructs (e.g. non-constexpr globals) on a machine with no GPU.
    """
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:  # pragma: no cover - internal API moved in another triton version
        pytest.skip(f"triton ahead-of-time compile API not available: {exc}")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SM90_COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_autotune_key_names_kernel_arguments_and_buckets_lengths():
    """Triton's autotuner silently drops key names that are not kernel arguments, so check every one is.

    Lengths are keyed by power-of-two bucket: 1,000 and 1,024 share one tuning run, 1,025 starts the next.
    """
    from entropic_kernels import attention

    for kernel in (attention._entropic_attn_fwd, attention._entropic_attn_bwd_dkdv, attention._entropic_attn_bwd_dq):
        missing = set(attention._AUTOTUNE_KEY) - set(kernel.arg_names)
        assert not missing, (kernel.fn.__name__, missing)
    assert [attention.length_bucket(t) for t in (1, 16, 17, 1000, 1024, 1025)] == [16, 16, 32, 1024, 1024, 2048]

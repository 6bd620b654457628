"""Compiled (non-interpreter) Triton kernel checks on a CUDA GPU, run by tests/test_triton_cuda.py in a subprocess.

The test process has TRITON_INTERPRET=1 (tests/conftest.py), which entropic_kernels reads when it is imported, so
the compiled path needs a process of its own. Prints one JSON object: one row per case with the errors of our
kernel and of plain PyTorch in the same precision, both against an fp32 reference (FlashAttention's rule: ours
must be within 2x of plain PyTorch's error), and the autotuner cache sizes after several sequence lengths.

    python tests/cuda_kernel_checks.py    # on a GPU machine, TRITON_INTERPRET unset
"""

from __future__ import annotations

import json
import math
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch
from entropic_kernels import attention, triton_entropic_attention

torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be real fp32


def eager(q, k, v, *, causal, temperature=None, key_padding_mask=None):
    """Plain PyTorch attention and row entropy in the inputs' dtype: [B, H, T, D] -> out, entropy [B, H, T]."""
    _, heads, t_q, dim = q.shape
    t_k = k.shape[-2]
    logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dim)
    if temperature is not None:
        logits = logits / temperature.to(q.dtype).view(1, heads, t_q, 1)
    visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.tril(visible, diagonal=t_k - t_q)
    visible = visible.view(1, 1, t_q, t_k)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.view(-1, 1, 1, t_k)
    logits = logits.masked_fill(~visible, torch.finfo(q.dtype).min)
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp() * visible
    entropy = -(probs * log_probs.masked_fill(~visible, 0.0)).sum(-1)
    return torch.matmul(probs, v), entropy.float()


def forward_backward(fn, inputs, dtype):
    q, k, v, temp, kpm, d_out, d_ent, causal = inputs
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    t = temp.detach().clone().requires_grad_()
    out, ent = fn(*leaves, causal=causal, temperature=t, key_padding_mask=kpm)
    ((out.float() * d_out).sum() + (ent.float() * d_ent).sum()).backward()
    grads = {name: x.grad.float() for name, x in zip(("dq", "dk", "dv"), leaves, strict=True)}
    return {"out": out.float(), "ent": ent.float(), **grads, "dt": t.grad.float()}


def make_inputs(batch, heads, t_len, dim, causal, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    kpm = torch.ones(batch, t_len, dtype=torch.bool, device="cuda")
    kpm[0, t_len - 7 :] = False
    temp = 0.5 + torch.rand(heads, t_len, generator=gen, device="cuda")
    qkv = [randn(batch, heads, t_len, dim) for _ in range(3)]
    return (*qkv, temp, kpm, randn(batch, heads, t_len, dim), randn(batch, heads, t_len), causal)


def main() -> None:
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for dim in (32, 64, 128):
            for t_len in (128, 1000):
                for causal in (True, False):
                    inputs = make_inputs(2, 3, t_len, dim, causal, seed=dim + t_len)
                    ref = forward_backward(eager, inputs, torch.float32)
                    ours = forward_backward(triton_entropic_attention, inputs, dtype)
                    plain = forward_backward(eager, inputs, dtype)
                    for name in ref:
                        rows.append(
                            {
                                "dtype": str(dtype).removeprefix("torch."),
                                "D": dim,
                                "T": t_len,
                                "causal": causal,
                                "tensor": name,
                                "ours_err": (ours[name] - ref[name]).abs().max().item(),
                                "plain_err": (plain[name] - ref[name]).abs().max().item(),
                            }
                        )
    # KV-cache-like lengths: one autotuning run per power-of-two bucket, not per length.
    before = len(attention._fwd_tuned.cache)
    for t_len in (200, 220, 250, 256):
        q, k, v = (torch.randn(1, 2, t_len, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        triton_entropic_attention(q, k, v, causal=True)
    cache = {"new_fwd_tunings": len(attention._fwd_tuned.cache) - before, "lengths_run": [200, 220, 250, 256]}
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows, "autotune": cache}))


if __name__ == "__main__":
    main()

"""Build a :class:`pi_eval.plan.ModelPlan` from an ``entropic.models.EntropicForCausalLM``.

Linear layers are read by probing (``W = f(I) - f(0)``, ``b = f(0)``), so weight- and spectral-normalized layers
(torch parametrizations) yield the static matrix they compute at inference, with no knowledge of the
parametrization.  Model and plan are compared in the tests (float64 forward vs the torch model's logits).
"""

from __future__ import annotations

import numpy as np

from .plan import LN, Block, ModelPlan


def _affine(lin, d_in: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        p = next(lin.parameters())
        eye = torch.eye(d_in, dtype=p.dtype, device=p.device)
        zero = torch.zeros(1, d_in, dtype=p.dtype, device=p.device)
        b = lin(zero)[0].double().cpu().numpy()
        W = lin(eye).double().cpu().numpy() - b[None, :]
    return W, b


def _ln(mod) -> LN | None:
    import torch

    if not isinstance(mod, torch.nn.LayerNorm):
        return None
    d = mod.normalized_shape[0]
    g = mod.weight.detach().double().cpu().numpy() if mod.weight is not None else np.ones(d)
    b = mod.bias.detach().double().cpu().numpy() if mod.bias is not None else np.zeros(d)
    return LN(g, b, float(mod.eps))


def plan_from_model(model, name: str | None = None) -> ModelPlan:
    import torch

    cfg = model.config
    model = model.eval()
    tr = model.transformer
    d = cfg.n_embd
    blocks = []
    with torch.no_grad():
        for blk in tr.h:
            att = blk.attn
            parts = [_affine(p, d) for p in (att.q_proj, att.k_proj, att.v_proj)]
            w_qkv = np.concatenate([p[0] for p in parts], axis=1)
            b_qkv = np.concatenate([p[1] for p in parts])
            w_o, b_o = _affine(att.c_proj, d)
            scale = None
            if att.temperature is not None:
                scale = 1.0 / att.temperature.temperature.detach().double().cpu().numpy()
            b = Block(cfg.n_head, w_qkv, b_qkv, w_o, b_o, ln1=_ln(blk.ln_1), ln2=_ln(blk.ln_2), attn_scale=scale)
            mlp = blk.mlp
            if hasattr(mlp, "c_fused"):
                b.ffn, b.act = "fused", "identity"
                b.w_in, b.b_in = _affine(mlp.c_fused, d)
            else:
                b.ffn = "mlp"
                act = type(mlp.act).__name__
                if act == "GELU":
                    b.act = "gelu_tanh" if getattr(mlp.act, "approximate", "none") == "tanh" else "gelu"
                elif act == "ReLU":
                    b.act = "relu"
                elif act == "Identity":
                    b.act = "identity"
                else:
                    raise ValueError(f"unsupported FFN activation module {act}")
                b.w_in, b.b_in = _affine(mlp.c_fc, d)
                b.w_out, b.b_out = _affine(mlp.c_proj, mlp.c_fc.out_features)
            if blk.ffn_scale is not None:
                b.alpha = float(blk.ffn_scale.alpha.detach())
                b.beta = float(blk.ffn_scale.beta.detach())
            blocks.append(b)
        w_head, b_head = _affine(model.lm_head, d)
        wte = tr.wte.weight.detach().double().cpu().numpy()
        wpe = tr.wpe.weight.detach().double().cpu().numpy()
    return ModelPlan(
        wte,
        wpe,
        blocks,
        _ln(tr.ln_f),
        w_head,
        b_head if np.any(b_head) else None,
        name=name or getattr(cfg, "name_or_path", "") or "entropic",
        info={
            "n_layer": cfg.n_layer,
            "n_embd": d,
            "n_head": cfg.n_head,
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.n_positions,
        },
    )


def build_model(
    preset: str,
    *,
    n_layer: int,
    d_model: int,
    n_head: int,
    vocab_size: int,
    n_positions: int,
    seed: int = 0,
    init_std: float | None = None,
):
    """A randomly initialised EntropicForCausalLM for a preset (float64 for a clean comparison)."""
    import torch

    from entropic.models import EntropicConfig, EntropicForCausalLM

    torch.manual_seed(seed)
    cfg = EntropicConfig.from_preset(
        preset, n_layer=n_layer, n_embd=d_model, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions
    )
    if init_std is not None:
        cfg.initializer_range = init_std
    model = EntropicForCausalLM(cfg).eval().double()
    return model


def torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids)[None, :], dtype=torch.long))
    return out.logits[0].double().cpu().numpy()

"""entropic.accounting against every GPT-2 row of the paper's cost tables (paper.md §4)."""

from __future__ import annotations

import types

import pytest

from entropic.accounting import NONLINEAR_OPS, OpCount, flops, nonlinear_ops
from entropic.models import EntropicConfig, preset_names


def make_config(arch: str, n_layer: int = 12, n_positions: int = 1024, **overrides) -> EntropicConfig:
    """GPT-2 small (H=12, d=768) in the paper's architecture ``arch``."""
    return EntropicConfig.from_preset(
        arch, n_layer=n_layer, n_head=12, n_embd=768, n_positions=n_positions, **overrides
    )


def make_namespace(**overrides) -> types.SimpleNamespace:
    """A plain object with only the attributes accounting reads: the SM+LN+G baseline."""
    fields = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, ffn_mult=4, ln_attn=True, ln_ffn=True)
    fields.update(ln_final=True, activation="gelu", fuse_ffn=False)
    return types.SimpleNamespace(**{**fields, **overrides})


# (arch, T, L, attention kind, FFN layers kept, FFN GFLOPs, attention GFLOPs) as printed in the paper;
# None where the table leaves the cell empty. "simplified" = the He & Hofmann ("SOTA") rows;
# ffn_layers = the pruned "_i" rows (6 of 12 FFNs kept at T=128/256, 14 of 18 at L=18, 11 of 12 at T=512).
PAPER_ROWS = [
    # GPT-2, T=128
    ("SM+LN+G", 128, 12, "standard", None, 14.5, 7.7),
    ("SM+LN+R", 128, 12, "standard", None, 14.5, 7.7),
    ("SM+ScFFN", 128, 12, "simplified", None, 14.5, 3.9),
    ("SM+ScFuFFN", 128, 12, "simplified", None, 1.8, 3.9),
    ("SM+ScFuFFN", 128, 12, "simplified", 8, 1.2, 3.9),
    ("SM+ScFFN", 128, 12, "standard", None, 14.5, 7.7),
    ("SM+ScFuFFN", 128, 12, "standard", None, 1.8, 7.7),
    ("SM+ScFuFFN", 128, 12, "standard", 6, 0.9, 7.7),
    ("SM(t)+ScFuFFN", 128, 12, "standard", None, 1.8, 7.7),
    ("SM(t)+ScFuFFN", 128, 12, "standard", 6, 0.9, 7.7),
    # T=256
    ("SM+LN+G", 256, 12, "standard", None, 29.0, 16.3),
    ("SM+LN+R", 256, 12, "standard", None, 29.0, 16.3),
    ("SM+ScFFN", 256, 12, "simplified", None, 29.0, 8.5),
    ("SM+ScFuFFN", 256, 12, "simplified", None, 3.6, 8.5),
    ("SM+ScFFN", 256, 12, "standard", None, 29.0, 16.3),
    ("SM+ScFuFFN", 256, 12, "standard", None, 3.6, 16.3),
    ("SM+ScFuFFN", 256, 12, "standard", 6, 1.8, 16.3),
    ("SM(t)+ScFuFFN", 256, 12, "standard", None, 3.6, 16.3),
    ("SM(t)+ScFuFFN", 256, 12, "standard", 6, 1.8, None),
    # L=18, T=128
    ("SM+LN+G", 128, 18, "standard", None, 21.7, 11.6),
    ("SM+LN+R", 128, 18, "standard", None, 21.7, 11.6),
    ("SM+ScFFN", 128, 18, "simplified", None, 21.7, 5.9),
    ("SM+ScFFN", 128, 18, "standard", None, 21.7, 11.6),
    ("SM+ScFuFFN", 128, 18, "standard", None, 2.7, 11.6),
    ("SM+ScFuFFN", 128, 18, "standard", 14, 2.1, None),
    ("SM(t)+ScFuFFN", 128, 18, "standard", None, 2.7, None),
    ("SM(t)+ScFuFFN", 128, 18, "standard", 14, 2.1, None),
    # Languini, T=512
    ("SM+LN+G", 512, 12, "standard", None, 58.0, 36.2),
    ("SM+LN+R", 512, 12, "standard", None, 58.0, 36.2),
    ("SM+ScFFN", 512, 12, "simplified", None, 58.0, 19.3),
    ("SM+ScFFN", 512, 12, "standard", None, 58.0, 36.2),
    ("SM+ScFuFFN", 512, 12, "standard", None, 7.3, 36.2),
    ("SM+ScFuFFN", 512, 12, "standard", 11, 6.6, None),
    ("SM(t)+ScFuFFN", 512, 12, "standard", None, 7.3, None),
    ("SM(t)+ScFuFFN", 512, 12, "standard", 11, 6.6, None),
]


def _row_id(row) -> str:
    arch, t, n_layer, kind, kept, *_ = row
    return f"{arch}-T{t}-L{n_layer}-{kind}" + ("" if kept is None else f"-ffn{kept}")


@pytest.mark.parametrize("row", PAPER_ROWS, ids=[_row_id(r) for r in PAPER_ROWS])
def test_flops_match_paper_tables(row):
    arch, seq_len, n_layer, kind, kept, ffn_b, attn_b = row
    out = flops(make_config(arch, n_layer=n_layer), seq_len, attention=kind, ffn_layers=kept)
    assert set(out) == {"ffn", "attention"}
    assert round(out["ffn"] / 1e9, 1) == ffn_b  # exactly as printed
    if attn_b is not None:
        assert out["attention"] / 1e9 == pytest.approx(attn_b, rel=0.05)  # the acceptance bound
        assert round(out["attention"] / 1e9, 1) == attn_b  # and in fact to the printed digit


# (arch, T, L, expected {op: (count, shape)}) from the "#Nonlinear Ops" columns.
OP_ROWS = [
    ("SM+LN+G", 128, 12, {"softmax": (144, (128, 128)), "layernorm": (24, (128, 768)), "gelu": (12, (128, 3072))}),
    ("SM+LN+R", 128, 12, {"softmax": (144, (128, 128)), "layernorm": (24, (128, 768)), "relu": (12, (128, 3072))}),
    ("SM+ScFFN", 128, 12, {"softmax": (144, (128, 128))}),
    ("SM+ScFuFFN", 128, 12, {"softmax": (144, (128, 128))}),
    ("SM(t)+ScFuFFN", 128, 12, {"softmax": (144, (128, 128))}),
    ("SM+LN+G", 256, 12, {"softmax": (144, (256, 256)), "layernorm": (24, (256, 768)), "gelu": (12, (256, 3072))}),
    ("SM+LN+G", 128, 18, {"softmax": (216, (128, 128)), "layernorm": (36, (128, 768)), "gelu": (18, (128, 3072))}),
    ("SM+LN+R", 128, 18, {"softmax": (216, (128, 128)), "layernorm": (36, (128, 768)), "relu": (18, (128, 3072))}),
    ("SM+LN+G", 512, 12, {"softmax": (144, (512, 512)), "layernorm": (24, (512, 768)), "gelu": (12, (512, 3072))}),
    ("SM+ScFuFFN", 512, 12, {"softmax": (144, (512, 512))}),
]


@pytest.mark.parametrize("arch,seq_len,n_layer,expected", OP_ROWS, ids=[f"{r[0]}-T{r[1]}-L{r[2]}" for r in OP_ROWS])
def test_nonlinear_ops_match_paper_tables(arch, seq_len, n_layer, expected):
    ops = nonlinear_ops(make_config(arch, n_layer=n_layer), seq_len)
    assert set(ops) == set(NONLINEAR_OPS)
    for name in NONLINEAR_OPS:
        count, _shape = ops[name]
        if name in expected:
            assert (count, ops[name].shape) == expected[name], name
        else:
            assert count == 0, name


def test_final_layernorm_only_on_request():
    # The paper's He & Hofmann rows list one final LayerNorm [T×768] and nothing else but softmax.
    cfg = make_config("SM+ScFuFFN", ln_final=True)
    assert nonlinear_ops(cfg, 128)["layernorm"].count == 0
    assert nonlinear_ops(cfg, 128, include_final_ln=True)["layernorm"] == (1, (128, 768))
    assert nonlinear_ops(make_config("SM+LN+G", ln_final=True), 128, include_final_ln=True)["layernorm"].count == 25
    assert nonlinear_ops(make_config("SM+ScFuFFN", ln_final=False), 128, include_final_ln=True)["layernorm"].count == 0


def test_opcount_elements_and_pruned_ffn_ops():
    ops = nonlinear_ops(make_config("SM+LN+R"), 128, ffn_layers=6)
    assert ops["relu"] == OpCount(6, (128, 3072))
    assert ops["relu"].elements == 6 * 128 * 3072
    assert ops["softmax"].elements == 144 * 128 * 128


def test_flops_scale_linearly_in_layers_and_exactly():
    base = flops(make_config("SM+LN+G"), 128)
    d, t = 768, 128
    assert base["ffn"] == 12 * (2 * t * 2 * d * 4 * d + t * d)
    assert base["attention"] == 12 * (2 * t * 4 * d * d + 2 * t * t * d + d * t * (t + 1))
    assert flops(make_config("SM+LN+G", n_layer=24), 128)["ffn"] == 2 * base["ffn"]


def test_sequence_longer_than_context_raises():
    cfg = make_config("SM+LN+G", n_positions=128)
    with pytest.raises(ValueError, match=r"seq_len=129 is longer than the model's context n_positions=128"):
        flops(cfg, 129)
    with pytest.raises(ValueError, match=r"seq_len=256 is longer than the model's context n_positions=128"):
        nonlinear_ops(cfg, 256)
    with pytest.raises(ValueError, match=r"seq_len must be an int >= 1, got 0"):
        flops(cfg, 0)


def test_bad_options_raise():
    cfg = make_config("SM+LN+G")
    with pytest.raises(ValueError, match=r"attention must be one of \('standard', 'simplified'\), got 'sparse'"):
        flops(cfg, 128, attention="sparse")
    with pytest.raises(ValueError, match=r"ffn_layers must be an int in \[0, n_layer=12\], got 13"):
        flops(cfg, 128, ffn_layers=13)
    with pytest.raises(ValueError, match=r"unknown FFN activation 'swish'"):
        nonlinear_ops(make_namespace(activation="swish"), 128)


def test_accounting_duck_types_any_config():
    assert round(flops(make_namespace(), 128)["ffn"] / 1e9, 1) == 14.5
    assert nonlinear_ops(make_namespace(activation="gelu_new"), 128)["gelu"].count == 12


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_accounted(name):
    cfg = make_config(name)
    ops = nonlinear_ops(cfg, 128)
    assert ops["softmax"] == (144, (128, 128))
    assert ops["layernorm"].count == 12 * (cfg.ln_attn + cfg.ln_ffn)
    assert ops["gelu"].count + ops["relu"].count == (0 if cfg.activation == "identity" else 12)
    out = flops(cfg, 128)
    assert round(out["ffn"] / 1e9, 1) == (1.8 if cfg.fuse_ffn else 14.5)
    assert round(out["attention"] / 1e9, 1) == 7.7

"""entropic.functional: row entropies, maxima, the entropy penalty and head statistics."""

from __future__ import annotations

import math

import pytest
import torch

import entropic.functional as F

LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def _causal_mask(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


# ------------------------------------------------------------------------------------------------
# Row entropies
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 128])
def test_uniform_rows_have_entropy_log_n(n):
    probs = torch.full((3, 4, 5, n), 1.0 / n)
    torch.testing.assert_close(F.attention_entropy(probs), torch.full((3, 4, 5), math.log(n)))
    torch.testing.assert_close(
        F.entropy_from_logits(torch.randn(3, 4, 5, 1).expand(3, 4, 5, n)), torch.full((3, 4, 5), math.log(n))
    )


def test_one_hot_rows_have_zero_entropy_and_finite_gradients():
    probs = torch.nn.functional.one_hot(torch.tensor([[0, 3, 2], [1, 1, 0]]), 4).float().requires_grad_()
    ent = F.attention_entropy(probs)
    assert torch.equal(ent, torch.zeros(2, 3))
    ent.sum().backward()
    assert torch.isfinite(probs.grad).all()
    # Huge logits are one-hot too, without overflow.
    scores = torch.tensor([[1e4, 0.0, -1e4], [0.0, 3e4, 0.0]])
    assert torch.allclose(F.entropy_from_logits(scores), torch.zeros(2), atol=1e-6)


def test_causal_uniform_attention_reaches_the_causal_maxima():
    t = 128
    mask = _causal_mask(t)
    probs = mask.float() / mask.sum(-1, keepdim=True)
    per_query = F.attention_entropy(probs)
    torch.testing.assert_close(per_query, F.causal_max_entropy(t))
    torch.testing.assert_close(F.entropy_from_logits(torch.zeros(t, t), mask), F.causal_max_entropy(t))
    assert per_query[0] == 0 and per_query[-1] == pytest.approx(math.log(128))
    assert F.mean_causal_max_entropy(128) == pytest.approx(3.878, abs=5e-4)
    assert F.mean_causal_max_entropy(256) == pytest.approx(4.560, abs=5e-4)
    assert F.mean_causal_max_entropy(512) == pytest.approx(5.246, abs=5e-4)
    assert per_query.mean().item() == pytest.approx(F.mean_causal_max_entropy(t), rel=1e-6)
    assert F.max_entropy(128) == pytest.approx(4.852, abs=5e-4)


def test_maxima_reject_bad_lengths():
    with pytest.raises(ValueError, match=r"n must be an int >= 1, got 0"):
        F.max_entropy(0)
    with pytest.raises(ValueError, match=r"seq_len must be an int >= 1, got 2.5"):
        F.causal_max_entropy(2.5)
    with pytest.raises(ValueError, match=r"seq_len must be an int >= 1, got -3"):
        F.mean_causal_max_entropy(-3)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "causal+padding"])
def test_entropy_from_logits_agrees_with_attention_entropy(dtype, masked):
    b, h, t = 2, 3, 33
    scores = (3 * torch.randn(b, h, t, t)).to(dtype)
    mask = None
    if masked:
        padding = torch.ones(b, 1, 1, t, dtype=torch.bool)
        padding[1, ..., 25:] = False
        mask = _causal_mask(t) & padding
    from_logits = F.entropy_from_logits(scores, mask)
    assert from_logits.dtype == torch.float32 and from_logits.shape == (b, h, t)

    # The same low-precision scores through softmax in fp32: both paths accumulate in fp32.
    ref_scores = scores.float() if mask is None else scores.float().masked_fill(~mask, float("-inf"))
    probs32 = torch.softmax(ref_scores, dim=-1)
    torch.testing.assert_close(from_logits, F.attention_entropy(probs32), atol=2e-5, rtol=1e-5)

    # Probabilities stored in the low-precision dtype: input rounding only.
    atol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    ent_low = F.attention_entropy(probs32.to(dtype))
    assert ent_low.dtype == torch.float32
    torch.testing.assert_close(ent_low, from_logits, atol=atol, rtol=0)


def test_entropy_from_logits_handles_masked_rows_and_minus_inf():
    scores = torch.randn(2, 4, 4, requires_grad=True)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[0, 1] = False  # a row with no visible key
    mask[1, 2, :2] = False
    ent = F.entropy_from_logits(scores, mask)
    assert ent[0, 1] == 0
    ent.sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[0, 1], torch.zeros(4))  # no gradient from an empty row
    # -inf scores are masked keys.
    s = scores.detach().clone()
    s[1, 2, :2] = float("-inf")
    torch.testing.assert_close(F.entropy_from_logits(s)[1, 2], ent[1, 2].detach())
    # Gradient agrees with autograd through the probabilities.
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: F.entropy_from_logits(z), (x,))


def test_entropy_from_logits_rejects_bad_masks():
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        F.entropy_from_logits(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask of shape \(4,\) does not broadcast to scores of shape \(2, 3\)"):
        F.entropy_from_logits(torch.zeros(2, 3), torch.ones(4, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# Entropy penalty
# ------------------------------------------------------------------------------------------------

# Hand example: L=2, B=2, H=2, T=2, context_size=16, tolerance=0.1, so E_max = ln 16 and the band is
# τ = 0.1·ln 16 ≈ 0.277. Thresholds are chosen so the targets θ·E_max are exactly these values:
TARGETS = [[1.0, 2.0], [0.5, 1.5]]
# Row entropies e[l][h] = [[b0 q0, b0 q1], [b1 q0, b1 q1]]:
ROWS = {
    (0, 0): [[1.0, 1.2], [0.8, 1.4]],  # mean 1.1, δ = 0.1 inside: 0.  Per query δ = 0, .2, -.2, .4 -> 0.4² = 0.16
    (0, 1): [[2.5, 2.5], [2.5, 2.5]],  # mean 2.5, δ = 0.5: 0.25.       Per query 4 · 0.5² = 1.0
    (1, 0): [[0.0, 0.0], [0.0, 0.0]],  # mean 0.0, δ = -0.5: 0.25.      Per query 4 · 0.5² = 1.0
    (1, 1): [[1.0, 2.0], [1.0, 2.0]],  # mean 1.5, δ = 0: 0.            Per query δ = ±0.5 -> 4 · 0.25 = 1.0
}
# paper:     (0 + 0.25 + 0.25 + 0) / H / L          = 0.5 / 4  = 0.125
# per_query: (0.16 + 1.0 + 1.0 + 1.0) / H / L       = 3.16 / 4 = 0.79
PAPER_VALUE, PER_QUERY_VALUE = 0.125, 0.79


def _hand_example():
    ent = torch.zeros(2, 2, 2, 2)  # [L, B, H, T]
    for (layer, head), rows in ROWS.items():
        ent[layer, :, head, :] = torch.tensor(rows)
    thresholds = torch.tensor(TARGETS) / math.log(16)
    return ent, thresholds


@pytest.mark.parametrize("reduction,expected", [("paper", PAPER_VALUE), ("per_query", PER_QUERY_VALUE)])
def test_entropy_penalty_matches_hand_computation(reduction, expected):
    ent, thresholds = _hand_example()
    pen = F.entropy_penalty(ent, thresholds, context_size=16, tolerance=0.1, reduction=reduction)
    assert pen.dtype == torch.float32 and pen.dim() == 0
    assert pen.item() == pytest.approx(expected, rel=1e-5)
    # A sequence of L [B, H, T] tensors, and fp16 input, give the same value.
    as_list = F.entropy_penalty(list(ent), thresholds, context_size=16, tolerance=0.1, reduction=reduction)
    assert as_list.item() == pytest.approx(expected, rel=1e-5)
    half = F.entropy_penalty(ent.half(), thresholds.half(), context_size=16, tolerance=0.1, reduction=reduction)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected, rel=2e-3)


def test_entropy_penalty_with_zero_tolerance_is_the_mean_squared_deviation():
    ent, thresholds = _hand_example()
    # paper: δ = 0.1, 0.5, -0.5, 0 -> (0.01 + 0.25 + 0.25 + 0) / 4
    pen = F.entropy_penalty(ent, thresholds, context_size=16, tolerance=0.0)
    assert pen.item() == pytest.approx(0.51 / 4, rel=1e-5)


def test_per_query_reduction_equals_the_released_loop_form():
    torch.manual_seed(1)
    n_layer, batch, n_head, t = 3, 2, 4, 16
    ent = torch.rand(n_layer, batch, n_head, t) * math.log(t)
    thresholds = torch.rand(n_layer, n_head)
    e_max = math.log(t)
    total = 0.0
    for layer in range(n_layer):  # the authors' loop: sum over batch and queries, / heads, then / layers
        layer_total = 0.0
        for head in range(n_head):
            dev = ent[layer, :, head, :] - thresholds[layer, head] * e_max
            layer_total += torch.where(dev.abs() > 0.2 * e_max, dev, torch.zeros_like(dev)).square().sum().item()
        total += layer_total / n_head
    total /= n_layer
    pen = F.entropy_penalty(ent, thresholds, context_size=t, reduction="per_query")
    assert pen.item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("reduction", F.REDUCTIONS)
def test_entropy_penalty_is_zero_inside_the_band(reduction):
    n_layer, batch, n_head, t = 2, 3, 4, 8
    thresholds = torch.full((n_layer, n_head), 0.5, requires_grad=True)
    e_max = math.log(64)
    # Every row entropy within ±0.19·E_max of 0.5·E_max (band is ±0.2·E_max).
    ent = (0.5 + 0.19 * (2 * torch.rand(n_layer, batch, n_head, t) - 1)) * e_max
    ent.requires_grad_()
    pen = F.entropy_penalty(ent, thresholds, context_size=64, tolerance=0.2, reduction=reduction)
    assert pen.item() == 0
    pen.backward()
    assert torch.equal(ent.grad, torch.zeros_like(ent))
    assert torch.equal(thresholds.grad, torch.zeros_like(thresholds))


@pytest.mark.parametrize("reduction", F.REDUCTIONS)
def test_entropy_penalty_gradient_pushes_entropy_toward_the_threshold(reduction):
    ent, thresholds = _hand_example()
    targets = torch.tensor(TARGETS)[:, None, :, None]
    ent.requires_grad_()
    thresholds.requires_grad_()
    F.entropy_penalty(ent, thresholds, context_size=16, tolerance=0.1, reduction=reduction).backward()
    with torch.no_grad():
        stepped = ent - 0.1 * ent.grad  # one SGD step on the entropies
        before, after = (ent - targets).abs(), (stepped - targets).abs()
        moved = ent.grad != 0
        assert moved.any()
        assert (after[moved] < before[moved]).all()
        assert torch.equal(after[~moved], before[~moved])
        # The head-level deviation of the penalized heads shrinks too.
        head_before = (ent.mean(dim=(1, 3)) - torch.tensor(TARGETS)).abs()
        head_after = (stepped.mean(dim=(1, 3)) - torch.tensor(TARGETS)).abs()
        assert (head_after <= head_before + 1e-7).all()
        # One step on the thresholds moves each penalized target toward its entropy.
        new_targets = (thresholds - 0.1 * thresholds.grad) * math.log(16)
        head_mean = ent.mean(dim=(1, 3))
        changed = thresholds.grad != 0
        assert changed.any()
        old_gap = (head_mean - torch.tensor(TARGETS)).abs()[changed]
        new_gap = (head_mean - new_targets).abs()[changed]
        assert (new_gap < old_gap).all()


def test_entropy_penalty_rejects_bad_input():
    ent, thresholds = _hand_example()
    kwargs = dict(context_size=16)
    with pytest.raises(
        ValueError, match=r"thresholds must have shape \[L, H\] = \[2, 2\].*got thresholds of shape \(2, 3\)"
    ):
        F.entropy_penalty(ent, torch.zeros(2, 3), **kwargs)
    with pytest.raises(ValueError, match=r"row_entropy \(2, 2, 2, 2\)"):
        F.entropy_penalty(ent, torch.zeros(2), **kwargs)
    with pytest.raises(ValueError, match=r"tolerance must be a number in \[0, 1\), got 1.0"):
        F.entropy_penalty(ent, thresholds, tolerance=1.0, **kwargs)
    with pytest.raises(ValueError, match=r"tolerance must be a number in \[0, 1\), got -0.1"):
        F.entropy_penalty(ent, thresholds, tolerance=-0.1, **kwargs)
    with pytest.raises(ValueError, match=r"reduction must be one of \('paper', 'per_query'\), got 'mean'"):
        F.entropy_penalty(ent, thresholds, reduction="mean", **kwargs)
    with pytest.raises(ValueError, match=r"context_size must be an int >= 2 .*got 1"):
        F.entropy_penalty(ent, thresholds, context_size=1)
    with pytest.raises(ValueError, match=r"context_size must be an int >= 2 .*got 16.0"):
        F.entropy_penalty(ent, thresholds, context_size=16.0)
    with pytest.raises(ValueError, match=r"must be \[L, B, H, T\].*got a tensor of shape \(2, 2, 2\)"):
        F.entropy_penalty(ent[0], thresholds, **kwargs)
    with pytest.raises(ValueError, match=r"one shape \[B, H, T\]; got shapes \[\(2, 2, 2\), \(2, 2, 3\)\]"):
        F.entropy_penalty([ent[0, ..., :2], torch.zeros(2, 2, 3)], thresholds, **kwargs)
    with pytest.raises(ValueError, match=r"empty sequence"):
        F.entropy_penalty([], thresholds, **kwargs)
    with pytest.raises(TypeError, match=r"thresholds must be a tensor of shape \[L, H\] = \[2, 2\]"):
        F.entropy_penalty(ent, [[0.1, 0.2], [0.3, 0.4]], **kwargs)


# ------------------------------------------------------------------------------------------------
# Head statistics
# ------------------------------------------------------------------------------------------------


def test_head_entropy_means_over_batch_and_queries():
    ent, _ = _hand_example()
    torch.testing.assert_close(F.head_entropy(ent), torch.tensor([[1.1, 2.5], [0.0, 1.5]]))
    torch.testing.assert_close(F.head_entropy(list(ent)), F.head_entropy(ent))
    torch.testing.assert_close(F.head_entropy(ent[1]), torch.tensor([0.0, 1.5]))
    # Query mask: keep only query 0 of batch row 0 and both queries of row 1.
    qmask = torch.tensor([[True, False], [True, True]])
    expected = torch.tensor([[(1.0 + 0.8 + 1.4) / 3, 2.5], [0.0, (1.0 + 1.0 + 2.0) / 3]])
    torch.testing.assert_close(F.head_entropy(ent, qmask), expected)
    with pytest.raises(ValueError, match=r"query_mask must be a bool tensor of shape \[B, T\] = \[2, 2\]"):
        F.head_entropy(ent, torch.ones(2, 3, dtype=torch.bool))


def test_entropy_bin_shares_use_the_largest_observed_head():
    heads = torch.tensor([[0.5, 1.5, 2.5, 3.5], [4.0, 0.9, 1.0, 3.0]])
    # max = 4.0: edges 1, 2, 3; 1.0 and 3.0 sit on edges and go up; 4.0 is in the closed top bin.
    bins = F.entropy_bin_shares(heads)
    assert bins.max_value == 4.0
    assert bins.counts == (2, 2, 1, 3)
    assert bins.shares == (0.25, 0.25, 0.125, 0.375)
    assert bins.as_dict() == {
        "entropy/bin_0_share": 0.25,
        "entropy/bin_1_share": 0.25,
        "entropy/bin_2_share": 0.125,
        "entropy/bin_3_share": 0.375,
    }
    fixed = F.entropy_bin_shares(heads, max_value=8.0)
    assert fixed.counts == (4, 3, 1, 0)
    # Values above a given maximum land in the top bin; NaN heads are left out and counted.
    with_nan = F.entropy_bin_shares(torch.tensor([1.0, 5.0, float("nan")]), max_value=4.0)
    assert with_nan.counts == (0, 1, 0, 1) and with_nan.n_nonfinite == 1
    assert F.entropy_bin_shares(torch.zeros(3)).counts == (3, 0, 0, 0)
    with pytest.raises(ValueError, match=r"max_value must be a finite number >= 0 or None, got -1.0"):
        F.entropy_bin_shares(heads, max_value=-1.0)


def test_entropic_overload_flags_a_crowded_top_bin():
    overloaded = torch.tensor([[3.8, 3.9, 3.7, 3.85], [2.0, 2.0, 1.5, 2.5]])  # max 3.9, top bin >= 2.925
    report = F.entropic_overload(overloaded)
    assert report.overloaded and report.share == 0.5
    assert report.layer_shares == (1.0, 0.0)
    assert report.max_value == pytest.approx(3.9)
    assert report.as_dict() == {"entropy/overload/share": 0.5, "entropy/overload/flag": 1.0}
    healthy = torch.tensor([[3.9, 2.0, 1.9, 2.2], [2.0, 2.1, 1.5, 2.5]])
    report = F.entropic_overload(healthy)
    assert not report.overloaded and report.share == 0.125 and report.threshold == 0.2
    assert F.entropic_overload(healthy, threshold=0.1).overloaded
    with pytest.raises(ValueError, match=r"threshold must be a share in \[0, 1\], got 1.5"):
        F.entropic_overload(healthy, threshold=1.5)


def test_entropy_collapse_on_the_softmax_only_heatmap():
    # Layer means of the diverging Softmax-only GPT-2 (paper §2), two identical heads per layer.
    layer_means = [3.59, 3.85, 3.82, 3.79, 3.74, 2.60, 2.13, 1.97, 0.52, 0.18, 0.06, 0.04]
    heads = torch.tensor(layer_means)[:, None].repeat(1, 2)
    report = F.entropy_collapse(heads, context_size=128)
    assert report.floor == pytest.approx(0.05 * 3.878, abs=1e-3)
    assert report.collapsed and not report.nonfinite
    assert report.collapsed_layers == (9, 10, 11)
    assert report.low_heads == ((9, 0), (9, 1), (10, 0), (10, 1), (11, 0), (11, 1))
    assert report.as_dict()["entropy/collapse/layers"] == 3.0


def test_entropy_collapse_ignores_single_sharp_heads_and_shallow_layers():
    heads = torch.full((6, 4), 2.0)
    heads[4, 1] = 0.01  # one sharp head in a deep layer: reported, not a collapse
    heads[0] = 0.0  # a whole shallow layer near zero: outside the deep layers
    report = F.entropy_collapse(heads, context_size=64)
    assert not report.collapsed
    assert report.low_heads == ((4, 1),)
    assert F.entropy_collapse(heads, context_size=64, first_deep_layer=0).collapsed_layers == (0,)
    assert F.entropy_collapse(heads, context_size=64, min_head_share=0.25).collapsed_layers == (4,)


def test_entropy_collapse_reports_nonfinite_heads():
    heads = torch.full((4, 3), 2.0)
    heads[1, 2] = float("nan")
    heads[3, 0] = float("inf")
    report = F.entropy_collapse(heads, context_size=128)
    assert report.collapsed and report.nonfinite
    assert report.nonfinite_heads == ((1, 2), (3, 0))
    assert report.collapsed_layers == ()


def test_entropy_collapse_rejects_bad_arguments():
    heads = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"context_size must be an int >= 2, got 1"):
        F.entropy_collapse(heads, context_size=1)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\), got 0.0"):
        F.entropy_collapse(heads, context_size=8, fraction=0.0)
    with pytest.raises(ValueError, match=r"first_deep_layer must be in \[0, L=4\], got 5"):
        F.entropy_collapse(heads, context_size=8, first_deep_layer=5)
    with pytest.raises(ValueError, match=r"head_entropy must be \[L, H\], got shape \(4,\)"):
        F.entropy_collapse(torch.ones(4), context_size=8)

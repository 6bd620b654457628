"""Exact attention-entropy math: row entropies, their maxima, the entropy penalty and head statistics.

Every function accumulates in fp32 whatever the input dtype (fp64 input stays fp64) and returns fp32
tensors (or Python numbers), so fp16/bf16 activations give the same entropies as fp32 ones up to input
rounding.

Shapes used throughout:

* ``L`` layers, ``B`` batch rows, ``H`` heads, ``T`` (``Tq``/``Tk``) query/key positions.
* *row entropy*: the Shannon entropy (nats) of one query row of an attention matrix, ``[..., Tq]``.
* *head entropy*: the row entropy averaged over batch rows and queries, ``[L, H]`` (paper Eq. 7).

References are to ``Jha & Reagen, Entropy-Guided Attention for Private LLMs`` (arXiv:2501.03489) and
its companion AERO (arXiv:2410.13060).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BIN_LABELS",
    "DEFAULT_THRESHOLD",
    "REDUCTIONS",
    "EntropicOverload",
    "EntropyBinShares",
    "EntropyCollapse",
    "attention_entropy",
    "causal_max_entropy",
    "entropic_overload",
    "entropy_and_max_totals",
    "entropy_bin_shares",
    "entropy_collapse",
    "entropy_from_logits",
    "entropy_penalty",
    "head_entropy",
    "heads_in_band",
    "max_entropy",
    "mean_causal_max_entropy",
    "mean_entropy_fraction",
    "query_key_counts",
]

REDUCTIONS = ("paper", "per_query")

DEFAULT_THRESHOLD = 0.35
"""The one default initial threshold θ (a fraction of E_max = log T) of every penalty owner.

The paper does not state its init; its learned thresholds lie in about 0.20-0.52 (layer means 0.3-0.45), and
0.35 starts every head in the middle of that range.
"""


def _acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the accumulation dtype: fp32, or fp64 when ``x`` already is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# Row entropies
# ---------------------------------------------------------------------------------------------


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of an attention-probability tensor.

    ``H_i = -sum_j p_ij log p_ij``, computed in fp32. Entries equal to zero (masked keys) contribute
    exactly 0, in the forward pass and in the gradient: no ``0 * log 0`` NaN and no ``+eps`` bias.

    Args:
        probs: ``[..., Tq, Tk]`` probabilities (each row sums to 1 over its unmasked keys).

    Returns:
        ``[..., Tq]`` fp32 row entropies.
    """
    if probs.dim() < 1:
        raise ValueError(
            f"probs must have at least 1 dimension (the key axis), got a scalar of shape {tuple(probs.shape)}"
        )
    p = _acc(probs)
    positive = p > 0
    # Take log(1) = 0 where p == 0: the term p·log p is then exactly 0 and its gradient stays finite.
    log_p = torch.log(torch.where(positive, p, torch.ones_like(p)))
    return -(p * log_p).sum(dim=-1)


def entropy_from_logits(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of ``softmax(scores)`` along the last axis, without materializing ``log p``.

    Uses ``H = logsumexp(s) - E_p[s]``, evaluated after subtracting the row maximum
    (``H = log Z - sum_j p_j (s_j - m)`` with ``Z = sum_j exp(s_j - m)``), in fp32. Masked keys never
    enter a logarithm, so there is no ``log 0`` anywhere.

    Args:
        scores: ``[..., Tq, Tk]`` attention logits (after any scaling / temperature). Entries equal to
            ``-inf`` are treated as masked.
        mask: optional bool tensor broadcastable to ``scores``; ``True`` = the key is visible.

    Returns:
        ``[..., Tq]`` fp32 row entropies. A row with no visible key has entropy 0 (and zero gradient).
        NaN scores propagate, so instabilities stay visible.
    """
    s = _acc(scores)
    keep = s != float("-inf")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = keep), got dtype {mask.dtype}")
        try:
            keep = keep & mask
        except RuntimeError as err:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to scores of shape {tuple(s.shape)}"
            ) from err
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    any_visible = keep.any(dim=-1, keepdim=True)
    # Shift by the (detached) row max over visible keys: H is shift-invariant, so this is exact.
    row_max = torch.where(keep, s, torch.full_like(s, float("-inf"))).amax(dim=-1, keepdim=True)
    row_max = torch.where(any_visible, row_max, zero).detach()
    shifted = torch.where(keep, s - row_max, zero)  # finite everywhere (unless s has NaN/+inf)
    unnorm = torch.where(keep, torch.exp(shifted), zero)
    norm = unnorm.sum(dim=-1, keepdim=True)
    norm = torch.where(any_visible, norm, torch.ones_like(norm))  # avoid 0/0 on empty rows
    p = unnorm / norm
    ent = torch.log(norm) - (p * shifted).sum(dim=-1, keepdim=True)
    return torch.where(any_visible, ent, zero).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Maxima
# ---------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def max_entropy(n: int) -> float:
    """Largest possible entropy of a distribution over ``n`` keys: ``log(n)`` (the paper's E_max)."""
    return math.log(_check_positive_int("n", n))


def causal_max_entropy(
    seq_len: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-query maximum entropy under a causal mask: query ``i`` (0-based) sees ``i + 1`` keys.

    Returns:
        ``[seq_len]`` tensor ``log(i + 1)``; the first query always has entropy 0.
    """
    seq_len = _check_positive_int("seq_len", seq_len)
    return torch.arange(1, seq_len + 1, device=device, dtype=torch.float64).log().to(dtype)


def mean_causal_max_entropy(seq_len: int) -> float:
    """Query-averaged causal maximum ``(1/T) sum_{i=1..T} log i = lgamma(T + 1) / T``.

    This (not ``log T``) is the largest *head* entropy a causal model can reach: 3.878 nats for
    T=128 where ``log 128`` = 4.852 (paper.md §1). Uniform causal attention attains it.
    """
    seq_len = _check_positive_int("seq_len", seq_len)
    return math.lgamma(seq_len + 1) / seq_len


# ---------------------------------------------------------------------------------------------
# Entropy penalty (Algorithm 1)
# ---------------------------------------------------------------------------------------------


def _stack_layers(row_entropy: torch.Tensor | Sequence[torch.Tensor], name: str = "row_entropy") -> torch.Tensor:
    """[L, B, H, T] tensor, or a sequence of L [B, H, T] tensors -> one [L, B, H, T] tensor."""
    if isinstance(row_entropy, torch.Tensor):
        if row_entropy.dim() != 4:
            raise ValueError(
                f"{name} must be [L, B, H, T] (or a sequence of L tensors [B, H, T]); "
                f"got a tensor of shape {tuple(row_entropy.shape)}"
            )
        return row_entropy
    layers = list(row_entropy)
    if not layers:
        raise ValueError(f"{name} is an empty sequence; expected L >= 1 tensors of shape [B, H, T]")
    shapes = [tuple(t.shape) for t in layers]
    if any(len(s) != 3 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"{name} as a sequence must hold L tensors of one shape [B, H, T]; got shapes {shapes}")
    return torch.stack(layers)


def entropy_penalty(
    row_entropy: torch.Tensor | Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    *,
    context_size: int,
    tolerance: float = 0.2,
    reduction: str = "paper",
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Entropy-regularization penalty of Algorithm 1, unweighted (the caller multiplies by λ).

    With ``E_max = log(context_size)``, band half-width ``τ = tolerance · E_max`` and per-head
    targets ``θ_{l,h} · E_max``:

    ``reduction="paper"`` (Algorithm 1; the head entropy is averaged first)::

        E_{l,h} = 1/(B·T) Σ_{b,i} e_{l,b,h,i}
        δ_{l,h} = E_{l,h} − θ_{l,h}·E_max
        P = 1/L Σ_l 1/H Σ_h  δ_{l,h}² · 1[|δ_{l,h}| > τ]

    ``reduction="per_query"`` (the authors' released loss; every row entropy is tested and squared,
    summed over batch rows and queries, then divided by heads and layers)::

        δ_{l,b,h,i} = e_{l,b,h,i} − θ_{l,h}·E_max
        P = 1/(L·H) Σ_{l,h} Σ_{b,i} δ_{l,b,h,i}² · 1[|δ_{l,b,h,i}| > τ]

    Note the penalty is the *full* squared deviation outside the band (not ``(|δ| − τ)²``), so it
    jumps from 0 to τ² at the band edge, as in the paper. The ``per_query`` value scales with B·T.

    Args:
        row_entropy: ``[L, B, H, T]`` row entropies in nats, or a sequence of L ``[B, H, T]`` tensors.
        thresholds: ``[L, H]`` targets as fractions of ``E_max`` (learnable; gradients flow to them).
        context_size: the ``T`` of ``E_max = log(T)``; an int >= 2.
        tolerance: ``γ`` in ``[0, 1)``; the band is ``±γ·E_max`` around each target.
        reduction: ``"paper"`` or ``"per_query"`` (see above).
        query_mask: optional bool ``[B, T]``, ``True`` for the queries that count (real tokens; a batch's
            ``attention_mask``). Padded queries are left out of the means and sums above, so padding, right or
            left, does not change the penalty of the real tokens.

    Returns:
        fp32 scalar, differentiable with respect to ``row_entropy`` and ``thresholds``.

    Raises:
        ValueError: for a bad shape, ``context_size``, ``tolerance``, ``reduction`` or ``query_mask``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 2:
        raise ValueError(f"context_size must be an int >= 2 (E_max = log(context_size)), got {context_size!r}")
    ent = _stack_layers(row_entropy).float()
    n_layer, _, n_head, _ = ent.shape
    if not isinstance(thresholds, torch.Tensor):
        raise TypeError(f"thresholds must be a tensor of shape [L, H] = [{n_layer}, {n_head}], got {type(thresholds)}")
    if tuple(thresholds.shape) != (n_layer, n_head):
        raise ValueError(
            f"thresholds must have shape [L, H] = [{n_layer}, {n_head}] to match row_entropy "
            f"{tuple(ent.shape)} ([L, B, H, T]); got thresholds of shape {tuple(thresholds.shape)}"
        )
    e_max = math.log(context_size)
    band = tolerance * e_max
    target = thresholds.float() * e_max  # [L, H]
    if reduction == "paper":
        dev = head_entropy(ent, query_mask) - target  # [L, H]
        return torch.where(dev.abs() > band, dev.square(), torch.zeros_like(dev)).mean()
    dev = ent - target[:, None, :, None]  # [L, B, H, T]
    outside = dev.abs() > band
    if query_mask is not None:
        outside = outside & _check_query_mask(query_mask, ent)[None, :, None, :]
    pen = torch.where(outside, dev.square(), torch.zeros_like(dev))
    return pen.sum() / (n_layer * n_head)


# ---------------------------------------------------------------------------------------------
# Head-level statistics (paper §2 definitions)
# ---------------------------------------------------------------------------------------------


def head_entropy(
    row_entropy: torch.Tensor | Sequence[torch.Tensor], query_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-head entropy: row entropies averaged over batch rows and queries (paper Eq. 7).

    Args:
        row_entropy: ``[L, B, H, T]`` (or a sequence of L ``[B, H, T]``) -> ``[L, H]``; a single layer
            ``[B, H, T]`` -> ``[H]``.
        query_mask: optional bool ``[B, T]``, ``True`` for queries to include (e.g. non-padding tokens).
            Heads with no included query get 0.

    Returns:
        fp32 ``[L, H]`` (or ``[H]``).
    """
    ent = row_entropy if isinstance(row_entropy, torch.Tensor) else _stack_layers(row_entropy)
    if ent.dim() not in (3, 4):
        raise ValueError(f"row_entropy must be [L, B, H, T] or [B, H, T], got shape {tuple(ent.shape)}")
    ent = ent.float()
    if query_mask is None:
        return ent.mean(dim=(-3, -1))
    keep = _check_query_mask(query_mask, ent)[:, None, :]  # [B, 1, T], broadcasts over heads (and layers)
    total = torch.where(keep, ent, torch.zeros_like(ent)).sum(dim=(-3, -1))
    return total / query_mask.sum().clamp_min(1).to(ent.dtype)


def _check_query_mask(query_mask: torch.Tensor, row_entropy: torch.Tensor) -> torch.Tensor:
    """``query_mask`` after checking it is a bool [B, T] matching ``row_entropy``'s [..., B, H, T]."""
    batch, _, seq = row_entropy.shape[-3:]
    if query_mask.dtype != torch.bool or tuple(query_mask.shape) != (batch, seq):
        raise ValueError(
            f"query_mask must be a bool tensor of shape [B, T] = [{batch}, {seq}] (True = a real token), "
            f"got {query_mask.dtype} {tuple(query_mask.shape)}"
        )
    return query_mask.to(row_entropy.device)


def query_key_counts(query_mask: torch.Tensor | None, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """How many keys each query may attend under a causal mask with key padding: ``[B, T]`` (or ``[1, T]``).

    Query ``i`` sees the real tokens at positions ``<= i``; for a real query that is its 1-based rank among the
    real tokens of its row, whatever the padding side. Padded queries get 0.
    """
    if query_mask is None:
        return torch.arange(1, seq_len + 1, device=device, dtype=torch.float32)[None, :]
    counts = query_mask.to(torch.float32).cumsum(-1)
    return torch.where(query_mask, counts, torch.zeros_like(counts))


def entropy_and_max_totals(
    row_entropy: torch.Tensor | Sequence[torch.Tensor], query_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[Σ e, Σ log(keys)]`` over layers, heads and (real) queries, fp64: the parts of :func:`mean_entropy_fraction`.

    Sums, so that data-parallel ranks can add theirs before dividing.
    """
    ent = _stack_layers(row_entropy).detach().to(torch.float64)
    n_layer, batch, n_head, seq = ent.shape
    if query_mask is not None:
        query_mask = _check_query_mask(query_mask, ent)
    keys = query_key_counts(query_mask, seq, ent.device)  # [B, T] or [1, T]
    row_max = keys.clamp_min(1).log().to(torch.float64).expand(batch, seq)  # [B, T]
    keep = torch.ones_like(row_max, dtype=torch.bool) if query_mask is None else query_mask
    total_max = row_max[keep].sum() * (n_head * n_layer)
    total = torch.where(keep[None, :, None, :], ent, torch.zeros_like(ent)).sum()
    return torch.stack([total, total_max])


def mean_entropy_fraction(
    row_entropy: torch.Tensor | Sequence[torch.Tensor], query_mask: torch.Tensor | None = None
) -> float:
    """Mean row entropy over layers, heads and (real) queries as a fraction of its causal maximum.

    1.0 is uniform causal attention over the real keys of every row, 0 one-hot attention. This is what the
    penalty's gate compares with its threshold to tell when attention has left uniform.

    Args:
        row_entropy: ``[L, B, H, T]`` (or a sequence of L ``[B, H, T]``) row entropies in nats.
        query_mask: optional bool ``[B, T]``, ``True`` for real tokens.

    Returns:
        Σ e / Σ log(keys of the query), both over the included rows; 1.0 when no included query has >= 2 keys.
    """
    total, total_max = entropy_and_max_totals(row_entropy, query_mask).tolist()
    return total / total_max if total_max > 0 else 1.0


def heads_in_band(
    head_ent: torch.Tensor, thresholds: torch.Tensor, *, context_size: int, tolerance: float = 0.2
) -> float:
    """Share of heads whose entropy lies inside the penalty's band ``|E - θ·E_max| <= γ·E_max``.

    Args:
        head_ent: ``[L, H]`` head entropies in nats (see :func:`head_entropy`).
        thresholds: ``[L, H]`` fractions θ of ``E_max = log(context_size)``.
        context_size: ``T`` of ``E_max``.
        tolerance: ``γ``.
    """
    e_max = math.log(_check_positive_int("context_size", context_size, minimum=2))
    dev = head_ent.detach().float() - thresholds.detach().float().to(head_ent.device) * e_max
    return float((dev.abs() <= tolerance * e_max).float().mean())


BIN_LABELS = ("[0, max/4)", "[max/4, max/2)", "[max/2, 3max/4)", "[3max/4, max]")
"""How tables and figures name the four entropy bins (quarters of the maximum head entropy)."""


@dataclass(frozen=True)
class EntropyBinShares:
    """Share of heads in each quarter of ``[0, max_value]`` (the paper's entropy-distribution bins).

    Attributes:
        shares: fraction of (finite) heads in ``[0, m/4)``, ``[m/4, m/2)``, ``[m/2, 3m/4)``, ``[3m/4, m]``.
        counts: the same as head counts.
        max_value: ``m``, the reference maximum used for the bin edges.
        n_nonfinite: heads with a NaN/inf entropy, left out of the shares.
    """

    shares: tuple[float, float, float, float]
    counts: tuple[int, int, int, int]
    max_value: float
    n_nonfinite: int = 0

    def as_dict(self, prefix: str = "entropy/") -> dict[str, float]:
        """Flat ``{prefix + "bin_0_share": share, ...}`` for loggers (the keys the monitor logs)."""
        return {f"{prefix}bin_{k}_share": share for k, share in enumerate(self.shares)}


def _bin_index(head_ent: torch.Tensor, max_value: float) -> torch.Tensor:
    if max_value <= 0:
        return torch.zeros_like(head_ent, dtype=torch.long)
    return torch.floor(head_ent * (4.0 / max_value)).clamp(0, 3).long()


def _observed_max(head_ent: torch.Tensor, max_value: float | None) -> float:
    if max_value is not None:
        if not math.isfinite(max_value) or max_value < 0:
            raise ValueError(f"max_value must be a finite number >= 0 or None, got {max_value!r}")
        return float(max_value)
    finite = head_ent[torch.isfinite(head_ent)]
    return float(finite.max()) if finite.numel() else 0.0


def entropy_bin_shares(head_entropy: torch.Tensor, max_value: float | None = None) -> EntropyBinShares:
    """Share of heads per entropy quarter, as in the paper's head-distribution figures.

    Args:
        head_entropy: per-head entropies, any shape (typically ``[L, H]``).
        max_value: the maximum ``m`` for the bin edges. Default ``None`` uses the largest observed
            (finite) head entropy, the paper's definition of "max". Pass e.g.
            :func:`mean_causal_max_entropy` for a fixed reference; values above ``m`` land in the top bin.

    Returns:
        :class:`EntropyBinShares`. NaN/inf heads are counted in ``n_nonfinite`` and excluded.
    """
    flat = head_entropy.detach().float().flatten()
    finite_mask = torch.isfinite(flat)
    finite = flat[finite_mask]
    m = _observed_max(finite, max_value)
    counts = torch.bincount(_bin_index(finite, m), minlength=4).tolist()
    total = max(finite.numel(), 1)
    return EntropyBinShares(
        shares=tuple(c / total for c in counts),  # type: ignore[arg-type]
        counts=tuple(counts),  # type: ignore[arg-type]
        max_value=m,
        n_nonfinite=int((~finite_mask).sum()),
    )


@dataclass(frozen=True)
class EntropicOverload:
    """Result of :func:`entropic_overload`.

    Attributes:
        overloaded: ``share > threshold``.
        share: fraction of heads in the top bin ``[3m/4, m]``.
        threshold: the share above which the model is called overloaded.
        layer_shares: per-layer fraction of that layer's heads in the top bin (overload concentrates in
            early layers in the paper's LN-free models).
        max_value: ``m`` used for the bins.
    """

    overloaded: bool
    share: float
    threshold: float
    layer_shares: tuple[float, ...]
    max_value: float

    def as_dict(self, prefix: str = "entropy/overload/") -> dict[str, float]:
        return {f"{prefix}share": self.share, f"{prefix}flag": float(self.overloaded)}


def entropic_overload(
    head_entropy: torch.Tensor, *, threshold: float = 0.2, max_value: float | None = None
) -> EntropicOverload:
    """Entropic overload: a disproportionate share of heads in the top entropy bin ``[3m/4, m]``.

    The paper gives no numeric cut-off. Its well-behaved baselines keep about 90% of heads in the
    middle bins, while the overloaded LN-free models report 23% (SM+R), 45% (SM) and 58% (SM+G) in the
    top bin; the default ``threshold=0.2`` separates those two regimes.

    Args:
        head_entropy: ``[L, H]`` per-head entropies (a 1-D tensor is treated as one layer).
        threshold: share in ``[0, 1]`` above which the model counts as overloaded.
        max_value: bin maximum; ``None`` = largest observed head entropy (paper definition).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a share in [0, 1], got {threshold!r}")
    ent = head_entropy.detach().float()
    ent = ent[None] if ent.dim() == 1 else ent
    if ent.dim() != 2:
        raise ValueError(f"head_entropy must be [L, H] or [H], got shape {tuple(head_entropy.shape)}")
    bins = entropy_bin_shares(ent, max_value)
    finite = torch.isfinite(ent)
    top = (_bin_index(torch.where(finite, ent, torch.zeros_like(ent)), bins.max_value) == 3) & finite
    layer_shares = (top.sum(dim=1) / finite.sum(dim=1).clamp_min(1)).tolist()
    share = bins.shares[3]
    return EntropicOverload(
        overloaded=share > threshold,
        share=share,
        threshold=threshold,
        layer_shares=tuple(layer_shares),
        max_value=bins.max_value,
    )


@dataclass(frozen=True)
class EntropyCollapse:
    """Result of :func:`entropy_collapse`.

    Attributes:
        collapsed: any NaN/inf entropy, or at least one collapsed deep layer.
        nonfinite: any NaN/inf entropy.
        nonfinite_heads: ``(layer, head)`` pairs with a NaN/inf entropy.
        low_heads: ``(layer, head)`` pairs in deep layers below ``floor``.
        collapsed_layers: deep layers where at least ``min_head_share`` of the heads are below ``floor``.
        floor: the entropy (nats) under which a head counts as collapsed.
    """

    collapsed: bool
    nonfinite: bool
    nonfinite_heads: tuple[tuple[int, int], ...]
    low_heads: tuple[tuple[int, int], ...]
    collapsed_layers: tuple[int, ...]
    floor: float

    def as_dict(self, prefix: str = "entropy/collapse/") -> dict[str, float]:
        return {
            f"{prefix}flag": float(self.collapsed),
            f"{prefix}nonfinite_heads": float(len(self.nonfinite_heads)),
            f"{prefix}low_heads": float(len(self.low_heads)),
            f"{prefix}layers": float(len(self.collapsed_layers)),
        }


def entropy_collapse(
    head_entropy: torch.Tensor,
    *,
    context_size: int,
    fraction: float = 0.05,
    first_deep_layer: int | None = None,
    min_head_share: float = 0.5,
    causal: bool = True,
) -> EntropyCollapse:
    """Entropy collapse: NaN/inf entropies, or near-zero entropy in deep layers (Zhai et al. 2023).

    A head is *low* when its entropy is below ``floor = fraction · reference``, where ``reference`` is
    :func:`mean_causal_max_entropy` (``causal=True``) or ``log(context_size)``. A deep layer is
    *collapsed* when at least ``min_head_share`` of its heads are low: single sharp heads (e.g. ones
    that attend to the previous token) are normal, whole layers of them are not.

    Defaults: ``fraction=0.05`` (0.19 nats at T=128) flags the last three layers of the diverging
    Softmax-only model (layer means 0.18, 0.06, 0.04 nats, paper §2); ``first_deep_layer`` defaults to
    ``L // 2``.

    Args:
        head_entropy: ``[L, H]`` per-head entropies.
        context_size: sequence length the entropies were measured at.
        fraction: floor as a fraction of the reference maximum, in ``(0, 1)``.
        first_deep_layer: layers with index ``>=`` this are checked.
        min_head_share: share of a layer's heads that must be low for the layer to count, in ``(0, 1]``.
        causal: whether attention was causal (selects the reference maximum).
    """
    context_size = _check_positive_int("context_size", context_size, minimum=2)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if not 0.0 < min_head_share <= 1.0:
        raise ValueError(f"min_head_share must be in (0, 1], got {min_head_share!r}")
    ent = head_entropy.detach().float()
    if ent.dim() != 2:
        raise ValueError(f"head_entropy must be [L, H], got shape {tuple(head_entropy.shape)}")
    n_layer, n_head = ent.shape
    deep = n_layer // 2 if first_deep_layer is None else first_deep_layer
    if not 0 <= deep <= n_layer:
        raise ValueError(f"first_deep_layer must be in [0, L={n_layer}], got {first_deep_layer!r}")
    reference = mean_causal_max_entropy(context_size) if causal else math.log(context_size)
    floor = fraction * reference
    nonfinite = ~torch.isfinite(ent)
    low = torch.zeros_like(nonfinite)
    low[deep:] = (ent[deep:] < floor) & ~nonfinite[deep:]
    layer_low_share = low.sum(dim=1).float() / n_head
    collapsed_layers = tuple(int(i) for i in torch.nonzero(layer_low_share >= min_head_share).flatten())
    nonfinite_heads = tuple((int(i), int(j)) for i, j in torch.nonzero(nonfinite).tolist())
    return EntropyCollapse(
        collapsed=bool(nonfinite_heads) or bool(collapsed_layers),
        nonfinite=bool(nonfinite_heads),
        nonfinite_heads=nonfinite_heads,
        low_heads=tuple((int(i), int(j)) for i, j in torch.nonzero(low).tolist()),
        collapsed_layers=collapsed_layers,
        floor=floor,
    )

"""Projection to paper scale: a 2PC cost model fitted to the communication and latency the paper reports.

The paper measures one output token after ``T`` input tokens with BumbleBee (SecretFlow) between two machines over
a WAN of 100 Mbps / 80 ms. It publishes only end-to-end totals, so this module fits per-operation constants to them.
Costs are linear in six counts taken from :mod:`entropic.accounting` and the config (all non-negative, fitted by
non-negative least squares on relative error):

* ``linear``: FFN + attention FLOPs (:func:`entropic.accounting.flops`), the secret-shared matrix products;
* ``attention``: softmax elements, ``L·H·T²`` (exp, max and reciprocal per score);
* ``gelu``: GELU elements, ``L·T·4d``;
* ``relu_ln``: ReLU elements plus ``LN_PER_RELU`` times LayerNorm elements (see below);
* ``embedding``: ``T·V``, the one-hot lookup of ``T`` tokens in a ``V×d`` table, which the paper's latency includes
  (it is also why the Languini rows, with V=16,384, cost less than a CodeParrot model with V≈52K would);
* ``per_block``: ``L``, a fixed cost per transformer block; for latency it stands for the block's round trips
  times the RTT (``rounds_per_block`` in :class:`Projection` is that coefficient divided by 80 ms).

LayerNorm and ReLU are never removed separately in the paper's cost tables (SM+LN+R keeps both, SM+ScFFN drops
both), so only their sum is identified. The model ties them with CrypTen's measured per-element ratio
(LayerNorm 32.5 B vs ReLU 464 B per element, see ``private-inference.md`` §3.1), so projections of SM+LN or SM+R,
which have only one of the two, rest on that assumption.

The latency constants are fitted directly in minutes, not derived from bytes/bandwidth: the paper's 25.32 GB in
8.21 min would need 411 Mbit/s on a 100 Mbit/s link, so its reported communication is not all on the critical
path. Hence there is one network profile, the paper's WAN; other profiles cannot be derived from these tables.

Rows excluded from the fit and the checks: He & Hofmann's "SOTA" rows (simplified attention blocks, trained by
others) and the pruned ``_i`` rows. Pruning 6 fused FFNs (0.9B FLOPs) saves 0.53 min while fusing the FFN
(12.7B FLOPs) saves 0.92 min, which no FLOP-proportional term reproduces; :func:`project` still accepts
``ffn_layers`` and ``attention="simplified"``, as extrapolations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.optimize

from entropic.accounting import flops, nonlinear_ops

__all__ = [
    "FEATURES",
    "FIT_TABLES",
    "LN_PER_RELU",
    "PAPER_ROWS",
    "CostModel",
    "PaperRow",
    "Projection",
    "cross_validate",
    "fit_cost_model",
    "project",
    "row_features",
]

FEATURES = ("linear", "attention", "gelu", "relu_ln", "embedding", "per_block")
LN_PER_RELU = 32.5 / 464.0  # CrypTen 2PC bytes per element, LayerNorm over ReLU (private-inference.md §3.1)
WAN = {"bandwidth_bps": 100e6, "rtt_s": 80e-3}
CODEPARROT_VOCAB = 52_000  # huggingface-course/code-search-net-tokenizer ("~50K" in the paper)
LANGUINI_VOCAB = 16_384


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of the paper's cost tables: an architecture at one size, with its reported cost."""

    table: str
    preset: str
    paper_name: str
    n_layer: int
    seq_len: int
    vocab_size: int
    comm_gb: float
    latency_min: float
    d_model: int = 768
    n_head: int = 12


def _table(table: str, n_layer: int, seq_len: int, vocab: int, costs: dict[str, tuple[float, float]]) -> list[PaperRow]:
    names = {
        "SM+LN+G": "SM+LN+G",
        "SM+LN+R": "SM+LN+R",
        "SM+ScFFN": "AERO SM+ScFFN",
        "SM+ScFuFFN": "SM+ScFuFFN",
        "SM(t)+ScFuFFN": "EReg(SM(t)+ScFuFFN)",
    }
    return [PaperRow(table, p, names[p], n_layer, seq_len, vocab, c, lat) for p, (c, lat) in costs.items()]


# Provenance: the paper's GPT-2 cost tables (paper.md §4: "GPT-2 L=12, CodeParrot, T=128", "T=256", "L=18, T=128"
# and "Languini, T=512"), columns Comm (GB) and Lat (minutes). EReg(SM(t)+ScFuFFN) has the same op counts and cost
# as SM+ScFuFFN; it is listed because the paper lists it, and so counts twice in the fit.
PAPER_ROWS: tuple[PaperRow, ...] = tuple(
    _table(
        "CodeParrot L=12 T=128",
        12,
        128,
        CODEPARROT_VOCAB,
        {
            "SM+LN+G": (25.32, 8.21),
            "SM+LN+R": (9.44, 6.06),
            "SM+ScFFN": (6.95, 5.68),
            "SM+ScFuFFN": (6.43, 4.76),
            "SM(t)+ScFuFFN": (6.43, 4.76),
        },
    )
    + _table(
        "CodeParrot L=12 T=256",
        12,
        256,
        CODEPARROT_VOCAB,
        {
            "SM+LN+G": (58.51, 16.57),
            "SM+LN+R": (26.73, 12.59),
            "SM+ScFFN": (21.77, 11.91),
            "SM+ScFuFFN": (20.72, 10.45),
            "SM(t)+ScFuFFN": (20.72, 10.45),
        },
    )
    + _table(
        "CodeParrot L=18 T=128",
        18,
        128,
        CODEPARROT_VOCAB,
        {
            "SM+LN+G": (37.17, 10.77),
            "SM+LN+R": (13.34, 8.04),
            "SM+ScFFN": (9.62, 7.23),
            "SM+ScFuFFN": (8.83, 6.07),
            "SM(t)+ScFuFFN": (8.83, 6.07),
        },
    )
    + _table(
        "Languini L=12 T=512",
        12,
        512,
        LANGUINI_VOCAB,
        {
            "SM+LN+G": (145.24, 30.74),
            "SM+LN+R": (81.71, 23.54),
            "SM+ScFFN": (71.76, 21.51),
            "SM+ScFuFFN": (69.68, 19.44),
            "SM(t)+ScFuFFN": (69.68, 19.44),
        },
    )
)
TABLES = tuple(dict.fromkeys(r.table for r in PAPER_ROWS))
# Fitted on the three CodeParrot tables; the Languini table (2x longer T, another vocabulary) is held out. The
# fit needs two depths: with L=12 only, a per-block latency and a constant are indistinguishable.
FIT_TABLES = ("CodeParrot L=12 T=128", "CodeParrot L=12 T=256", "CodeParrot L=18 T=128")


def _config(preset: str, n_layer: int, d_model: int, n_head: int, n_positions: int) -> Any:
    from entropic.models import EntropicConfig, preset_names

    if preset not in preset_names():
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(preset_names())}")
    return EntropicConfig.from_preset(
        preset, n_layer=n_layer, n_embd=d_model, n_head=n_head, n_positions=n_positions, vocab_size=2
    )


def row_features(
    config: Any,
    seq_len: int,
    vocab_size: int,
    *,
    attention: str = "standard",
    ffn_layers: int | None = None,
) -> dict[str, float]:
    """The cost model's counts for one forward pass over ``seq_len`` tokens.

    Args:
        config: an :class:`~entropic.models.EntropicConfig` (or any object :mod:`entropic.accounting` accepts).
        seq_len: input tokens ``T``.
        vocab_size: vocabulary size ``V`` of the embedding table.
        attention: ``"standard"`` or ``"simplified"`` (passed to :func:`entropic.accounting.flops`).
        ffn_layers: how many blocks keep their FFN; default all.

    Returns:
        ``{feature: count}`` for every name in :data:`FEATURES`, plus ``"layernorm"`` and ``"relu"`` (the two parts
        of ``relu_ln``, in elements).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    ops = nonlinear_ops(config, seq_len, ffn_layers=ffn_layers)
    fl = flops(config, seq_len, attention=attention, ffn_layers=ffn_layers)
    ln, relu = float(ops["layernorm"].elements), float(ops["relu"].elements)
    return {
        "linear": float(fl["ffn"] + fl["attention"]),
        "attention": float(ops["softmax"].elements),
        "gelu": float(ops["gelu"].elements),
        "relu_ln": relu + LN_PER_RELU * ln,
        "embedding": float(seq_len * vocab_size),
        "per_block": float(config.n_layer),
        "layernorm": ln,
        "relu": relu,
    }


def _paper_features(row: PaperRow) -> dict[str, float]:
    cfg = _config(row.preset, row.n_layer, row.d_model, row.n_head, max(1024, row.seq_len))
    return row_features(cfg, row.seq_len, row.vocab_size)


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin_{x >= 0} ||a x - b||`` (SciPy's Lawson-Hanson), on unit-norm columns for conditioning."""
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    return scipy.optimize.nnls(a / scale, b)[0] / scale


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Fitted constants: GB and minutes per unit of each feature in :data:`FEATURES`, and the fit's rows."""

    comm_gb: dict[str, float]
    latency_min: dict[str, float]
    fit_tables: tuple[str, ...]

    def errors(self, rows: Sequence[PaperRow] = PAPER_ROWS) -> list[dict[str, Any]]:
        """Relative error (prediction/paper - 1) of every row, flagged by whether it was in the fit."""
        out = []
        for r in rows:
            f = _paper_features(r)
            comm = sum(self.comm_gb[k] * f[k] for k in FEATURES)
            lat = sum(self.latency_min[k] * f[k] for k in FEATURES)
            out.append(
                {
                    "table": r.table,
                    "preset": r.preset,
                    "paper_name": r.paper_name,
                    "fitted": r.table in self.fit_tables,
                    "comm_gb": comm,
                    "paper_comm_gb": r.comm_gb,
                    "comm_rel_error": comm / r.comm_gb - 1.0,
                    "latency_min": lat,
                    "paper_latency_min": r.latency_min,
                    "latency_rel_error": lat / r.latency_min - 1.0,
                }
            )
        return out

    def error_summary(self) -> dict[str, Any]:
        """Max and mean absolute relative errors on the fitted and the held-out rows, plus every row."""
        rows = self.errors()
        summary: dict[str, Any] = {"fit_tables": list(self.fit_tables)}
        for name, flag in (("fitted", True), ("held_out", False)):
            sel = [r for r in rows if r["fitted"] is flag]
            summary[name] = {
                "tables": sorted({r["table"] for r in sel}),
                **{
                    f"{stat}_abs_{key}": (max if stat == "max" else np.mean)([abs(r[key]) for r in sel])
                    if sel
                    else None
                    for stat in ("max", "mean")
                    for key in ("comm_rel_error", "latency_rel_error")
                },
            }
        summary["rows"] = rows
        return summary


def fit_cost_model(fit_tables: Sequence[str] = FIT_TABLES) -> CostModel:
    """Fit the comm and latency constants by NNLS on relative error over the rows of ``fit_tables``.

    Args:
        fit_tables: names from ``TABLES`` whose rows are fitted; the rest are held out.

    Returns:
        The fitted :class:`CostModel`.

    Raises:
        ValueError: an unknown table name, or fewer than two tables (one size cannot separate the terms).
    """
    fit_tables = tuple(fit_tables)
    unknown = [t for t in fit_tables if t not in TABLES]
    if unknown or len(set(fit_tables)) < 2:
        raise ValueError(f"fit_tables must name at least two of {TABLES}, got {fit_tables!r}")
    return _fit(fit_tables)


@functools.lru_cache(maxsize=16)
def _fit(fit_tables: tuple[str, ...]) -> CostModel:
    rows = [r for r in PAPER_ROWS if r.table in fit_tables]
    a = np.array([[_paper_features(r)[k] for k in FEATURES] for r in rows])
    coefs = {}
    for target in ("comm_gb", "latency_min"):
        y = np.array([getattr(r, target) for r in rows])
        x = _nnls(a / y[:, None], np.ones_like(y))  # relative error: each row's residual is divided by its value
        coefs[target] = dict(zip(FEATURES, map(float, x), strict=True))
    return CostModel(coefs["comm_gb"], coefs["latency_min"], fit_tables)


def cross_validate() -> dict[str, dict[str, float]]:
    """Leave one table out: fit on the other three, report max abs relative errors on the left-out table."""
    out = {}
    for table in TABLES:
        model = fit_cost_model(tuple(t for t in TABLES if t != table))
        held = [e for e in model.errors() if e["table"] == table]
        out[table] = {
            "max_abs_comm_rel_error": max(abs(e["comm_rel_error"]) for e in held),
            "max_abs_latency_rel_error": max(abs(e["latency_rel_error"]) for e in held),
        }
    return out


@dataclasses.dataclass(frozen=True)
class Projection:
    """Projected cost of one output token after ``seq_len`` input tokens, over the paper's WAN."""

    comm_gb: float
    latency_min: float
    comm_gb_by_kind: dict[str, float]
    latency_min_by_kind: dict[str, float]
    rounds_per_block: float
    counts: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _by_kind(coef: dict[str, float], f: dict[str, float]) -> dict[str, float]:
    return {
        "linear": coef["linear"] * f["linear"],
        "attention": coef["attention"] * f["attention"],
        "layernorm": coef["relu_ln"] * LN_PER_RELU * f["layernorm"],
        "gelu": coef["gelu"] * f["gelu"],
        "relu": coef["relu_ln"] * f["relu"],
        "embedding": coef["embedding"] * f["embedding"],
        "per_block": coef["per_block"] * f["per_block"],
    }


def project(
    preset: str,
    *,
    n_layer: int = 12,
    d_model: int = 768,
    n_head: int = 12,
    seq_len: int = 128,
    vocab_size: int = CODEPARROT_VOCAB,
    n_positions: int = 1024,
    attention: str = "standard",
    ffn_layers: int | None = None,
    model: CostModel | None = None,
) -> Projection:
    """Project the 2PC cost of a preset at any size with the fitted constants (paper's WAN, BumbleBee).

    Args:
        preset: a name from :func:`entropic.models.preset_names`, e.g. ``"SM+LN+G"``.
        n_layer: blocks ``L``.
        d_model: width ``d``.
        n_head: heads ``H`` (must divide ``d_model``).
        seq_len: input tokens ``T``, ``1 <= T <= n_positions``.
        vocab_size: vocabulary ``V`` (default: the CodeParrot tokenizer's).
        n_positions: the model's context length.
        attention: ``"standard"``, or ``"simplified"`` for He & Hofmann's blocks (an extrapolation: not fitted).
        ffn_layers: blocks keeping their FFN (the pruned ``_i`` variants; an extrapolation: not fitted).
        model: fitted constants; default :func:`fit_cost_model` on :data:`FIT_TABLES`.

    Returns:
        The :class:`Projection`.

    Raises:
        ValueError: an unknown preset, ``seq_len`` above ``n_positions``, or any invalid size.
    """
    cfg = _config(preset, n_layer, d_model, n_head, n_positions)
    f = row_features(cfg, seq_len, vocab_size, attention=attention, ffn_layers=ffn_layers)
    model = model or fit_cost_model()
    comm = _by_kind(model.comm_gb, f)
    lat = _by_kind(model.latency_min, f)
    return Projection(
        comm_gb=sum(comm.values()),
        latency_min=sum(lat.values()),
        comm_gb_by_kind=comm,
        latency_min_by_kind=lat,
        rounds_per_block=model.latency_min["per_block"] * 60.0 / WAN["rtt_s"],
        counts={k: f[k] for k in ("linear", "attention", "layernorm", "gelu", "relu", "embedding", "per_block")},
    )

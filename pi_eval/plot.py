"""Bar chart comparing architectures: bytes and modelled latency, stacked by operation kind (matplotlib Agg)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entropic.io import atomic_write_bytes

__all__ = ["PLOT_KINDS", "plot_reports", "stacked_costs"]

PLOT_KINDS = ("linear", "attention", "layernorm", "gelu", "relu", "other")


def _kind(kind: str) -> str:
    return kind if kind in PLOT_KINDS else "other"  # refresh, input, output, embedding, per_block


def stacked_costs(report: dict[str, Any], profile: str = "WAN") -> tuple[str, dict[str, float], dict[str, float]]:
    """Label, bytes by kind and latency (s) by kind of one report.

    Args:
        report: a harness ``report.json`` (keys ``by_kind`` and ``latency``) or a ``python -m pi_eval project
            --json`` output (keys ``comm_gb_by_kind`` and ``latency_min_by_kind``).
        profile: network profile of a harness report's modelled latency.

    Returns:
        ``(label, {kind: bytes}, {kind: seconds})`` over :data:`PLOT_KINDS`.

    Raises:
        ValueError: a dict of neither shape, or a profile the report lacks.
    """
    if not isinstance(report, dict):
        raise ValueError(f"a report must be a dict, got {type(report).__name__}")
    nbytes = dict.fromkeys(PLOT_KINDS, 0.0)
    secs = dict.fromkeys(PLOT_KINDS, 0.0)
    meta = report.get("meta") or report.get("config") or {}
    if "by_kind" in report and "latency" in report:
        if profile not in report["latency"]:
            raise ValueError(f"network profile {profile!r} not in the report; it has {sorted(report['latency'])}")
        comm_s = report["latency"][profile]["by_kind_comm_s"]
        for k, v in report["by_kind"].items():
            nbytes[_kind(k)] += v["bytes_up"] + v["bytes_down"]
            secs[_kind(k)] += comm_s.get(k, 0.0) + v["server_s"] + v["client_s"]
        arch = meta.get("architecture") or meta.get("preset") or meta.get("checkpoint") or "?"
        label = f"{arch} T={report.get('seq_len', '?')}"
    elif "comm_gb_by_kind" in report and "latency_min_by_kind" in report:
        for k, v in report["comm_gb_by_kind"].items():
            nbytes[_kind(k)] += v * 1e9
        for k, v in report["latency_min_by_kind"].items():
            secs[_kind(k)] += v * 60.0
        label = f"{meta.get('preset', '?')} T={meta.get('seq_len', '?')} (proj.)"
    else:
        raise ValueError(
            "not a pi_eval report: expected keys 'by_kind' and 'latency' (bench report.json) or "
            f"'comm_gb_by_kind' and 'latency_min_by_kind' (project --json); got {sorted(report)[:12]}"
        )
    return label, nbytes, secs


def plot_reports(
    reports: Sequence[dict[str, Any]],
    out: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    profile: str = "WAN",
) -> Path:
    """Write a PNG with two panels, bytes and modelled latency per architecture, stacked by operation kind.

    Args:
        reports: harness reports and/or projections (see :func:`stacked_costs`), one bar each.
        out: PNG path, written atomically.
        labels: bar labels; default from each report's preset and sequence length.
        profile: network profile of the harness reports' latency.

    Returns:
        The written path.

    Raises:
        ValueError: no reports, a label count that does not match, or a report of an unknown shape.
    """
    if not reports:
        raise ValueError("plot needs at least one report")
    if labels is not None and len(labels) != len(reports):
        raise ValueError(f"got {len(labels)} labels for {len(reports)} reports")
    data = [stacked_costs(r, profile) for r in reports]
    names = list(labels) if labels is not None else [d[0] for d in data]

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.6 * len(reports) + 3.0), 4.2))
    axes = fig.subplots(1, 2)
    colors = dict(zip(PLOT_KINDS, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"), strict=True))
    x = range(len(reports))
    for ax, idx, unit, scale in ((axes[0], 1, "MB", 1e6), (axes[1], 2, f"s ({profile})", 1.0)):
        bottom = [0.0] * len(reports)
        for kind in PLOT_KINDS:
            vals = [d[idx][kind] / scale for d in data]
            if any(vals):
                ax.bar(x, vals, bottom=bottom, color=colors[kind], label=kind)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(unit)
    axes[0].set_title("communication")
    axes[1].set_title("modelled latency")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(out, buf.getvalue())

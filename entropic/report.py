"""Side-by-side report of training runs: final validation loss and perplexity, divergence, entropy bins, speed.

A run directory is what a recipe's Trainer writes. Runs of ``entropic fit`` hold ``summary.json``, written from
the run's own state by :class:`entropic.callbacks.RunRecord` (any logger, or none); older runs are read from the
CSV logger's ``metrics.csv``. ``entropic report RUN_DIR...`` prints the table and writes it as Markdown and JSON.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from entropic.functional import BIN_LABELS
from entropic.io import atomic_write_json, atomic_write_text

SUMMARY_FILE = "summary.json"
"""Written into a run directory at the end of ``fit`` by :class:`entropic.callbacks.RunRecord`."""

BIN_KEYS = tuple(f"entropy/bin_{k}_share" for k in range(4))


@dataclass
class RunSummary:
    """What the report shows for one run."""

    run_dir: str
    arch: str | None
    steps: int | None
    val_loss: float | None
    val_ppl: float | None
    diverged: bool
    tokens_per_sec: float | None
    bin_shares: list[float | None] = field(default_factory=list)
    entropy_penalty: float | None = None
    figures: list[str] = field(default_factory=list)


def find_metrics_files(run_dir: Path) -> list[Path]:
    """Every ``metrics.csv`` under ``run_dir``, oldest launch first (one per launch of a resumed run).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no metrics file.
    """
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    candidates = sorted(run_dir.rglob("metrics.csv"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not candidates:
        raise FileNotFoundError(
            f"no {SUMMARY_FILE} and no metrics.csv under {str(run_dir)!r}: is it a run directory of `entropic fit`?"
        )
    return candidates


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def read_run_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    """The metric rows of a run, stitched across resumed launches.

    A launch resumed from a checkpoint at step s logs again from step s on, so rows of earlier launches at
    steps >= s are superseded (they were logged after the checkpoint and are replayed by the resumed launch).
    """
    rows: list[dict[str, str]] = []
    for path in find_metrics_files(Path(run_dir)):
        new_rows = _read_csv(path)
        steps = [s for s in (_as_float(r.get("step")) for r in new_rows) if s is not None]
        if steps:
            first = min(steps)
            rows = [r for r in rows if (_as_float(r.get("step")) or 0.0) < first]
        rows.extend(new_rows)
    return rows


def _as_float(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _last(rows: list[dict[str, str]], key: str) -> float | None:
    for row in reversed(rows):
        value = _as_float(row.get(key))
        if value is not None:
            return value
    return None


def _mean(rows: list[dict[str, str]], key: str, skip_first: int = 1) -> float | None:
    # The first logged throughput includes warm-up work (allocations, first kernels), so it is dropped.
    values = [v for v in (_as_float(r.get(key)) for r in rows) if v is not None and math.isfinite(v)]
    values = values[skip_first:] if len(values) > skip_first else values
    return sum(values) / len(values) if values else None


def _arch(run_dir: Path, metrics_file: Path) -> str | None:
    for candidate in (metrics_file.parent / "hparams.yaml", run_dir / "config.yaml"):
        if not candidate.is_file():
            continue
        loaded = yaml.safe_load(candidate.read_text()) or {}
        if "arch" in loaded:
            return str(loaded["arch"])
        model = loaded.get("model", {}) or {}
        args = model.get("init_args", model) if isinstance(model, dict) else {}
        if isinstance(args, dict) and "arch" in args:
            return str(args["arch"])
    return None


def summarize_run(run_dir: str | Path) -> RunSummary:
    """Reads one run directory into a :class:`RunSummary`: its ``summary.json``, else its CSV metrics.

    Raises:
        FileNotFoundError: the directory does not exist, or holds neither file.
    """
    run_path = Path(run_dir)
    summary_file = run_path / SUMMARY_FILE
    if summary_file.is_file():
        return RunSummary(**{**json.loads(summary_file.read_text()), "run_dir": str(run_path)})
    metrics_file = find_metrics_files(run_path)[-1]
    rows = read_run_metrics(run_path)
    train_losses = [_as_float(r.get("train/loss")) for r in rows]
    train_losses = [v for v in train_losses if v is not None]
    val_loss = _last(rows, "val/loss")
    diverged = any(not math.isfinite(v) for v in train_losses) or (val_loss is not None and not math.isfinite(val_loss))
    # Lightning logs a training step's metrics under the step index before the optimizer step, so the number
    # of completed steps is the last training row's index + 1.
    train_steps = [_as_float(r.get("step")) for r in rows if _as_float(r.get("train/loss")) is not None]
    steps = max(train_steps) + 1 if train_steps else None
    return RunSummary(
        run_dir=str(run_path),
        arch=_arch(run_path, metrics_file),
        steps=int(steps) if steps is not None else None,
        val_loss=val_loss,
        val_ppl=_last(rows, "val/ppl"),
        diverged=diverged,
        tokens_per_sec=_mean(rows, "train/tokens_per_sec"),
        bin_shares=[_last(rows, key) for key in BIN_KEYS],
        entropy_penalty=_last(rows, "train/entropy_penalty"),
        figures=sorted(str(p.relative_to(run_path)) for p in run_path.rglob("*.png")),
    )


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "NaN"
    return format(value, spec)


def markdown_table(summaries: list[RunSummary]) -> str:
    """The side-by-side table, one row per run."""
    header = ["run", "arch", "steps", "val loss", "val ppl", "diverged", "tokens/s", *BIN_LABELS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        shares = [_fmt(None if v is None else 100 * v, ".1f") + ("%" if v is not None else "") for v in s.bin_shares]
        cells = [
            Path(s.run_dir).name,
            s.arch or "-",
            str(s.steps) if s.steps is not None else "-",
            _fmt(s.val_loss, ".4f"),
            _fmt(s.val_ppl, ".3f"),
            "yes" if s.diverged else "no",
            _fmt(s.tokens_per_sec, ".0f"),
            *shares,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    figure_lines = [f"- {Path(s.run_dir).name}: {', '.join(s.figures)}" for s in summaries if s.figures]
    if figure_lines:
        lines += ["", "Figures:", *figure_lines]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> str:
    """Summarizes ``run_dirs``, writes ``report.md`` and ``report.json`` to ``out_dir`` (if given), returns the table."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    summaries = [summarize_run(d) for d in run_dirs]
    table = markdown_table(summaries)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "report.md", table)
        atomic_write_json(Path(out_dir) / "report.json", [asdict(s) for s in summaries])
    return table

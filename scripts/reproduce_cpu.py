"""CPU-scale study of the paper's findings, with seeds: trains each arm at one token budget, then writes a table
of mean ± standard error, paired differences against each arm's control, a verdict per finding, and figures.

The regime (``REGIME``) is one that trains on 2 cores: L=6, H=4, d=128, T=128, a 2,048-token BPE, batches of
32 × 128 tokens, 1,500 steps (6.1M tokens), validation on 200 batches. Every arm starts from its recipe in
``recipes/cpu/`` with the regime and the arm's own settings on top; seed k sets ``seed_everything = 1337 + k``
and the data order.

    .venv/bin/python scripts/reproduce_cpu.py --arms sm_t_scfuffn,ereg --seeds 0,1,2 --jobs 2
    .venv/bin/python scripts/reproduce_cpu.py --report-only               # tables and figures from finished runs

Each (arm, seed) trains in its own process through the ``entropic`` CLI into ``<out>/<arm>/seed<k>``, with one
thread (``OMP_NUM_THREADS=1``), ``--jobs`` at a time. A finished run is skipped and an interrupted one resumes
from its ``last.ckpt``, so the script can be re-run after any interruption. Results go to ``<docs>/results.md``,
``<docs>/results.json`` and ``<docs>/*.png``.

**Pass rule.** A difference between an arm and its control is shown when, over the seeds both have, every paired
difference (arm − control, seed by seed) has the same sign and the mean's magnitude exceeds twice its standard
error. A claim about an arm whose attention never leaves uniform is "untested".
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from entropic.callbacks.plotting import new_figure, save_figure  # noqa: E402
from entropic.functional import (  # noqa: E402
    BIN_LABELS,
    entropy_bin_shares,
    entropy_collapse,
    mean_causal_max_entropy,
)
from entropic.io import atomic_write_json, atomic_write_text  # noqa: E402
from entropic.report import _as_float, _fmt, read_run_metrics, summarize_run  # noqa: E402

BASE_SEED = 1337  # the authors' seed; seed k trains with BASE_SEED + k

REGIME: dict[str, object] = {
    "model.n_layer": 6,
    "model.n_head": 4,
    "model.n_embd": 128,
    "model.n_positions": 128,
    "data.block_size": 128,
    "data.batch_size": 32,
    "data.vocab_size": 2048,
    "data.val_fraction": 0.1,  # >= 200 validation batches of 32 x 128 tokens
    "trainer.max_steps": 1500,
    "trainer.accumulate_grad_batches": 1,
    "trainer.val_check_interval": 750,
    "trainer.limit_val_batches": 200,
    "trainer.log_every_n_steps": 25,
}
"""The study's training regime, applied over every arm's recipe."""

UNIFORM_FRACTION = 0.9
"""Attention has left uniform once the mean head entropy is below this fraction of the causal maximum."""

PAPER_LAMBDA_PAPER_REDUCTION = 0.16
"""The paper's λ = 1e-5 multiplied per-query penalties summed over 128 × 128-token micro-batches; the "paper"
reduction averages over the B·T queries first, so the same gradient per query needs 1e-5 · 16,384 ≈ 0.16."""

PAPER_LAMBDA_PER_QUERY = 1e-5 * (128 * 128) / (32 * 128)
"""The paper's λ scaled from its 128 × 128-token micro-batch to our 32 × 128 batch (the per-query sum grows with B·T)."""

STRESS_LR = 5e-3
"""The lowest peak learning rate of the sweep (sm_lr* arms, seed 0) at which softmax-only collapses: at 4e-3 it
trains; at 5e-3 its loss is NaN by step 74 (seed 0, the end of the 75-step warm-up) and 124 (seed 1, after it)."""

EREG = {
    "loss_coeff": PAPER_LAMBDA_PAPER_REDUCTION,
    "tolerance": 0.2,
    "reduction": "paper",
    "threshold_init": 0.35,
    "start_when_entropy_below": UNIFORM_FRACTION,
    "warmup_steps": 150,  # 10 % of the steps
}


@dataclass
class Arm:
    """One arm: a recipe, the arm's settings over the regime, and the arm it is compared with."""

    key: str  # run directory name
    recipe: str  # stem of recipes/cpu/<recipe>.yaml
    label: str  # how tables and figures name it
    control: str | None = None  # key of the arm it is compared with, seed by seed
    settings: dict[str, object] = field(default_factory=dict)  # dotted recipe overrides
    regularization: dict[str, object] | None = None  # EntropyRegularization init_args (replace the recipe's)


def _hi(settings: dict[str, object] | None = None) -> dict[str, object]:
    return {"model.learning_rate": STRESS_LR, **(settings or {})}


_ALPHA10 = {"model.model_overrides": {"ffn_scale_alpha_init": 10.0}}

ARMS: tuple[Arm, ...] = (
    Arm("sm_ln_g", "sm_ln_g", "SM+LN+G (baseline)"),
    Arm("sm_g", "sm_g", "SM+G (LN-free GELU)", "sm_ln_g"),
    Arm("sm_r", "sm_r", "SM+R (LN-free ReLU)", "sm_ln_g"),
    Arm("sm", "sm", "SM (softmax-only)", "sm_ln_g"),
    Arm("sm_wnorm_ffn", "sm_wnorm_ffn", "SM+WNorm(FFN)", "sm"),
    Arm("sm_snorm_ffn", "sm_snorm_ffn", "SM+SNorm(FFN)", "sm"),
    Arm("sm_scfuffn", "sm_scfuffn", "SM+ScFuFFN", "sm"),
    Arm("sm_scfuffn_a10", "sm_scfuffn", "SM+ScFuFFN, α₀=10", "sm", _ALPHA10),
    Arm("sm_t_scfuffn", "sm_t_scfuffn", "SM(t)+ScFuFFN", "sm_scfuffn"),
    Arm(
        "ereg",
        "ereg_sm_t_scfuffn",
        "EReg, θ observed, λ=0.16",
        "sm_t_scfuffn",
        regularization={**EREG, "threshold_init": "observed"},
    ),
    Arm(
        "ereg_weak",
        "ereg_sm_t_scfuffn",
        "EReg, θ observed, λ=0.01",
        "sm_t_scfuffn",
        regularization={**EREG, "threshold_init": "observed", "loss_coeff": 0.01},
    ),
    Arm(
        "ereg_wide",
        "ereg_sm_t_scfuffn",
        "EReg, θ observed, γ=0.4",
        "sm_t_scfuffn",
        regularization={**EREG, "threshold_init": "observed", "tolerance": 0.4},
    ),
    Arm("ereg_paper_lambda", "ereg_sm_t_scfuffn", "EReg, θ₀=0.35", "sm_t_scfuffn", regularization=dict(EREG)),
    Arm(
        "ereg_per_query",
        "ereg_sm_t_scfuffn",
        "EReg, per-query",
        "sm_t_scfuffn",
        regularization={**EREG, "reduction": "per_query", "loss_coeff": PAPER_LAMBDA_PER_QUERY},
    ),
    Arm(
        "ereg_frozen_theta",
        "ereg_sm_t_scfuffn",
        "EReg, θ frozen at 0.35",
        "sm_t_scfuffn",
        regularization={**EREG, "learnable_thresholds": False},
    ),
    Arm(
        "ereg_before",
        "ereg_sm_t_scfuffn",
        "EReg, the earlier default",
        "sm_t_scfuffn",
        regularization={
            "loss_coeff": 0.01,
            "tolerance": 0.2,
            "reduction": "paper",
            "threshold_init": 0.35,
            "start_fraction": 0.05,
            "start_when_entropy_below": None,
            "warmup_steps": 0,
        },
    ),
    Arm("sm_lr3e-3", "sm", "SM, lr 3e-3", None, {"model.learning_rate": 3e-3}),
    Arm("sm_lr4e-3", "sm", "SM, lr 4e-3", None, {"model.learning_rate": 4e-3}),
    Arm("sm_lr1e-2", "sm", "SM, lr 1e-2", None, {"model.learning_rate": 1e-2}),
    Arm("sm_ln_g_hi", "sm_ln_g", "SM+LN+G, stress lr", None, _hi()),
    Arm("sm_hi", "sm", "SM, stress lr", "sm_ln_g_hi", _hi()),
    Arm("sm_scfuffn_hi", "sm_scfuffn", "SM+ScFuFFN, stress lr", "sm_hi", _hi()),
    Arm("sm_scfuffn_a10_hi", "sm_scfuffn", "SM+ScFuFFN, α₀=10, stress lr", "sm_hi", _hi(_ALPHA10)),
    Arm("sm_snorm_ffn_hi", "sm_snorm_ffn", "SM+SNorm(FFN), stress lr", "sm_hi", _hi()),
)
ARMS_BY_KEY = {arm.key: arm for arm in ARMS}


@dataclass(frozen=True)
class Finding:
    """A claim of the paper, tested as the paired difference of one metric between an arm and a control."""

    number: int
    claim: str
    arm: str
    control: str
    metric: str  # key of RunResult
    expected: int  # +1: the paper has the arm above the control; -1: below
    needs_control_collapse: bool = False  # a claim that something prevents collapse needs a control that collapses


FINDINGS: tuple[Finding, ...] = (
    Finding(1, "Removing LayerNorm costs perplexity (GELU)", "sm_g", "sm_ln_g", "val_ppl", +1),
    Finding(1, "Removing LayerNorm costs perplexity (ReLU)", "sm_r", "sm_ln_g", "val_ppl", +1),
    Finding(2, "LayerNorm-free models overload: more heads in the top entropy bin", "sm_g", "sm_ln_g", "top_bin", +1),
    Finding(2, "LayerNorm-free ReLU model overloads", "sm_r", "sm_ln_g", "top_bin", +1),
    Finding(2, "Without LayerNorm, ReLU beats GELU", "sm_r", "sm_g", "val_ppl", -1),
    Finding(2, "Without LayerNorm, ReLU overloads less than GELU", "sm_r", "sm_g", "top_bin", -1),
    Finding(3, "Softmax-only collapses at the paper's lr (1e-3)", "sm", "sm_ln_g", "collapsed", +1),
    Finding(3, "Softmax-only collapses in deep layers (stress lr)", "sm_hi", "sm_ln_g_hi", "collapsed", +1),
    Finding(4, "FFN scaling prevents the collapse (stress lr)", "sm_scfuffn_hi", "sm_hi", "collapsed", -1, True),
    Finding(
        4,
        "FFN scaling with α₀=10 prevents the collapse (stress lr)",
        "sm_scfuffn_a10_hi",
        "sm_hi",
        "collapsed",
        -1,
        True,
    ),
    # Perplexity against a diverged control is undefined, so at the stress lr it is compared with the baseline.
    Finding(4, "SM+ScFuFFN stays behind the baseline (stress lr)", "sm_scfuffn_hi", "sm_ln_g_hi", "val_ppl", +1),
    Finding(4, "SM+ScFuFFN stays behind the baseline (lr 1e-3)", "sm_scfuffn", "sm_ln_g", "val_ppl", +1),
    Finding(4, "FFN scaling lowers perplexity (lr 1e-3)", "sm_scfuffn", "sm", "val_ppl", -1),
    Finding(4, "FFN scaling with α₀=10 lowers perplexity (lr 1e-3)", "sm_scfuffn_a10", "sm", "val_ppl", -1),
    Finding(5, "A learnable temperature lowers perplexity", "sm_t_scfuffn", "sm_scfuffn", "val_ppl", -1),
    Finding(6, "Entropy regularization lowers perplexity (θ observed)", "ereg", "sm_t_scfuffn", "val_ppl", -1),
    Finding(6, "Entropy regularization lowers perplexity (λ=0.01)", "ereg_weak", "sm_t_scfuffn", "val_ppl", -1),
    Finding(6, "Entropy regularization lowers perplexity (γ=0.4)", "ereg_wide", "sm_t_scfuffn", "val_ppl", -1),
    Finding(
        6, "Entropy regularization lowers perplexity (paper λ)", "ereg_paper_lambda", "sm_t_scfuffn", "val_ppl", -1
    ),
    Finding(6, "Entropy regularization lowers perplexity (per query)", "ereg_per_query", "sm_t_scfuffn", "val_ppl", -1),
    Finding(
        6, "Entropy regularization lowers perplexity (θ frozen)", "ereg_frozen_theta", "sm_t_scfuffn", "val_ppl", -1
    ),
    Finding(
        7, "Spectral normalization of the FFN prevents the collapse", "sm_snorm_ffn_hi", "sm_hi", "collapsed", -1, True
    ),
    Finding(7, "SM+SNorm(FFN) stays behind the baseline (stress lr)", "sm_snorm_ffn_hi", "sm_ln_g_hi", "val_ppl", +1),
    Finding(7, "Spectral normalization of the FFN lowers perplexity (lr 1e-3)", "sm_snorm_ffn", "sm", "val_ppl", -1),
    Finding(7, "Weight normalization of the FFN lowers perplexity (lr 1e-3)", "sm_wnorm_ffn", "sm", "val_ppl", -1),
    Finding(7, "FFN scaling beats spectral normalization (lr 1e-3)", "sm_scfuffn", "sm_snorm_ffn", "val_ppl", -1),
    Finding(7, "FFN scaling beats weight normalization (lr 1e-3)", "sm_scfuffn", "sm_wnorm_ffn", "val_ppl", -1),
)


# ---------------------------------------------------------------------------------------------------- recipes
def _set_dotted(config: dict, dotted: str, value: object) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise KeyError(f"--set {dotted}: {part!r} is not a section of the recipe")
        node = node[part]
    node[leaf] = value  # a new key is allowed: the CLI's parser rejects keys it does not know


def run_recipe(arm: Arm, seed: int, run_dir: Path, *, steps: int | None, overrides: dict[str, object]) -> dict:
    """The recipe one (arm, seed) trains with: recipes/cpu/<recipe>.yaml, the regime, the arm, the overrides."""
    path = REPO / "recipes" / "cpu" / f"{arm.recipe}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"arm {arm.key!r}: recipe {path} does not exist")
    config = copy.deepcopy(yaml.safe_load(path.read_text()))
    for dotted, value in {**REGIME, **arm.settings, **overrides}.items():
        _set_dotted(config, dotted, copy.deepcopy(value))
    config["seed_everything"] = BASE_SEED + seed
    config["data"]["seed"] = seed
    config["trainer"]["default_root_dir"] = str(run_dir)
    config["trainer"]["enable_progress_bar"] = False
    if steps is not None:
        config["trainer"]["max_steps"] = steps
    if arm.regularization is not None:
        regs = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EntropyRegularization")]
        if not regs:
            raise ValueError(f"arm {arm.key!r}: recipe {path.name} has no EntropyRegularization to configure")
        regs[0]["init_args"] = dict(arm.regularization)
    return config


# ---------------------------------------------------------------------------------------------------- training
def _finished_steps(run_dir: Path) -> int | None:
    if not (run_dir / "report.json").is_file():
        return None
    try:
        return summarize_run(run_dir).steps
    except FileNotFoundError:
        return None


def archive_run(run_dir: Path, archive_dir: Path) -> None:
    """Copies what the report needs of a finished run into ``archive_dir`` (a few dozen KB, written atomically).

    The archive (``<docs>/runs/<arm>/seed<k>``: metrics, recipe, summary, wall time and θ, no weights) is committed
    with the results, so the study continues on another machine: an archived run is never trained again and is
    always reported.
    """
    rows = read_run_metrics(run_dir)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(archive_dir / "logs" / "metrics.csv", buffer.getvalue())
    hparams = sorted(run_dir.glob("logs/*/hparams.yaml"))
    for source, target in (
        (run_dir / "recipe.yaml", archive_dir / "recipe.yaml"),
        (run_dir / "report.json", archive_dir / "report.json"),
        (run_dir / "summary.json", archive_dir / "summary.json"),
        (run_dir / "wall_time.json", archive_dir / "wall_time.json"),
        (hparams[-1] if hparams else None, archive_dir / "logs" / "hparams.yaml"),
    ):
        if source is not None and source.is_file():
            atomic_write_text(target, source.read_text())
    atomic_write_json(archive_dir / "thresholds.json", {"thresholds": _learned_thresholds(run_dir)})


def finished_run_dir(out: Path, archive: Path, key: str, seed: int) -> Path | None:
    """The directory of a finished (arm, seed): the run itself (archived on the way), else its archive copy."""
    run_dir, kept = out / key / f"seed{seed}", archive / key / f"seed{seed}"
    if _finished_steps(run_dir) is not None:
        if _finished_steps(kept) is None:
            archive_run(run_dir, kept)
        return run_dir
    return kept if _finished_steps(kept) is not None else None


WALL_TIME_FLUSH_SECONDS = 30.0


def run_timed(command: list[str], run_dir: Path, env: dict) -> tuple[int, float]:
    """Runs ``command`` (output appended to ``run_dir/train.log``) and adds its wall time to
    ``run_dir/wall_time.json``, rewritten every ``WALL_TIME_FLUSH_SECONDS`` while it runs, so a run stopped from
    outside (a session's end) loses at most that much of its time. Returns (exit code, seconds)."""
    path = run_dir / "wall_time.json"
    before = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    started = time.perf_counter()

    def record() -> float:
        elapsed = time.perf_counter() - started
        atomic_write_json(path, {"seconds": before + elapsed})
        return elapsed

    with (run_dir / "train.log").open("a") as handle:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    child.wait(timeout=WALL_TIME_FLUSH_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    record()
        except BaseException:
            child.kill()
            raise
        finally:
            elapsed = record()
    return child.returncode, elapsed


def train_run(key: str, seed: int, run_dir: Path, recipe: dict, *, log, archive: Path | None = None) -> None:
    """Trains one (arm, seed) in a child process, resuming from last.ckpt after an interruption; a run found
    finished in ``archive`` is not trained again, and a run that finishes is archived there."""
    target = int(recipe["trainer"]["max_steps"])
    name = f"{key}/seed{seed}"
    kept = None if archive is None else archive / key / f"seed{seed}"
    done = _finished_steps(run_dir)
    if done is None and kept is not None:
        done = _finished_steps(kept)
    if done is not None and done >= target:
        log(f"[{name}] finished earlier ({done} steps), skipped")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir / "recipe.yaml"
    atomic_write_text(recipe_path, yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "entropic.cli", "fit", "--config", str(recipe_path)]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        command += ["--ckpt_path", "last"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log(f"[{name}] training {target} steps")
    returncode, elapsed = run_timed(command, run_dir, env)
    if returncode != 0:
        raise RuntimeError(f"{name} failed (exit {returncode}); see {run_dir / 'train.log'}")
    if kept is not None:
        archive_run(run_dir, kept)
    log(f"[{name}] done in {elapsed / 60:.1f} min")


def prepare_data(recipe: dict) -> None:
    """Tokenizes the corpus once, before parallel runs would race to build the same cache."""
    from entropic.data import EntropicDataModule

    EntropicDataModule(**recipe["data"]).prepare_data()


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class RunResult:
    """One finished (arm, seed)."""

    key: str
    seed: int
    steps: int | None
    tokens: int | None
    val_loss: float | None
    val_ppl: float | None
    diverged: bool
    wall_minutes: float | None
    tokens_per_sec: float | None
    bin_shares: list[float]  # [4] shares of heads per bin, max = causal maximum of the query-averaged entropy
    top_bin: float  # share of heads in [3max/4, max]
    layer_means: list[float]  # [L] final mean entropy per layer (nats)
    head_means: list[list[float]]  # [L, H] final mean entropy per head (nats)
    entropy_max: float  # (1/T) sum_i log i
    collapsed_layers: int  # collapsed deep layers at the end (library detector)
    collapsed: float  # 1.0 when the run ends with a collapsed deep layer or a non-finite loss or entropy, else 0.0
    collapse_step: int | None  # first logged step with a collapsed deep layer or a non-finite loss or entropy
    leaves_uniform_step: int | None  # first logged step with mean entropy < UNIFORM_FRACTION * entropy_max
    thresholds: list[list[float]] | None  # learned θ [L, H] of EReg runs


def _series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = _as_float(row.get(key))
        if value is not None:
            steps.append(int(float(row["step"])))
            values.append(value)
    return steps, values


def _head_series(rows: list[dict[str, str]]) -> list[tuple[int, np.ndarray]]:
    """(step, [L, H] entropies) of every logged row that holds every head's entropy, in step order."""
    keys = [k for k in (rows[-1].keys() if rows else []) if k.startswith("entropy/layer_") and "/head_" in k]
    if not keys:
        raise ValueError("no per-head entropy in the metrics: train with AttentionEntropyMonitor(log_heads=True)")
    n_layer = 1 + max(int(k.split("/")[1].split("_")[1]) for k in keys)
    n_head = 1 + max(int(k.split("/")[2].split("_")[1]) for k in keys)
    series = []
    for row in rows:
        values = [_as_float(row.get(f"entropy/layer_{i}/head_{j}")) for i in range(n_layer) for j in range(n_head)]
        if all(v is not None for v in values):
            series.append((int(float(row["step"])), np.asarray(values, dtype=np.float64).reshape(n_layer, n_head)))
    if not series:
        raise ValueError("no logged row holds every head's entropy")
    return series


def _collapse_step(heads: list[tuple[int, np.ndarray]], losses: tuple[list[int], list[float]], context: int):
    """First logged step at which a deep layer has collapsed or the loss or an entropy is not finite (None: never)."""
    import torch

    flagged = [s for s, h in heads if entropy_collapse(torch.as_tensor(h), context_size=context).collapsed]
    flagged += [s for s, v in zip(*losses, strict=True) if not math.isfinite(v)]
    return min(flagged, default=None)


def _learned_thresholds(run_dir: Path) -> list[list[float]] | None:
    """θ [L, H] from the run's archived thresholds.json or its last checkpoint, or None when the run has none."""
    import torch

    kept = run_dir / "thresholds.json"
    if kept.is_file():
        return json.loads(kept.read_text())["thresholds"]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    found = [v for k, v in state.items() if k.endswith("entropy_thresholds")]
    return found[0].float().tolist() if found else None


def collect_run(key: str, seed: int, run_dir: Path) -> tuple[RunResult, dict]:
    """Reads a finished run into a :class:`RunResult` and its curves (for the figures)."""
    import torch

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    summary = summarize_run(run_dir)
    rows = read_run_metrics(run_dir)
    head_series = _head_series(rows)
    heads = head_series[-1][1]
    context = int(recipe["data"]["block_size"])
    top = mean_causal_max_entropy(context)
    shares = [float(s) for s in entropy_bin_shares(torch.as_tensor(heads), max_value=top).shares]
    tokens_per_step = (
        int(recipe["data"]["batch_size"]) * context * int(recipe["trainer"].get("accumulate_grad_batches", 1))
    )
    mean_steps, mean_values = _series(rows, "entropy/mean")
    leaves = next((s for s, v in zip(mean_steps, mean_values, strict=True) if v < UNIFORM_FRACTION * top), None)
    wall = run_dir / "wall_time.json"
    final_collapse = entropy_collapse(torch.as_tensor(heads), context_size=context)
    result = RunResult(
        key=key,
        seed=seed,
        steps=summary.steps,
        tokens=None if summary.steps is None else summary.steps * tokens_per_step,
        val_loss=summary.val_loss,
        val_ppl=summary.val_ppl,
        diverged=summary.diverged,
        wall_minutes=json.loads(wall.read_text())["seconds"] / 60 if wall.is_file() else None,
        tokens_per_sec=summary.tokens_per_sec,
        bin_shares=shares,
        top_bin=shares[3],
        layer_means=[float(v) for v in np.nanmean(heads, axis=1)],
        head_means=heads.tolist(),
        entropy_max=float(top),
        collapsed_layers=len(final_collapse.collapsed_layers),
        collapsed=float(final_collapse.collapsed or summary.diverged),
        collapse_step=_collapse_step(head_series, _series(rows, "train/loss"), context),
        leaves_uniform_step=leaves,
        thresholds=_learned_thresholds(run_dir),
    )
    n_layer = heads.shape[0]
    curves = {
        "val_loss": _series(rows, "val/loss"),
        "train_loss": _series(rows, "train/loss"),
        "layers": [_series(rows, f"entropy/layer_{i}/mean") for i in range(n_layer)],
    }
    return result, curves


# ---------------------------------------------------------------------------------------------------- statistics
def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample standard deviation / √n; None for n < 2)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        return float(array.mean()), None
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


@dataclass
class Comparison:
    """Paired differences of one metric, arm − control, over the seeds both finished."""

    arm: str
    control: str
    metric: str
    seeds: list[int]
    differences: list[float]  # per seed; val_ppl in percent of the control, other metrics absolute
    mean: float | None
    se: float | None
    shown: int  # +1 / -1 when the pass rule shows arm above / below the control, 0 when it does not


def pass_rule(differences: list[float]) -> int:
    """+1 or -1 when every difference has that sign and |mean| > 2·SE (n >= 2), else 0."""
    if len(differences) < 2:
        return 0
    mean, se = mean_se(differences)
    signs = {math.copysign(1, d) if d != 0 else 0 for d in differences}
    if len(signs) != 1 or 0 in signs or se is None or abs(mean) <= 2 * se:
        return 0
    return int(signs.pop())


def compare(runs: dict[tuple[str, int], RunResult], arm: str, control: str, metric: str) -> Comparison:
    seeds = sorted(s for (k, s) in runs if k == arm and (control, s) in runs)
    differences = []
    for seed in seeds:
        a, c = getattr(runs[(arm, seed)], metric), getattr(runs[(control, seed)], metric)
        if a is None or c is None or not (math.isfinite(a) and math.isfinite(c)):
            continue
        differences.append(100.0 * (a / c - 1.0) if metric == "val_ppl" else float(a - c))
    mean, se = mean_se(differences) if differences else (None, None)
    return Comparison(arm, control, metric, seeds, differences, mean, se, pass_rule(differences))


def verdict(finding: Finding, runs: dict[tuple[str, int], RunResult]) -> tuple[str, Comparison]:
    """``reproduces`` / ``does not reproduce`` / ``opposite`` / ``untested (...)`` with the comparison behind it."""
    comparison = compare(runs, finding.arm, finding.control, finding.metric)
    if len(comparison.differences) < 2:
        missing = len(comparison.seeds) - len(comparison.differences)
        if len(comparison.seeds) >= 2 and missing:
            return (
                f"untested (no finite {finding.metric} in {missing} of {len(comparison.seeds)} pairs: a run diverged)",
                comparison,
            )
        return f"untested ({len(comparison.differences)} paired seed(s))", comparison
    arm_runs = [r for (k, _), r in runs.items() if k == finding.arm]
    if all(r.leaves_uniform_step is None and not r.collapsed for r in arm_runs):  # a collapse has left uniform
        return "untested (attention never left uniform)", comparison
    if finding.needs_control_collapse and not any(runs[(finding.control, s)].collapsed for s in comparison.seeds):
        return "untested (the control did not collapse)", comparison
    if comparison.shown == finding.expected:
        return "reproduces", comparison
    if comparison.shown == -finding.expected:
        return "opposite", comparison
    return "does not reproduce (no difference by the pass rule)", comparison


def _pm(mean: float | None, se: float | None, spec: str) -> str:
    if mean is None:
        return "-"
    return f"{mean:{spec}}" + (f" ± {se:{spec}}" if se is not None else "")


def arms_table(arms: list[Arm], runs: dict[tuple[str, int], RunResult]) -> str:
    """Markdown: per arm, mean ± SE over seeds and the paired difference against its control."""
    header = [
        "arm",
        "seeds",
        "val ppl (mean ± SE)",
        "vs control",
        "Δ ppl, paired (mean ± SE)",
        "per seed",
        "shown",
        "leaves uniform at step",
        "top-bin share",
        "collapsed layers",
        "collapses at step",
        "layer means (nats)",
        "tokens",
        "min/run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        mine = sorted((r for (k, _), r in runs.items() if k == arm.key), key=lambda r: r.seed)
        if not mine:
            continue
        ppl = [r.val_ppl for r in mine if r.val_ppl is not None and math.isfinite(r.val_ppl)]
        cells = [arm.label, ",".join(str(r.seed) for r in mine), _pm(*mean_se(ppl), ".1f") if ppl else "-"]
        if arm.control and any(k == arm.control for k, _ in runs):
            c = compare(runs, arm.key, arm.control, "val_ppl")
            shown = {1: "higher", -1: "lower", 0: "no"}[c.shown] if len(c.differences) >= 2 else "-"
            cells += [
                ARMS_BY_KEY[arm.control].label,
                _pm(c.mean, c.se, "+.1f") + ("%" if c.mean is not None else ""),
                " / ".join(f"{d:+.1f}%" for d in c.differences) or "-",
                shown,
            ]
        else:
            cells += ["-", "-", "-", "-"]
        leaves = [r.leaves_uniform_step for r in mine]
        layer_means = np.mean([r.layer_means for r in mine], axis=0)
        walls = [r.wall_minutes for r in mine if r.wall_minutes is not None]
        cells += [
            " / ".join("never" if s is None else str(s) for s in leaves),
            f"{100 * np.mean([r.top_bin for r in mine]):.0f}%",
            _fmt(float(np.mean([r.collapsed_layers for r in mine])), ".1f"),
            " / ".join("never" if r.collapse_step is None else str(r.collapse_step) for r in mine),
            " / ".join(f"{v:.2f}" for v in layer_means),
            f"{mine[0].tokens / 1e6:.1f}M" if mine[0].tokens else "-",
            f"{np.mean(walls):.0f}" if walls else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def findings_table(runs: dict[tuple[str, int], RunResult]) -> tuple[str, list[dict]]:
    """Markdown: the verdict on each finding, and the same as records for results.json."""
    units = {"val_ppl": "% ppl", "top_bin": " share", "collapsed": " (1: collapsed)"}
    lines = [
        "| # | claim | arm vs control | metric | paired difference (mean ± SE) | per seed | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    records = []
    for finding in FINDINGS:
        text, c = verdict(finding, runs)
        spec = "+.1f" if finding.metric == "val_ppl" else "+.2f"
        lines.append(
            f"| {finding.number} | {finding.claim} | {ARMS_BY_KEY[finding.arm].label} vs "
            f"{ARMS_BY_KEY[finding.control].label} | {finding.metric} | "
            f"{_pm(c.mean, c.se, spec)}{units[finding.metric] if c.mean is not None else ''} | "
            f"{' / '.join(f'{d:{spec}}' for d in c.differences) or '-'} | {text} |"
        )
        records.append({**asdict(finding), "verdict": text, "comparison": asdict(c)})
    return "\n".join(lines) + "\n", records


# ---------------------------------------------------------------------------------------------------- figures
def _layer_colors(n_layer: int) -> list:
    """One color per layer from a sequential colormap (first layer dark, last light)."""
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, max(n_layer, 2))]


def plot_layer_entropy(arms: list[Arm], curves: dict, runs: dict, path: Path) -> Path:
    """Layerwise mean entropy over the steps, one panel per arm, first seed (the paper's Fig. 5)."""
    shown = [a for a in arms if any((a.key, s) in curves for s in range(100))]
    cols = 4
    rows = math.ceil(len(shown) / cols)
    fig = new_figure(4 * cols, 3 * rows)
    for i, arm in enumerate(shown):
        seed = min(s for (k, s) in curves if k == arm.key)
        layers = curves[(arm.key, seed)]["layers"]
        top = runs[(arm.key, seed)].entropy_max
        ax = fig.add_subplot(rows, cols, i + 1)
        for layer, (steps, values) in enumerate(layers):
            ax.plot(steps, values, color=_layer_colors(len(layers))[layer], label=f"L{layer}")
        ax.axhline(top, color="grey", linestyle=":", linewidth=1)
        ax.axhline(UNIFORM_FRACTION * top, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, top * 1.05)
        ax.set_xlim(left=0)
        collapse_step = runs[(arm.key, seed)].collapse_step
        if collapse_step is not None:
            ax.text(0.97, 0.05, f"collapsed at step {collapse_step}", transform=ax.transAxes, ha="right", fontsize=8)
        ax.set_title(f"{arm.label} (seed {seed})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("mean entropy (nats)", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6)
    fig.subplots_adjust(hspace=0.45, wspace=0.3)
    return save_figure(fig, path)


# One panel per question, so that no panel holds more arms than a palette tells apart.
LOSS_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LayerNorm and the FFN activation (lr 1e-3)", ("sm_ln_g", "sm_g", "sm_r", "sm")),
    (
        "FFN stabilizers and the temperature (lr 1e-3)",
        ("sm", "sm_wnorm_ffn", "sm_snorm_ffn", "sm_scfuffn", "sm_scfuffn_a10", "sm_t_scfuffn"),
    ),
    (
        "entropy regularization (lr 1e-3)",
        (
            *("sm_t_scfuffn", "ereg", "ereg_weak", "ereg_wide"),
            *("ereg_paper_lambda", "ereg_per_query", "ereg_frozen_theta", "ereg_before"),
        ),
    ),
    (
        "learning-rate sweep and the stress lr",
        (
            *("sm_lr3e-3", "sm_lr4e-3", "sm_lr1e-2", "sm_ln_g_hi"),
            *("sm_hi", "sm_scfuffn_hi", "sm_scfuffn_a10_hi", "sm_snorm_ffn_hi"),
        ),
    ),
)


def plot_losses(arms: list[Arm], curves: dict, runs: dict, path: Path) -> Path:
    """Training loss over the steps, mean over seeds with a band from the lowest to the highest seed, one panel per
    group of ``LOSS_PANELS`` (arms in none go to a last panel); each legend entry ends with the final validation
    perplexity (mean over seeds)."""
    from matplotlib import colormaps

    keys = [a.key for a in arms if any(k == a.key and c["train_loss"][0] for (k, _), c in curves.items())]
    panels = [(title, [k for k in members if k in keys]) for title, members in LOSS_PANELS]
    grouped = {k for _, members in panels for k in members}
    panels.append(("other arms", [k for k in keys if k not in grouped]))
    panels = [(title, members) for title, members in panels if members]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(7 * cols, 4.2 * rows)
    palette = colormaps["tab10"]
    for i, (title, members) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, key in enumerate(members):
            series = [c["train_loss"] for (k, _), c in curves.items() if k == key and c["train_loss"][0]]
            length = min(len(s[0]) for s in series)
            steps = np.asarray(series[0][0][:length])
            values = np.asarray([s[1][:length] for s in series])
            ppl = [r.val_ppl for (k, _), r in runs.items() if k == key and r.val_ppl is not None]
            label = f"{ARMS_BY_KEY[key].label}: {np.mean(ppl):.1f}" if ppl else f"{ARMS_BY_KEY[key].label}: diverged"
            color = palette(j % 10)
            ax.plot(steps, values.mean(axis=0), color=color, linewidth=1.2, label=label)
            if len(series) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2)
        ax.set_ylim(top=min(ax.get_ylim()[1], 8.0))
        ax.set_xlim(left=0)
        ax.set_xlabel("step")
        ax.set_ylabel("training cross-entropy (nats)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="arm: val ppl", title_fontsize=7)
    fig.subplots_adjust(hspace=0.3, wspace=0.2)
    return save_figure(fig, path)


def plot_bins(arms: list[Arm], runs: dict, path: Path) -> Path:
    """Share of heads per entropy bin, mean over seeds: one stacked bar per arm, lowest bin on the left (the
    paper's Fig. 2a, turned sideways so that many arms stay readable)."""
    shown = [(a, [r for (k, _), r in runs.items() if k == a.key]) for a in arms]
    shown = [(a, rs) for a, rs in shown if rs]
    fig = new_figure(10, 1.2 + 0.32 * len(shown))
    ax = fig.add_subplot(1, 1, 1)
    rows = np.arange(len(shown))[::-1]  # first arm on top
    shares = np.array([np.mean([r.bin_shares for r in rs], axis=0) * 100 for _, rs in shown]).reshape(-1, 4)
    colors = _layer_colors(4)
    left = np.zeros(len(shown))
    for b in range(4):
        ax.barh(rows, shares[:, b], left=left, color=colors[b], label=BIN_LABELS[b], height=0.75)
        for y, x0, w in zip(rows, left, shares[:, b], strict=True):
            if w >= 8:
                ax.text(x0 + w / 2, y, f"{w:.0f}", ha="center", va="center", fontsize=7, color="wk"[b // 2])
        left += shares[:, b]
    for y, total in zip(rows, left, strict=True):
        if total == 0:  # no finite entropy at the end
            ax.text(1, y, "diverged (no finite entropy)", va="center", fontsize=7, color="grey")
    ax.set_yticks(rows)
    ax.set_yticklabels([a.label for a, _ in shown], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of heads (%)")
    ax.set_title("final per-head entropy bins, mean over seeds (max = causal maximum)")
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.04 + 0.4 / max(len(shown), 1)))
    return save_figure(fig, path)


def plot_thresholds(arms: list[Arm], runs: dict, path: Path) -> Path | None:
    """Learned θ (fraction of log T) per layer and head at the end of training, first seed (the paper's Fig. 6)."""
    shown = []
    for arm in arms:
        seeds = sorted(s for (k, s) in runs if k == arm.key and runs[(k, s)].thresholds is not None)
        if seeds and arm.recipe == "ereg_sm_t_scfuffn":
            shown.append((arm, runs[(arm.key, seeds[0])]))
    if not shown:
        return None
    fig = new_figure(3.4 * len(shown), 3)
    for i, (arm, run) in enumerate(shown):
        data = np.asarray(run.thresholds, dtype=np.float64)
        ax = fig.add_subplot(1, len(shown), i + 1)
        image = ax.imshow(data, cmap="magma", vmin=0, vmax=1, aspect="auto")
        for layer in range(data.shape[0]):
            for head in range(data.shape[1]):
                ax.text(head, layer, f"{data[layer, head]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if data[layer, head] < 0.5 else "black")  # fmt: skip
        ax.set_title(f"{arm.label} (seed {run.seed})", fontsize=8)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    fig.colorbar(image, ax=fig.axes, label="θ (fraction of log T)", shrink=0.8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- main
def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r} must be KEY=VALUE with a dotted KEY, e.g. trainer.max_steps=300")
        key, value = pair.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return overrides


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers >= 0 separated by commas, e.g. 0,1,2; got {text!r}")
    return seeds


def select_arms(names: str | None) -> list[Arm]:
    """All arms (default) or a comma-separated subset, in the given order."""
    if not names:
        return list(ARMS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in ARMS_BY_KEY]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; known: {sorted(ARMS_BY_KEY)}")
    return [ARMS_BY_KEY[n] for n in wanted]


def splice_page(page: Path, sections: dict[str, str]) -> bool:
    """Replaces what lies between ``<!-- study:NAME -->`` and ``<!-- /study:NAME -->`` in ``page`` by
    ``sections[NAME]`` (written atomically). Returns False, changing nothing, when a pair of markers is missing."""
    text = page.read_text()
    for name, body in sections.items():
        start, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
        head, found, rest = text.partition(start)
        _, found_end, tail = rest.partition(end)
        if not found or not found_end:
            return False
        text = f"{head}{start}\n{body.strip()}\n{end}{tail}"
    atomic_write_text(page, text)
    return True


def write_report(arms: list[Arm], out: Path, docs: Path, overrides: dict, *, log, archive: Path | None = None) -> int:
    """Tabulates every finished run of ``arms`` (and their controls), trained here or archived, into ``docs``;
    archives the ones trained here. Returns 1 if there is none."""
    archive = archive if archive is not None else docs / "runs"
    keys = {a.key for a in arms} | {a.control for a in arms if a.control}
    keys |= {f.control for f in FINDINGS if f.arm in keys}
    ordered = [a for a in ARMS if a.key in keys]
    runs: dict[tuple[str, int], RunResult] = {}
    curves: dict[tuple[str, int], dict] = {}
    for arm in ordered:
        seeds = {int(d.name[4:]) for base in (out, archive) for d in (base / arm.key).glob("seed*")}
        for seed in sorted(seeds):
            run_dir = finished_run_dir(out, archive, arm.key, seed)
            if run_dir is not None:
                runs[(arm.key, seed)], curves[(arm.key, seed)] = collect_run(arm.key, seed, run_dir)
    if not runs:
        log("no finished run to report")
        return 1
    table = arms_table(ordered, runs)
    findings, records = findings_table(runs)
    atomic_write_text(docs / "results.md", table + "\n" + findings)
    atomic_write_json(
        docs / "results.json",
        {
            "regime": REGIME,
            "overrides": overrides,
            "uniform_fraction": UNIFORM_FRACTION,
            "runs": [asdict(r) for r in runs.values()],
            "findings": records,
        },
    )
    figures = [
        plot_bins(ordered, runs, docs / "entropy_bins.png"),
        plot_losses(ordered, curves, runs, docs / "loss_curves.png"),
        plot_layer_entropy(ordered, curves, runs, docs / "layer_entropy.png"),
        plot_thresholds(ordered, runs, docs / "thresholds.png"),
    ]
    for figure in figures:
        if figure is not None:
            log(f"wrote {figure}")
    page = docs.with_suffix(".md")  # docs/reproduction.md: its tables follow a report of every arm
    full = {a.key for a in arms} == set(ARMS_BY_KEY)
    if full and page.is_file() and splice_page(page, {"arms": table, "findings": findings}):
        log(f"updated the tables of {page}")
    print(table + "\n" + findings)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study", help="directory of the runs: <out>/<arm>/seed<k>")
    parser.add_argument("--docs", default="docs/reproduction", help="directory for results.md/json and figures")
    parser.add_argument("--arms", default=None, help=f"comma-separated subset of {list(ARMS_BY_KEY)}")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the regime's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, dotted")
    parser.add_argument("--report-only", action="store_true", help="skip training; tabulate finished runs")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        arms = select_arms(args.arms)
        seeds = _parse_seeds(args.seeds)
        overrides = _parse_overrides(args.set)
        out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
        plan = [
            (arm, seed, run_recipe(arm, seed, out / arm.key / f"seed{seed}", steps=args.steps, overrides=overrides))
            for seed in seeds
            for arm in arms
        ]
    except (ValueError, KeyError, FileNotFoundError) as error:
        parser.error(str(error.args[0] if isinstance(error, KeyError) else error))
    docs = (REPO / args.docs) if not Path(args.docs).is_absolute() else Path(args.docs)
    lock = threading.Lock()

    def log(message: str) -> None:
        with lock:
            print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    if not args.report_only:
        prepare_data(plan[0][2])
        failures = []

        def run(item: tuple[Arm, int, dict]) -> None:
            arm, seed, recipe = item
            try:
                train_run(arm.key, seed, out / arm.key / f"seed{seed}", recipe, log=log, archive=docs / "runs")
            except RuntimeError as error:  # one failed run must not stop the others
                log(str(error))
                failures.append(str(error))

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(run, plan))
        if failures:
            log(f"{len(failures)} run(s) failed")
    return write_report(arms, out, docs, overrides, log=log)


if __name__ == "__main__":
    raise SystemExit(main())

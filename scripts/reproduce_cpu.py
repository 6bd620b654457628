"""CPU-scale reproduction of the paper's findings: trains each architecture arm at the same token budget and seed,
then writes a results table and figures.

Arms (recipes/cpu/*.yaml, identical training settings): the baseline SM+LN+G; LayerNorm-free GELU and ReLU;
softmax-only without a stabilizer and with each stabilizer (weight and spectral normalization of the FFN,
FFN scaling, fused scaled FFN); SM(t)+ScFuFFN without and with entropy regularization (the paper's method).

    .venv/bin/python scripts/reproduce_cpu.py                       # every arm, then the docs
    .venv/bin/python scripts/reproduce_cpu.py --arms sm,sm_g        # a subset
    .venv/bin/python scripts/reproduce_cpu.py --loss-coeff 0.01 --loss-coeff 0.2   # extra EReg arms (lambda sweep)
    .venv/bin/python scripts/reproduce_cpu.py --report-only         # rebuild table and figures from finished runs

Each arm trains in its own process through the ``entropic`` CLI, into ``<out>/<arm>``. A finished arm is
skipped and an interrupted one resumes from its ``last.ckpt``, so the script can be re-run after a kill.
Results go to ``<docs>/results.md``, ``<docs>/results.json`` and ``<docs>/*.png``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from entropic.callbacks.plotting import new_figure, save_figure  # noqa: E402
from entropic.functional import entropy_bin_shares, entropy_collapse, mean_causal_max_entropy  # noqa: E402
from entropic.io import atomic_write_json, atomic_write_text  # noqa: E402
from entropic.report import _as_float, _fmt, read_run_metrics, summarize_run  # noqa: E402


@dataclass(frozen=True)
class Arm:
    """One architecture arm of the comparison."""

    key: str  # run directory name
    recipe: str  # stem of recipes/cpu/<recipe>.yaml
    label: str  # how the table and figures name it
    loss_coeff: float | None = None  # lambda override for entropy-regularized arms


ARMS: tuple[Arm, ...] = (
    Arm("sm_ln_g", "sm_ln_g", "SM+LN+G (baseline)"),
    Arm("sm_g", "sm_g", "SM+G (LN-free GELU)"),
    Arm("sm_r", "sm_r", "SM+R (LN-free ReLU)"),
    Arm("sm", "sm", "SM (softmax-only)"),
    Arm("sm_wnorm_ffn", "sm_wnorm_ffn", "SM+WNorm(FFN)"),
    Arm("sm_snorm_ffn", "sm_snorm_ffn", "SM+SNorm(FFN)"),
    Arm("sm_scffn", "sm_scffn", "SM+ScFFN"),
    Arm("sm_scfuffn", "sm_scfuffn", "SM+ScFuFFN"),
    Arm("sm_t_scfuffn", "sm_t_scfuffn", "SM(t)+ScFuFFN"),
    Arm("ereg_sm_t_scfuffn", "ereg_sm_t_scfuffn", "EReg(SM(t)+ScFuFFN)"),
)


def lambda_arm(loss_coeff: float) -> Arm:
    """An extra EReg(SM(t)+ScFuFFN) arm with entropy-regularization weight ``loss_coeff``."""
    if not (isinstance(loss_coeff, float) and math.isfinite(loss_coeff) and loss_coeff > 0):
        raise ValueError(f"--loss-coeff must be a finite number > 0, got {loss_coeff!r}")
    return Arm(f"ereg_lambda_{loss_coeff:g}", "ereg_sm_t_scfuffn", f"EReg, λ={loss_coeff:g}", loss_coeff)


# ---------------------------------------------------------------------------------------------------- recipes
def _set_dotted(config: dict, dotted: str, value: object) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise KeyError(f"--set {dotted}: {part!r} is not a section of the recipe")
        node = node[part]
    node[leaf] = value  # a new key is allowed: the CLI's parser rejects keys it does not know


def arm_recipe(arm: Arm, run_dir: Path, *, steps: int | None, overrides: dict[str, object]) -> dict:
    """The recipe an arm trains with: recipes/cpu/<recipe>.yaml plus the run directory and overrides."""
    path = REPO / "recipes" / "cpu" / f"{arm.recipe}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"arm {arm.key!r}: recipe {path} does not exist")
    config = yaml.safe_load(path.read_text())
    config = copy.deepcopy(config)
    config["trainer"]["default_root_dir"] = str(run_dir)
    config["trainer"]["enable_progress_bar"] = False
    if steps is not None:
        config["trainer"]["max_steps"] = steps
    if arm.loss_coeff is not None:
        regs = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EntropyRegularization")]
        if not regs:
            raise ValueError(f"arm {arm.key!r}: recipe {path.name} has no EntropyRegularization to set lambda on")
        regs[0]["init_args"]["loss_coeff"] = arm.loss_coeff
    for dotted, value in overrides.items():
        _set_dotted(config, dotted, value)
    return config


# ---------------------------------------------------------------------------------------------------- training
def _finished_steps(run_dir: Path) -> int | None:
    if not (run_dir / "report.json").is_file():
        return None
    try:
        return summarize_run(run_dir).steps
    except FileNotFoundError:
        return None


def train_arm(arm: Arm, run_dir: Path, recipe: dict, *, log) -> None:
    """Trains one arm in a child process (resuming from last.ckpt if a previous attempt was interrupted)."""
    target = int(recipe["trainer"]["max_steps"])
    done = _finished_steps(run_dir)
    if done is not None and done >= target:
        log(f"[{arm.key}] finished earlier ({done} steps), skipped")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir / "recipe.yaml"
    atomic_write_text(recipe_path, yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "entropic.cli", "fit", "--config", str(recipe_path)]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        command += ["--ckpt_path", "last"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log(f"[{arm.key}] training {target} steps: {' '.join(command[1:])}")
    started = time.perf_counter()
    with (run_dir / "train.log").open("a") as handle:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    minutes = (time.perf_counter() - started) / 60
    if result.returncode != 0:
        raise RuntimeError(f"arm {arm.key!r} failed (exit {result.returncode}); see {run_dir / 'train.log'}")
    log(f"[{arm.key}] done in {minutes:.1f} min")


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class ArmResult:
    """What the results table shows for one arm."""

    key: str
    label: str
    arch: str | None
    steps: int | None
    tokens: int | None
    val_loss: float | None
    val_ppl: float | None
    diverged: bool
    tokens_per_sec: float | None
    bin_shares: list[float]  # [4] shares of heads per bin, max = causal maximum of the query-averaged entropy
    layer_means: list[float]  # [L] final mean entropy per layer (nats)
    head_means: list[list[float]]  # [L, H] final mean entropy per head (nats)
    entropy_max: float  # the bins' max: (1/T) sum_i log i
    collapsed_layers: list[int]  # deep layers whose heads mostly sit below 5% of entropy_max (library detector)
    first_nonfinite_step: int | None


def _series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = _as_float(row.get(key))
        if value is not None:
            steps.append(int(float(row["step"])))
            values.append(value)
    return steps, values


def _head_means(rows: list[dict[str, str]]) -> np.ndarray:
    """[L, H] from the last row that logged every head's entropy."""
    keys = [k for k in (rows[-1].keys() if rows else []) if k.startswith("entropy/layer_") and "/head_" in k]
    if not keys:
        raise ValueError("no per-head entropy in the metrics: train with AttentionEntropyMonitor(log_heads=True)")
    n_layer = 1 + max(int(k.split("/")[1].split("_")[1]) for k in keys)
    n_head = 1 + max(int(k.split("/")[2].split("_")[1]) for k in keys)
    for row in reversed(rows):
        values = [_as_float(row.get(f"entropy/layer_{i}/head_{j}")) for i in range(n_layer) for j in range(n_head)]
        if all(v is not None for v in values):
            return np.asarray(values, dtype=np.float64).reshape(n_layer, n_head)
    raise ValueError("no logged row holds every head's entropy")


def _trained_recipe(run_dir: Path, recipe: dict) -> dict:
    """The recipe the run actually trained with (saved next to it), else ``recipe``."""
    saved = run_dir / "recipe.yaml"
    return yaml.safe_load(saved.read_text()) if saved.is_file() else recipe


def _label(arm: Arm, recipe: dict) -> str:
    """The arm's label, plus lambda for entropy-regularized arms and any temperature init override."""
    extras = []
    regs = [c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("EntropyRegularization")]
    if regs and arm.loss_coeff is None:
        extras.append(f"λ={regs[0]['init_args']['loss_coeff']:g}")
    overrides = recipe["model"].get("model_overrides") or {}
    if "temperature_init" in overrides:
        extras.append(f"t₀={overrides['temperature_init']:g}")
    return f"{arm.label}, {', '.join(extras)}" if extras else arm.label


def collect(arm: Arm, run_dir: Path, recipe: dict) -> tuple[ArmResult, dict]:
    """Reads a finished arm into an :class:`ArmResult` and its curves (for the figures)."""
    import torch

    recipe = _trained_recipe(run_dir, recipe)
    summary = summarize_run(run_dir)
    rows = read_run_metrics(run_dir)
    heads = _head_means(rows)
    context = int(recipe["data"]["block_size"])
    top = mean_causal_max_entropy(context)
    shares = entropy_bin_shares(torch.as_tensor(heads), max_value=top).shares
    loss_steps, losses = _series(rows, "train/loss")
    nonfinite = [s for s, v in zip(loss_steps, losses, strict=True) if not math.isfinite(v)]
    tokens_per_step = (
        int(recipe["data"]["batch_size"]) * context * int(recipe["trainer"].get("accumulate_grad_batches", 1))
    )
    result = ArmResult(
        key=arm.key,
        label=_label(arm, recipe),
        arch=summary.arch,
        steps=summary.steps,
        tokens=None if summary.steps is None else summary.steps * tokens_per_step,
        val_loss=summary.val_loss,
        val_ppl=summary.val_ppl,
        diverged=summary.diverged,
        tokens_per_sec=summary.tokens_per_sec,
        bin_shares=[float(s) for s in shares],
        layer_means=[float(v) for v in np.nanmean(heads, axis=1)],
        head_means=heads.tolist(),
        entropy_max=float(top),
        collapsed_layers=list(entropy_collapse(torch.as_tensor(heads), context_size=context).collapsed_layers),
        first_nonfinite_step=nonfinite[0] if nonfinite else None,
    )
    n_layer = heads.shape[0]
    curves = {
        "val_loss": _series(rows, "val/loss"),
        "train_loss": _series(rows, "train/loss"),
        "layers": [_series(rows, f"entropy/layer_{i}/mean") for i in range(n_layer)],
    }
    return result, curves


def results_table(results: list[ArmResult]) -> str:
    """Markdown table: perplexity, divergence, entropy bins and per-layer entropy of every arm."""
    bins = ("[0,max/4)", "[max/4,max/2)", "[max/2,3max/4)", "[3max/4,max]")
    header = [
        "arm",
        "val loss",
        "val ppl",
        "Δ ppl vs baseline",
        "diverged (NaN)",
        "collapsed layers",
        *bins,
        "layer means (nats)",
        "tokens/s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = next((r.val_ppl for r in results if r.key == "sm_ln_g"), None)
    for r in results:
        delta = "-"
        if base and r.val_ppl is not None and math.isfinite(r.val_ppl):
            delta = f"{100 * (r.val_ppl / base - 1):+.1f}%"
        diverged = "yes" if r.diverged else "no"
        if r.first_nonfinite_step is not None:
            diverged += f" (step {r.first_nonfinite_step})"
        cells = [
            r.label,
            _fmt(r.val_loss, ".3f"),
            _fmt(r.val_ppl, ".1f"),
            delta,
            diverged,
            ", ".join(map(str, r.collapsed_layers)) or "-",
            *(f"{100 * s:.0f}%" for s in r.bin_shares),
            " / ".join(_fmt(v, ".2f") for v in r.layer_means),
            _fmt(r.tokens_per_sec, ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- figures
def plot_bins(results: list[ArmResult], path: Path) -> Path:
    """Grouped bars: share of heads per entropy bin, one bar per arm (the paper's Fig. 2a)."""
    fig = new_figure(10, 4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        ax.bar(
            np.arange(4) + (i - (len(results) - 1) / 2) * width, np.asarray(r.bin_shares) * 100, width, label=r.label
        )
    ax.set_xticks(range(4))
    ax.set_xticklabels(["[0, max/4)", "[max/4, max/2)", "[max/2, 3max/4)", "[3max/4, max]"])
    ax.set_ylabel("share of heads (%)")
    ax.set_title(f"final per-head entropy bins (max = causal maximum, {results[0].entropy_max:.2f} nats)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_losses(results: list[ArmResult], curves: dict[str, dict], path: Path) -> Path:
    """Training and validation loss against the step, one line per arm (the paper's Fig. 2b)."""
    fig = new_figure(11, 4)
    for col, (key, title) in enumerate((("train_loss", "training loss"), ("val_loss", "validation loss"))):
        ax = fig.add_subplot(1, 2, col + 1)
        for r in results:
            steps, values = curves[r.key][key]
            ax.plot(steps, values, marker="o" if key == "val_loss" else None, label=r.label)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _layer_colors(n_layer: int) -> list:
    """One color per layer from a sequential colormap (first layer dark, last light), so deep models stay legible."""
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, max(n_layer, 2))]


def plot_layer_entropy(results: list[ArmResult], curves: dict[str, dict], path: Path) -> Path:
    """Layerwise mean entropy against the step, one panel per arm (the paper's Fig. 5)."""
    cols = 4
    rows = math.ceil(len(results) / cols)
    fig = new_figure(4 * cols, 3 * rows)
    for i, r in enumerate(results):
        ax = fig.add_subplot(rows, cols, i + 1)
        layers = curves[r.key]["layers"]
        colors = _layer_colors(len(layers))
        for layer, (steps, values) in enumerate(layers):
            ax.plot(steps, values, color=colors[layer], label=f"L{layer}")
        ax.axhline(r.entropy_max, color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(0, r.entropy_max * 1.05)
        ax.set_title(r.label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("mean entropy (nats)", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6, ncol=2 if len(layers) > 6 else 1)
    return save_figure(fig, path)


def plot_heatmaps(results: list[ArmResult], path: Path) -> Path:
    """Final layer × head mean entropy, one heatmap per arm (the paper's Fig. 3)."""
    cols = 5
    rows = math.ceil(len(results) / cols)
    fig = new_figure(3.2 * cols, 2.8 * rows)
    top = results[0].entropy_max
    for i, r in enumerate(results):
        ax = fig.add_subplot(rows, cols, i + 1)
        data = np.asarray(r.head_means, dtype=np.float64)
        image = ax.imshow(np.ma.masked_invalid(data), cmap="cividis", vmin=0, vmax=top, aspect="auto")
        for layer in range(data.shape[0]):
            for head in range(data.shape[1]):
                value = data[layer, head]
                ax.text(head, layer, f"{value:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if np.isfinite(value) and value > top / 2 else "white")  # fmt: skip
        ax.set_title(r.label, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    fig.colorbar(image, ax=fig.axes, label="entropy (nats)", shrink=0.8)
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


def select_arms(names: str | None, loss_coeffs: list[float]) -> list[Arm]:
    """The arms to run: all (default) or a comma-separated subset, plus one arm per extra lambda."""
    arms = list(ARMS)
    if names:
        known = {a.key: a for a in ARMS}
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; known: {sorted(known)}")
        arms = [known[n] for n in wanted]
    return arms + [lambda_arm(float(c)) for c in loss_coeffs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/repro-cpu", help="directory of the arms' runs")
    parser.add_argument("--docs", default="docs/reproduction", help="directory for results.md/json and figures")
    parser.add_argument("--arms", default=None, help=f"comma-separated subset of {[a.key for a in ARMS]}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default: the recipes')")
    parser.add_argument("--loss-coeff", type=float, action="append", default=[], help="extra EReg arm with this λ")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, dotted")
    parser.add_argument("--report-only", action="store_true", help="skip training; tabulate finished arms")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    try:
        arms = select_arms(args.arms, args.loss_coeff)
        overrides = _parse_overrides(args.set)
        out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
        recipes = {a.key: arm_recipe(a, out / a.key, steps=args.steps, overrides=overrides) for a in arms}
    except (ValueError, KeyError, FileNotFoundError) as error:
        parser.error(str(error.args[0] if isinstance(error, KeyError) else error))

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    if not args.report_only:
        for arm in arms:
            train_arm(arm, out / arm.key, recipes[arm.key], log=log)
    finished = [a for a in arms if (out / a.key / "report.json").is_file()]
    if not finished:
        log("no finished arm to report")
        return 1
    collected = [collect(a, out / a.key, recipes[a.key]) for a in finished]
    results = [r for r, _ in collected]
    curves = {r.key: c for r, c in collected}
    docs = (REPO / args.docs) if not Path(args.docs).is_absolute() else Path(args.docs)
    table = results_table(results)
    atomic_write_text(docs / "results.md", table)
    atomic_write_json(docs / "results.json", {"arms": [asdict(r) for r in results], "overrides": overrides})
    for figure in (
        plot_bins(results, docs / "entropy_bins.png"),
        plot_losses(results, curves, docs / "loss_curves.png"),
        plot_layer_entropy(results, curves, docs / "layer_entropy.png"),
        plot_heatmaps(results, docs / "head_heatmaps.png"),
    ):
        log(f"wrote {figure}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Step-time overhead of AttentionEntropyMonitor + EntropyRegularization on a Lightning training step.

Times one training step (forward, loss, backward, optimizer step; measured between ``on_train_batch_start`` and
``on_train_batch_end`` of the Trainer) of a Hugging Face GPT-2 LightningModule written the usual way, in modes:

* ``plain``: the module as written (default sdpa attention), no callbacks — the baseline;
* ``callbacks``: the same module with both callbacks (the model switches to the entropic attention);
* ``eager``: eager attention, no penalty (the reference approach's own attention cost);
* ``reference``: the reference approach of the paper's released code, re-implemented here from its description:
  eager attention with ``output_attentions=True``, row entropies from the materialized probabilities, and a Python
  loop over layers and heads applying the squared band penalty per query (thresholds shared across layers).

Modes run interleaved (one short fit per mode per round) in one process and the median step of all rounds is
reported, with ratios to ``plain``, both in wall time and in process CPU time (the latter is robust to other jobs
on a shared machine when torch runs one thread). Peak memory per mode is the median over rounds of the fit's peak RSS
growth (``VmHWM`` reset through ``/proc/self/clear_refs`` before the model is built), with glibc's mmap threshold
pinned (the script restarts itself with ``MALLOC_MMAP_THRESHOLD_=65536``) so RSS follows live tensors. Results go
to ``benchmarks/results/callback_overhead_<date>_<host>_T<T>.{json,csv}``.

    OMP_NUM_THREADS=1 python benchmarks/callback_overhead.py --layers 4 --heads 4 --embd 256 --seq 128 512 1024 --batch 8
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from hardware import PINNED_MALLOC_ENV, cpu_model, reset_peak_rss, rss_status  # benchmarks/, the script's own directory

MODES = ("plain", "callbacks", "eager", "reference")


def reference_penalty(attentions, theta_per_head: torch.Tensor, tolerance: float) -> torch.Tensor:
    """The released code's loss, as described: per-head loop, per-query squared band penalty, summed."""
    n_layer, n_head = len(attentions), attentions[0].shape[1]
    e_max = math.log(attentions[0].shape[-1])
    total = 0.0
    for attn in attentions:  # [B, H, T, T]
        row_entropy = -torch.nansum(attn * torch.log(attn + 1e-9), dim=-1)  # [B, H, T]
        layer_total = 0.0
        for head in range(n_head):
            dev = row_entropy[:, head, :] - theta_per_head[head] * e_max
            pen = torch.where(dev.abs() > tolerance * e_max, dev.square(), torch.zeros_like(dev))
            layer_total = layer_total + pen.sum()
        total = total + layer_total / n_head
    return total / n_layer


def build(mode: str, config, weights, coeff: float, tolerance: float):
    import lightning.pytorch as pl
    from transformers import GPT2LMHeadModel

    class UserLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            attn = "eager" if mode in ("eager", "reference") else "sdpa"
            self.model = GPT2LMHeadModel._from_config(copy.deepcopy(config), attn_implementation=attn)
            self.model.load_state_dict(weights)
            if mode == "reference":
                self.reg_threshold_weights = torch.nn.Parameter(torch.full((config.n_head,), 0.5))

        def training_step(self, batch, batch_idx):
            if mode != "reference":
                return self.model(**batch).loss
            out = self.model(**batch, output_attentions=True)
            return out.loss + coeff * reference_penalty(out.attentions, self.reg_threshold_weights, tolerance)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    return UserLM()


def run_mode(
    mode, config, weights, batches, steps, warmup, coeff, tolerance
) -> tuple[list[tuple[float, float]], float]:
    """One short fit: the timed steps' (wall, CPU) seconds and the fit's peak RSS growth in bytes (model, optimizer
    state, activations and gradients; NaN where the peak counter cannot be reset)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from entropic.callbacks import AttentionEntropyMonitor, EntropyRegularization
    from entropic.functional import DEFAULT_THRESHOLD

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[tuple[float, float]] = []  # (wall, process CPU) seconds

        def on_train_batch_start(self, *args) -> None:
            self._t0 = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, *args) -> None:
            self.times.append((time.perf_counter() - self._t0[0], time.process_time() - self._t0[1]))

    timer = Timer()
    callbacks = [timer]
    if mode == "callbacks":
        # Timer first, so the monitor's per-batch work (and its log-cadence all-reduce) is inside the measurement.
        callbacks = [
            AttentionEntropyMonitor(write_figures=False),
            EntropyRegularization(
                coeff, tolerance, threshold_init=DEFAULT_THRESHOLD, start_when_entropy_below=None, warmup_steps=0
            ),  # the term from the first step, at full strength: the cost of applying it
            timer,
        ]
    rss_before = rss_status()["VmRSS"]
    peak_reset = reset_peak_rss()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps + warmup, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50, callbacks=callbacks,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(build(mode, config, weights, coeff, tolerance), loader)
    peak = rss_status()["VmHWM"] - rss_before if peak_reset else float("nan")
    return timer.times[warmup:], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512, 1024], help="one or more T, in one run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if any(os.environ.get(k) != v for k, v in PINNED_MALLOC_ENV.items()):
        # glibc reads these at start-up only: restart with them, so peak RSS follows live tensors.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_MALLOC_ENV})
    for seq in args.seq:
        measure(argparse.Namespace(**{**vars(args), "seq": seq}))


def measure(args: argparse.Namespace) -> None:
    """All modes at one sequence length ``args.seq``; writes its JSON and CSV."""

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config = GPT2Config(
        n_layer=args.layers, n_head=args.heads, n_embd=args.embd, vocab_size=args.vocab, n_positions=args.seq,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    weights = GPT2LMHeadModel(copy.deepcopy(config)).state_dict()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + args.warmup):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        batches.append({"input_ids": ids, "labels": ids})

    times: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    peaks: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]  # rotate the order between rounds
        for mode in order:
            mode_times, peak = run_mode(mode, config, weights, batches, args.steps, args.warmup, 1e-5, 0.2)
            times[mode] += mode_times
            peaks[mode].append(peak)
            wall = statistics.median(w for w, _ in times[mode])
            print(f"round {r} {mode:9s} median wall {1e3 * wall:8.1f} ms", flush=True)

    med = {m: statistics.median(w for w, _ in t) * 1e3 for m, t in times.items()}
    cpu = {m: statistics.median(c for _, c in t) * 1e3 for m, t in times.items()}

    def ratios_of(v: dict[str, float]) -> dict[str, float]:
        return {
            "callbacks/plain": v["callbacks"] / v["plain"],
            "reference/plain": v["reference"] / v["plain"],
            "reference/eager": v["reference"] / v["eager"],
            "callbacks/reference": v["callbacks"] / v["reference"],
        }

    ratios = ratios_of(med)
    peak_mem = {m: statistics.median(p) for m, p in peaks.items()}
    now = dt.datetime.now()
    from entropic.ops import entropic_attention  # noqa: F401  (records which backend version ran)

    result = {
        "date": now.isoformat(timespec="seconds"),
        "hardware": {
            "machine": platform.machine(),
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "config": vars(args) | {"out": str(args.out), "loss_coeff": 1e-5, "tolerance": 0.2},
        "median_step_ms": med,
        "min_step_ms": {m: min(w for w, _ in t) * 1e3 for m, t in times.items()},
        "median_step_cpu_ms": cpu,
        "ratios_cpu": ratios_of(cpu),
        "n_steps": {m: len(t) for m, t in times.items()},
        "ratios": ratios,
        "peak_rss_growth_bytes": peak_mem,
        "ratios_peak_memory": ratios_of(peak_mem),
        "malloc_pinned": all(os.environ.get(k) == v for k, v in PINNED_MALLOC_ENV.items()),
        "target": "callbacks/plain <= 1.05 (CPU time) and <= 1.10 (peak memory)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"callback_overhead_{now:%Y%m%d}_{platform.node() or 'host'}_T{args.seq}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["date", "mode", "median_step_ms", "min_step_ms", "ratio_to_plain", "median_cpu_ms", "cpu_ratio_to_plain",
             "L", "H", "d", "T", "B", "load_avg_1m"]
        )  # fmt: skip
        for m in MODES:
            writer.writerow(
                [result["date"], m, f"{med[m]:.2f}", f"{result['min_step_ms'][m]:.2f}", f"{med[m] / med['plain']:.3f}",
                 f"{cpu[m]:.2f}", f"{cpu[m] / cpu['plain']:.3f}", args.layers, args.heads, args.embd, args.seq,
                 args.batch, f"{result['hardware']['load_avg_1m_at_end']:.2f}"]
            )  # fmt: skip
    summary = {k: result[k] for k in ("median_step_ms", "ratios", "ratios_cpu", "ratios_peak_memory")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Attention with per-row entropy: our op vs torch SDPA (no entropy) vs the reference approach.

Compares, for each sequence length T, forward and forward+backward:

* ``ours``: :func:`entropic.ops.entropic_attention` (backend "auto": on CPU the fused C++ kernel of
  :mod:`entropic.ops.fused_cpu` for fp32, else the PyTorch paths; the Triton kernels on CUDA), returning out and
  row entropy; backward through both.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (no entropy; on CUDA forced to the flash
  backend): the speed/memory floor.
* ``reference``: what the paper's authors do: eager attention with materialized probabilities, and the
  entropy computed from them as ``-nansum(p * log(p + 1e-9))`` (their ``entropy_regularization.py``).

Memory. Every (impl, mode, T) runs in a fresh subprocess.
* CUDA: ``torch.cuda.max_memory_allocated()`` growth over the inputs (exact allocator statistics).
* CPU: torch has no CPU allocator statistics, so we measure the process's peak resident set growth:
  the worker resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``) after a
  warm-up call, runs the case once and reads ``VmHWM - VmRSS(before)`` from ``/proc/self/status``.
  glibc's adaptive mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_=65536``) so every tensor above
  64 KiB is mmap-ed and unmapped when freed, hence RSS follows live tensor bytes instead of a malloc
  arena's high-water mark. This counts temporaries inside ops and gradients, which tensor-level
  accounting of saved activations would miss.
* Both devices: ``saved_bytes``, the unique storages that autograd saves for backward (via
  ``torch.autograd.graph.saved_tensors_hooks``) — exact and deterministic, but it excludes temporaries.

Time: median (and min) wall time over ``--repeats`` runs after one warm-up, synchronized on CUDA.

Writes ``<out>/<date>-<device>.csv``, ``.json`` (hardware, torch version, date, rows, acceptance
ratios) and ``.png`` (ratios vs T). Example (the committed CPU run)::

    OMP_NUM_THREADS=1 python benchmarks/attention_benchmark.py --device cpu --T 128 256 512 1024 2048 4096 \\
        --B 1 --H 4 --D 64 --dtype float32 --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hardware import PINNED_MALLOC_ENV, cpu_model, reset_peak_rss, rss_status  # benchmarks/, the script's own directory

IMPLS = ("ours", "sdpa", "reference")
MODES = ("fwd", "fwd_bwd")


# ---------------------------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from entropic.ops import entropic_attention, resolve_backend

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    b, h, t, d = args.B, args.H, args.T_one, args.D
    causal = not args.non_causal
    scale = 1.0 / math.sqrt(d)
    grad = args.mode == "fwd_bwd"
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))

    def run_ours():
        out, ent = entropic_attention(q, k, v, causal=causal, scale=scale)
        return out.float().sum() + ent.sum()

    def run_sdpa():
        if device.type == "cuda":  # the acceptance target is SDPA's flash backend specifically
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).float().sum()
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).float().sum()

    def run_reference():
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
            s = s.masked_fill(mask, float("-inf"))
        p = torch.softmax(s.float(), dim=-1).to(dtype)
        out = torch.matmul(p, v)
        ent = -torch.nansum(p.float() * torch.log(p.float() + 1e-9), dim=-1)
        return out.float().sum() + ent.sum()

    fn = {"ours": run_ours, "sdpa": run_sdpa, "reference": run_reference}[args.impl]

    def step():
        if grad:
            for x in (q, k, v):
                x.grad = None
            fn().backward()
        else:
            with torch.no_grad():
                fn()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    sync()
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
        mem_method = "cuda.max_memory_allocated"
    else:
        base = rss_status()["VmRSS"]
        ok = reset_peak_rss()
        step()
        peak = rss_status()["VmHWM"] - base
        mem_method = "peak RSS growth (clear_refs+VmHWM)" if ok else "peak RSS growth (VmHWM not reset!)"

    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)

    saved = 0
    if grad:
        storages: dict[int, int] = {}

        def pack(x):
            st = x.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            return x

        for x in (q, k, v):
            x.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn()
        loss.backward()
        saved = sum(storages.values())

    backend = resolve_backend("auto", device) if args.impl == "ours" else ""
    return {
        "impl": args.impl,
        "backend": backend,
        "mode": args.mode,
        "T": t,
        "B": b,
        "H": h,
        "D": d,
        "dtype": args.dtype,
        "device": args.device,
        "causal": causal,
        "time_ms_median": statistics.median(times),
        "time_ms_min": min(times),
        "peak_mem_bytes": int(peak),
        "mem_method": mem_method,
        "saved_bytes": int(saved),
    }


# ---------------------------------------------------------------------------------------------- driver


def _hardware(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    info["cpu_model"] = cpu_model()
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def _reference_bytes_estimate(b, h, t, dtype_bytes) -> int:
    # logits, masked logits, probs, log-probs, product, grads of them: ~8 [B, H, T, T] tensors
    return 8 * b * h * t * t * max(dtype_bytes, 4)


def _run_case(args, impl, mode, t) -> dict | None:
    env = dict(os.environ, **PINNED_MALLOC_ENV)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--impl",
        impl,
        "--mode",
        mode,
        "--T-one",
        str(t),
        "--B",
        str(args.B),
        "--H",
        str(args.H),
        "--D",
        str(args.D),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
    ] + (["--non-causal"] if args.non_causal else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout)
    if proc.returncode != 0:
        print(f"  {impl} {mode} T={t}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("fwd", "--"), ("fwd_bwd", "-")):
        by = {(r["impl"], r["T"]): r for r in rows if r["mode"] == mode}
        ts = sorted({r["T"] for r in rows if r["mode"] == mode and ("ours", r["T"]) in by})
        for metric, ax in (("time_ms_median", axes[0]), ("peak_mem_bytes", axes[1])):
            for other, color in (("reference", "C3"), ("sdpa", "C0")):
                xs = [t for t in ts if (other, t) in by and by[("ours", t)][metric] > 0]
                ys = [by[(other, t)][metric] / by[("ours", t)][metric] for t in xs]
                if xs:
                    ax.plot(xs, ys, style, marker="o", color=color, label=f"{other} / ours ({mode})")
    for ax, name in ((axes[0], "time"), (axes[1], "peak memory")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(f"{name} ratio (>1: ours better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].axhline(4.0, color="C2", lw=0.8, ls=":")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--max-mem-gb", type=float, default=None, help="skip reference cases estimated above this")
    p.add_argument("--case-timeout", type=float, default=600)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default="", help="appended to the output file names")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--T-one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    if args.max_mem_gb is None:
        args.max_mem_gb = _default_mem_budget_gb(args.device)
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[args.dtype]
    rows: list[dict] = []
    start = time.time()
    for t in args.T:
        for mode in args.modes:
            for impl in args.impls:
                if (
                    impl == "reference"
                    and _reference_bytes_estimate(args.B, args.H, t, dtype_bytes) > args.max_mem_gb * 2**30
                ):
                    print(f"  skip reference {mode} T={t}: estimated memory above {args.max_mem_gb:.1f} GiB")
                    continue
                row = _run_case(args, impl, mode, t)
                if row is None:
                    continue
                rows.append(row)
                print(
                    f"T={t:5d} {mode:7s} {impl:9s} {row['time_ms_median']:10.2f} ms  "
                    f"peak {row['peak_mem_bytes'] / 2**20:9.1f} MiB  saved {row['saved_bytes'] / 2**20:8.1f} MiB",
                    flush=True,
                )

    # ratios and acceptance
    summary = []
    by = {(r["impl"], r["mode"], r["T"]): r for r in rows}
    for (impl, mode, t), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if impl != "ours":
            continue
        entry = {"mode": mode, "T": t}
        for other in ("sdpa", "reference"):
            o = by.get((other, mode, t))
            if o:
                entry[f"time_ours_over_{other}"] = r["time_ms_median"] / o["time_ms_median"]
                if o["peak_mem_bytes"] > 0:
                    entry[f"peak_mem_ours_over_{other}"] = r["peak_mem_bytes"] / o["peak_mem_bytes"]
                if o["saved_bytes"] > 0:
                    entry[f"saved_ours_over_{other}"] = r["saved_bytes"] / o["saved_bytes"]
        summary.append(entry)

    print("\nratios (ours / other; < 1 means ours uses less):")
    for e in summary:
        parts = [f"{k}={v:.3f}" for k, v in e.items() if k not in ("mode", "T")]
        print(f"  {e['mode']:7s} T={e['T']:5d}  " + "  ".join(parts))

    acceptance = None
    ref4k = by.get(("reference", "fwd_bwd", 4096))
    ours4k = by.get(("ours", "fwd_bwd", 4096))
    if ref4k and ours4k and ref4k["peak_mem_bytes"] > 0:
        ratio = ours4k["peak_mem_bytes"] / ref4k["peak_mem_bytes"]
        acceptance = {
            "criterion": "ours fwd+bwd with entropy at T=4096 uses < 1/4 of the reference approach's peak memory",
            "config": {k: ours4k[k] for k in ("B", "H", "D", "dtype", "device", "causal")},
            "ours_peak_mem_bytes": ours4k["peak_mem_bytes"],
            "reference_peak_mem_bytes": ref4k["peak_mem_bytes"],
            "ratio": ratio,
            "passed": ratio < 0.25,
        }
        print(
            f"\nACCEPTANCE T=4096 fwd+bwd peak memory ours/reference = {ratio:.4f} "
            f"({ours4k['peak_mem_bytes'] / 2**20:.1f} MiB vs {ref4k['peak_mem_bytes'] / 2**20:.1f} MiB): "
            f"{'PASS' if ratio < 0.25 else 'FAIL'} (< 0.25 required)"
        )

    now = dt.datetime.now()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{now:%Y-%m-%d}-{args.device.split(':')[0]}{('-' + args.tag) if args.tag else ''}"
    meta = {
        "date": now.isoformat(timespec="seconds"),
        "hardware": _hardware(args.device),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "impl", "mode", "T_one")},
        "wall_s": round(time.time() - start, 1),
        "memory_method": rows[0]["mem_method"] if rows else None,
    }
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["impl"])
        writer.writeheader()
        writer.writerows(rows)
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump({**meta, "rows": rows, "ratios": summary, "acceptance": acceptance}, f, indent=2)
    title = (
        f"entropic attention vs SDPA / reference ({args.device}, {args.dtype}, B={args.B} H={args.H} D={args.D}, "
        f"{'non-causal' if args.non_causal else 'causal'}; torch {meta['hardware']['torch']}; {now:%Y-%m-%d})"
    )
    if rows:
        _plot(rows, out_dir / f"{stem}.png", title)
    print(f"\nwrote {out_dir / stem}.{{csv,json,png}}")
    return 0


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _default_mem_budget_gb(device: str) -> float:
    try:
        if device.startswith("cuda"):
            import torch

            return 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30
        with open("/proc/meminfo") as f:
            avail = int(next(line.split()[1] for line in f if line.startswith("MemAvailable")))
        return 0.6 * avail / 2**20
    except (OSError, StopIteration, ImportError):
        return 8.0


if __name__ == "__main__":
    sys.exit(main())

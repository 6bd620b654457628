"""pi_eval end to end at the CPU recipes' shape: wall time and each party's peak memory per preset (issue #12).

Runs ``python -m pi_eval bench`` once per preset (default SM+LN+G, SM+R, SM+ScFuFFN) at L=4, H=4, d=128, T=128,
vocab 8192 on ``n8192-l2`` with ``--transport tcp`` (client and server in separate processes, one thread each), or
once on a trained model (``--checkpoint RUN_DIR``), and records per run: the process's wall time, the report's online
wall time, each party's peak RSS (``VmHWM``, from the report), bytes, round trips, setup bytes against TenSEAL's
power-of-two keys, logit error and top-1 agreement, plus the date, CPU model, core count and load average before
and after.  The acceptance of #12: each run under 10 minutes and under 8 GB in the largest process, on 2 cores.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_recipe.py --presets SM+ScFuFFN
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_recipe.py --checkpoint runs/default   # a fit run dir

Writes ``<out>/pi_eval_recipe_<date>-cpu[-checkpoint].json`` and ``.md`` (atomically) after every run, ``"complete": true`` at the
end, so a stopped benchmark keeps the runs it finished.  CPU-heavy: do not run it next to other
jobs unless the load is what you want to measure (the load average is recorded either way).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hardware import cpu_model  # noqa: E402

from entropic.io import atomic_write_json, atomic_write_text  # noqa: E402

RECIPE = {"n_layer": 4, "d_model": 128, "n_head": 4, "seq_len": 128, "vocab_size": 8192}
PRESETS = ("SM+LN+G", "SM+R", "SM+ScFuFFN")
LIMIT_S, LIMIT_BYTES = 600.0, 8e9  # the acceptance of #12, per run


def bench_command(out: Path, *, preset: str | None, checkpoint: str | None, shape: dict, params: str) -> list[str]:
    """The ``python -m pi_eval bench`` command line of one run (tcp transport, one thread per party)."""
    cmd = [sys.executable, "-m", "pi_eval", "bench", "--transport", "tcp", "--threads", "1", "--params", params]
    cmd += ["--seq-len", str(shape["seq_len"]), "--out", str(out)]
    if checkpoint:
        return [*cmd, "--checkpoint", checkpoint]
    return [
        *cmd,
        "--preset",
        preset,
        "--n-layer",
        str(shape["n_layer"]),
        "--d-model",
        str(shape["d_model"]),
        "--n-head",
        str(shape["n_head"]),
        "--vocab-size",
        str(shape["vocab_size"]),
        "--n-positions",
        str(shape["seq_len"]),
    ]


def run_one(cmd: list[str], out: Path, timeout_s: float) -> dict:
    """Runs one bench (its progress lines go to this process's stderr) and reads its report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout_s, stdout=subprocess.PIPE, text=True)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.perf_counter() - t0
    row = {"command": " ".join(cmd[1:]), "returncode": rc, "wall_s": wall, "timed_out": rc is None}
    row["load_before"], row["load_after"] = list(load_before), list(os.getloadavg())
    report = out / "report.json"
    if rc != 0 or not report.is_file():
        return row
    rep = json.loads(report.read_text())
    peak = rep["peak_rss"]
    row.update(
        architecture=rep["meta"].get("architecture"),
        online_wall_s=rep["online_wall_s"],
        client_peak_rss_bytes=peak["client_bytes"],
        server_peak_rss_bytes=peak["server_bytes"],
        bytes_total=rep["bytes_total"],
        round_trips=rep["round_trips"],
        setup_bytes=rep["setup_bytes"],
        galois_keys=rep["setup"]["galois_keys"],
        power_of_two_context_bytes=rep["setup"]["power_of_two_context_bytes"],
        max_abs_logit_error=rep["max_abs_logit_error"],
        top1_agreement=rep["top1_agreement"],
    )
    largest = max(peak["client_bytes"], peak["server_bytes"] or 0)
    row["within_acceptance"] = wall < LIMIT_S and largest < LIMIT_BYTES
    return row


def markdown(result: dict) -> str:
    lines = [
        f"# pi_eval at the recipe shape ({result['date']})",
        "",
        f"Hardware: {result['hardware']}, {result['cpus']} CPUs visible ({result['machine']}); one thread per party, "
        f"`--transport tcp`, {result['params']}; shape {result['shape']}. Load average (1, 5, 15 min) per run.",
        "",
        "| model | wall s | online s | client RSS GB | server RSS GB | online MB | RTs | setup MB (power-of-two MB) | "
        "max err | top-1 | load before -> after | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if not result.get("complete", True):
        lines.insert(
            2, "**Incomplete**: the benchmark is running or was stopped; the rows below are the runs finished.\n"
        )
    for r in result["runs"]:
        if "online_wall_s" not in r:
            lines.append(f"| {r['label']} | {r['wall_s']:.0f} | failed (rc {r['returncode']}) | | | | | | | | | no |")
            continue
        lines.append(
            f"| {r['label']} ({r['architecture']}) | {r['wall_s']:.0f} | {r['online_wall_s']:.0f} | "
            f"{r['client_peak_rss_bytes'] / 1e9:.2f} | {r['server_peak_rss_bytes'] / 1e9:.2f} | "
            f"{r['bytes_total'] / 1e6:.0f} | {r['round_trips']} | {r['setup_bytes'] / 1e6:.1f} "
            f"({r['power_of_two_context_bytes'] / 1e6:.1f}) | {r['max_abs_logit_error']:.1e} | "
            f"{r['top1_agreement']:.2f} | {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} | "
            f"{'yes' if r['within_acceptance'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (random weights)")
    parser.add_argument("--checkpoint", default=None, help="a trained model instead (fit run dir, last.ckpt, ...)")
    parser.add_argument("--shape", default=None, help='override as JSON, e.g. \'{"n_layer": 1, "d_model": 16}\'')
    parser.add_argument("--params", default="n8192-l2")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="stop a run after this long")
    parser.add_argument("--machine", default="2-core x86 VM, no GPU", help="free text: the machine and its load")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    shape = {**RECIPE, **(json.loads(args.shape) if args.shape else {})}
    jobs = [(args.checkpoint, None, args.checkpoint)] if args.checkpoint else []
    jobs += [] if args.checkpoint else [(p, p, None) for p in args.presets.split(",")]
    date = dt.date.today().isoformat()
    result = {
        "date": date,
        "hardware": cpu_model(),
        "cpus": os.cpu_count(),
        "machine": args.machine,
        "params": args.params,
        "shape": shape,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pi_eval_recipe.py " + " ".join(argv or sys.argv[1:]),
        "complete": False,  # rewritten after every run, so a stopped benchmark keeps the runs it finished
        "runs": [],
    }
    out = Path(args.out)
    stem = f"pi_eval_recipe_{date}-cpu" + ("-checkpoint" if args.checkpoint else "")

    def write() -> None:
        atomic_write_json(out / f"{stem}.json", result)
        atomic_write_text(out / f"{stem}.md", markdown(result))

    with tempfile.TemporaryDirectory(prefix="pi_eval_recipe_") as tmp:
        for i, (label, preset, ckpt) in enumerate(jobs):
            run_dir = Path(tmp) / str(i)
            cmd = bench_command(run_dir, preset=preset, checkpoint=ckpt, shape=shape, params=args.params)
            print(f"{label}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            row = {"label": label, **run_one(cmd, run_dir, args.timeout_s)}
            result["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            write()
    result["complete"] = True
    write()
    print(markdown(result))
    return 0 if all(r.get("within_acceptance") for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

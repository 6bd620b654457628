"""pi_eval under real encryption: slot use, harness overhead, bytes and round trips per architecture and shape.

For each (preset, d, T) it runs the in-process protocol once (TenSEAL CKKS, default parameters, 1 thread) and
records: slot use of the sent and of the ``mm``-input ciphertexts with their bounds (the best any packing could
do at that shape), the harness overhead (online wall time / time inside TenSEAL primitives; target <= 1.3),
online bytes, round trips and the logit error. The alternative to the harness's packing is the bound itself.

    OMP_NUM_THREADS=1 python benchmarks/pi_eval_packing.py

Writes ``<out>/pi_eval_packing_<date>-cpu.json`` with the hardware and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hardware import cpu_model

from entropic.io import atomic_write_json
from pi_eval.extract import build_model, plan_from_model, torch_logits
from pi_eval.protocol import run_protocol
from pi_eval.report import build_report

# (preset, d, T): the tests' shapes for every architecture, and one that fills whole ciphertexts.
CASES = [(p, 32, 16) for p in ("SM+LN+G", "SM+R", "SM+ScFuFFN")] + [("SM+R", 32, 128), ("SM+ScFuFFN", 64, 64)]
FIELDS = (
    "slot_use",
    "slot_use_bound",
    "slot_use_mm",
    "slot_use_mm_bound",
    "slot_use_limit",
    "harness_overhead",
    "bytes_total",
    "round_trips",
    "max_abs_logit_error",
    "online_wall_s",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    rows = []
    for preset, d, seq_len in CASES:
        model = build_model(preset, n_layer=1, d_model=d, n_head=2, vocab_size=64, n_positions=seq_len, init_std=0.2)
        ids = np.random.default_rng(0).integers(0, 64, size=seq_len)
        start = time.perf_counter()
        result = run_protocol(plan_from_model(model), ids, threads=1)
        report = build_report(result, torch_logits(model, ids))
        row = {"preset": preset, "d": d, "T": seq_len, **{k: report[k] for k in FIELDS}}
        row["total_s"] = time.perf_counter() - start
        rows.append(row)
        print(
            f"{preset:11s} d={d:3d} T={seq_len:4d}  slot use {row['slot_use']:.2f} (bound {row['slot_use_bound']:.2f}), "
            f"mm {row['slot_use_mm']:.2f} (bound {row['slot_use_mm_bound']:.2f})  overhead "
            f"{row['harness_overhead']:.3f}  {row['bytes_total'] / 1e6:.2f} MB  {row['round_trips']} round trips",
            flush=True,
        )
    date = dt.date.today().isoformat()
    path = Path(args.out) / f"pi_eval_packing_{date}-cpu.json"
    atomic_write_json(path, {"date": date, "hardware": cpu_model(), "threads": 1, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

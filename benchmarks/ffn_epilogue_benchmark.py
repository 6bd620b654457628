"""Does a fused FFN-epilogue kernel pay? Measures what the epilogue of the scaled FFN costs next to its matmuls.

The scaled models compute ``beta * x + act(x @ W_in + b_in) @ W_out / alpha`` (SM+ScFFN; ``act`` is the identity
in the softmax-only presets) or ``beta * x + (x @ W + b) / alpha`` (SM+ScFuFFN). A Triton kernel could fold the
bias, activation, ``1/alpha`` scale and ``beta`` residual into the matmul's epilogue. That can save at most the
time those elementwise ops take, so this script times, forward and forward+backward:

* ``eager``: the model's own modules (``EntropicMLP`` + ``FFNScaling``), what runs today;
* ``matmul_only``: the same linears with no bias, activation, scale or residual: the floor a perfect fused
  epilogue could reach;
* ``compiled``: ``torch.compile`` of ``eager``, the alternative a user would pick (it fuses the elementwise
  ops into one kernel, though not into the matmul). Skipped with ``--no-compile`` or when compiling fails.

It reports ``epilogue_share = 1 - matmul_only / eager`` (the most a fused kernel could save) and
``compiled / eager``. Decision rule: write the kernel only if, on the GPU, the share left after
``torch.compile`` (``1 - matmul_only / compiled``) exceeds 10% at the GPT-2-small shape.

    OMP_NUM_THREADS=1 python benchmarks/ffn_epilogue_benchmark.py --device cpu --tokens 2048 --d 256
    python benchmarks/ffn_epilogue_benchmark.py --device cuda --dtype bfloat16          # GPT-2-small shape

Writes ``<out>/ffn_epilogue_<date>-<device>.json`` (hardware, versions, rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hardware import cpu_model

from entropic.io import atomic_write_json
from entropic.models import EntropicConfig
from entropic.models.modeling import EntropicMLP
from entropic.models.stabilizers import FFNScaling


class ScaledFFN(nn.Module):
    """The scaled FFN branch of one block as the models run it: x [N, d] -> beta * x + FFN(x) / alpha."""

    def __init__(self, config: EntropicConfig) -> None:
        super().__init__()
        self.mlp = EntropicMLP(config)
        self.scale = FFNScaling(1.5, 0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(x, self.mlp(x))


class MatmulOnly(nn.Module):
    """The same matmuls without bias, activation, scale or residual: x [N, d] -> [N, d]."""

    def __init__(self, ffn: ScaledFFN) -> None:
        super().__init__()
        mlp = ffn.mlp
        self.weights = [mlp.c_fused.weight] if hasattr(mlp, "c_fused") else [mlp.c_fc.weight, mlp.c_proj.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for weight in self.weights:
            x = torch.matmul(x, weight.t())
        return x


def _time(fn, x: torch.Tensor, *, backward: bool, repeats: int, device: torch.device) -> float:
    def step():
        if backward:
            x.grad = None
            fn(x).float().sum().backward()
        else:
            with torch.no_grad():
                fn(x)

    for _ in range(2):  # warm-up (and compilation)
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=128 * 128, help="rows N = batch x context (paper: 128 x 128)")
    parser.add_argument("--d", type=int, default=768, help="model width (GPT-2 small: 768)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--presets", nargs="+", default=["SM+ScFFN", "SM+ScFuFFN"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.d < 1 or args.repeats < 1:
        parser.error(f"--tokens, --d and --repeats must be >= 1; got {args.tokens}, {args.d}, {args.repeats}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    for preset in args.presets:
        config = EntropicConfig.from_preset(preset, n_layer=1, n_head=max(1, args.d // 64), n_embd=args.d)
        ffn = ScaledFFN(config).to(device=device, dtype=dtype)
        variants = {"eager": ffn, "matmul_only": MatmulOnly(ffn)}
        if not args.no_compile:
            variants["compiled"] = torch.compile(ffn)
        for backward in (False, True):
            x = torch.randn(args.tokens, args.d, device=device, dtype=dtype, requires_grad=backward)
            timings = {}
            for name, module in variants.items():
                try:
                    timings[name] = _time(module, x, backward=backward, repeats=args.repeats, device=device)
                except Exception as error:  # torch.compile needs a working compiler toolchain
                    if name != "compiled":
                        raise
                    print(f"{preset}: torch.compile failed, skipped ({type(error).__name__}: {error})"[:300])
            row = {"preset": preset, "mode": "fwd_bwd" if backward else "fwd", "seconds": timings}
            row["epilogue_share"] = 1 - timings["matmul_only"] / timings["eager"]
            if "compiled" in timings:
                row["compiled_over_eager"] = timings["compiled"] / timings["eager"]
                row["epilogue_share_after_compile"] = 1 - timings["matmul_only"] / timings["compiled"]
            rows.append(row)
            extra = (
                f"  compiled/eager {row['compiled_over_eager']:.3f}  share after compile "
                f"{row['epilogue_share_after_compile']:.1%}"
                if "compiled_over_eager" in row
                else ""
            )
            print(f"{preset:12s} {row['mode']:8s} epilogue share {row['epilogue_share']:.1%}{extra}")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    date = dt.date.today().isoformat()
    result = {
        "date": date,
        "hardware": hardware,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"tokens": args.tokens, "d": args.d, "dtype": args.dtype},
        "rows": rows,
    }
    path = Path(args.out) / f"ffn_epilogue_{date}-{device.type}.json"
    atomic_write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

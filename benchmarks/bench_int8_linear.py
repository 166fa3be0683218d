"""One QAT linear forward at Llama shapes: the dequantized product against the int8 ones.

    python -m benchmarks.bench_int8_linear                  # GPU: 8192 tokens x (4096 -> 4096, 4096 -> 11008), bf16
    TRITON_INTERPRET=1 python -m benchmarks.bench_int8_linear --preset tiny --device cpu   # smoke run

Rows per shape (forward only, bf16 autocast on CUDA; the Triton fake-quant kernels in every
quantized row): ``bf16`` (``F.linear``, the baseline), ``quest-dequant`` (W4A4: both operands
fake-quantized, ``F.linear`` of them), ``quest-int8`` (the codes through ``torch._int_mm`` and the
torch epilogue) and ``quest-int8-fused`` (the Triton int8 GEMM, epilogue fused). Ratios are time
ratios to the ``bf16`` row of the same shape. Goal (issue 20, a benchmark, not a test): the int8
forward <= 0.6 x bf16 on an H200.
"""

from __future__ import annotations

import sys

import torch

from . import common

SHAPES = {"tiny": ((64, 128, 128),), "default": ((8192, 4096, 4096), (8192, 4096, 11008))}
METHODS = ("bf16", "quest-dequant", "quest-int8", "quest-int8-fused")
GOAL = 0.6


def _layer(method: str, k: int, n: int, device):
    from cage import QATLinear, QuantConfig

    torch.manual_seed(0)
    if method == "bf16":
        return torch.nn.Linear(k, n, device=device)
    q = QuantConfig(4)
    matmul = {"quest-dequant": "dequant", "quest-int8": "int8", "quest-int8-fused": "int8-fused"}[method]
    return QATLinear(k, n, True, weight_quant=q, act_quant=q, backend="triton", matmul=matmul, device=device)


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], "default", SHAPES)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {METHODS}")
    args = p.parse_args(argv)
    common.apply_threads(args)
    device = common.pick_device(args.device)
    common.ensure_interpreter_for(device)
    methods = common.comma_choices(p, args.methods, METHODS, "method")
    warmup_ms, rep_ms = common.bench_times(args, device)
    env = common.environment(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    rows = []
    for m, k, n in SHAPES[args.preset]:
        x = torch.randn(m, k, device=device)
        base = None
        for method in methods:
            row = {"shape": f"{m} x {k} -> {n}", "method": method}
            why = common.over_budget()
            if why:
                row["status"] = why
                rows.append(row)
                continue
            try:
                layer = _layer(method, k, n, device)

                def forward(layer=layer):
                    with torch.no_grad(), autocast:
                        return layer(x)

                t = common.bench(forward, device, warmup_ms, rep_ms)
                row.update(ms=t.median_ms, tflops=2 * m * k * n / (t.median_ms * 1e-3) / 1e12, status="ok")
                if method == "bf16":
                    base = t.median_ms
                if base:
                    row["t/bf16"] = t.median_ms / base
            except Exception as err:  # noqa: BLE001 - a failing row must not hide the others
                row["status"] = "error: " + common.short_error(err)
            rows.append(row)
            print(f"  {row['shape']} {method}: {row.get('ms', float('nan')):.4g} ms {row['status']}", file=sys.stderr)
    goals = [{"target": f"{r['method']} forward, {r['shape']} <= {GOAL} x bf16", "value": r.get("t/bf16"),
              "status": ("not measured (no GPU in this run)" if not env["gpu_result"] else
                         "met" if r.get("t/bf16", 9e9) <= GOAL else "MISSED")}
             for r in rows if r["method"].startswith("quest-int8") and r["status"] == "ok"]
    sections = [
        {"title": "QAT linear forward (W4A4, Hadamard 128, bf16 autocast), ratios to F.linear in bf16",
         "rows": rows, "columns": [("shape", "tokens x in -> out"), ("method", "method"), ("ms", "ms"),
                                   ("tflops", "TFLOP/s (2MKN)"), ("t/bf16", "t / bf16"), ("status", "status")]},
        {"title": "Targets (issue 20)", "rows": goals,
         "columns": [("target", "target"), ("value", "value"), ("status", "status")]},
    ]
    return common.finish("int8_linear", env, sections, args, rows, {"preset": args.preset})


if __name__ == "__main__":
    main()

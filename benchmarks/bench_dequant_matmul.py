"""The converted layer's matmul: the fused dequantize-and-multiply kernel against the torch path
and a dense bf16 linear, in one run.

    python -m benchmarks.bench_dequant_matmul            # GPU: M in {1, 16, 2048} x Llama-7B K x N, W4, bf16 x
    python -m benchmarks.bench_dequant_matmul --bits 3   # another width

GPU only: without CUDA it prints that it skipped and exits with status 0 (the interpreter's time
would say nothing about the kernel; tests/test_kernels_dequant_matmul.py checks its results).

Rows per case (one weight, the same x, one device, one run):

- ``fused``: ``cage_kernels.packed_matmul``, the weight read as packed codes + a per-row fp32 step;
- ``dequant+linear``: what ``QuantizedLinear``'s torch path does: unpack the codes,
  ``dequantize_codes`` to a bf16 weight, ``F.linear``;
- ``bf16-linear``: ``F.linear`` with a dense bf16 weight of the same shape (the unquantized layer).

Counted bytes (SPEC 4), the least traffic of each row's job: read x, write y (bf16), plus the
weight as the row's job holds it: packed codes + fp32 step for ``fused`` and ``dequant+linear``
(one count: their GB/s ratio is a time ratio; the torch path's writing and re-reading of the
rebuilt weight is its cost, not counted work), ``2 N K`` bytes for ``bf16-linear``. Weights and
inputs rotate through sets larger than 4 x L2; do_bench flushes L2 between calls as well.

Host and kernels apart: ``host ms`` is a call's host part alone (``common.host_time``),
``kernels ms`` the call replayed from a CUDA graph (``do_bench_cudagraph``; ``fused`` and
``bf16-linear``). At M = 1 the kernels take microseconds, so ``ms`` may be the host's time.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn.functional as F

from . import common


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: int  # M: rows of x
    in_features: int  # K
    out_features: int  # N


def _cases(tokens, shapes):
    return [Case(f"{m}x{k} @ {n}x{k}^T", m, k, n) for k, n in shapes for m in tokens]


PRESETS = {
    # Llama-7B attention projections (4096 x 4096) and MLP up/gate (4096 -> 11008)
    "default": _cases((1, 16, 2048), ((4096, 4096), (4096, 11008))),
    "tiny": _cases((1, 16), ((256, 256),)),
}
IMPLS = ("fused", "dequant+linear", "bf16-linear")
X_DTYPE = torch.bfloat16


def matmul_bytes(case: Case, weight_bytes: int) -> int:
    """Read x and the weight (as the job stores it), write y; x and y in bf16."""
    es = torch.empty((), dtype=X_DTYPE).element_size()
    return (case.tokens * case.in_features + case.tokens * case.out_features) * es + weight_bytes


def run_case(case: Case, bits: int, device, warmup_ms, rep_ms, copy_gbps, args=None) -> list[dict]:
    import cage_kernels
    from cage import QuantConfig
    from cage.convert import _code_offset, _grid_step, dequantize_codes
    from cage.packing import pack_codes, packed_row_bytes, unpack_codes

    m, k, n = case.tokens, case.in_features, case.out_features
    config = QuantConfig(bits, block_size=128)  # rotated-domain codes: the layer's shared-rotation case
    offset = _code_offset(config)
    packed_bytes = n * packed_row_bytes(k, bits) + 4 * n  # codes + fp32 step
    dense_bytes = 2 * n * k
    gen = torch.Generator(device=device).manual_seed(0)

    def make(i):
        codes = torch.randint(0, 2**bits, (n, k), device=device, generator=gen, dtype=torch.uint8)
        scale = config.alpha * (0.5 + torch.rand(n, 1, device=device, generator=gen)) * 0.02
        return {
            "x": torch.randn(m, k, device=device, generator=gen).to(X_DTYPE),
            "packed": pack_codes(codes, bits), "scale": scale, "step": _grid_step(scale, config).reshape(-1),
            "weight": dequantize_codes(codes, scale, config, False, X_DTYPE),
        }

    sets = common.Rotating(make, packed_bytes + dense_bytes + 2 * m * k, device)
    calls = {
        "fused": lambda s: cage_kernels.packed_matmul(s["x"], s["packed"], s["step"], offset, bits),
        "dequant+linear": lambda s: F.linear(
            s["x"], dequantize_codes(unpack_codes(s["packed"], bits, k), s["scale"], config, False, X_DTYPE)),
        "bf16-linear": lambda s: F.linear(s["x"], s["weight"]),
    }
    counted = {"fused": matmul_bytes(case, packed_bytes), "dequant+linear": matmul_bytes(case, packed_bytes),
               "bf16-linear": matmul_bytes(case, dense_bytes)}
    outputs = {}
    rows = []
    for impl, call in calls.items():
        row = {"case": case.name, "impl": impl, "bits": bits, "bytes": counted[impl]}
        why = common.over_budget()
        if why:
            row["status"] = why
            rows.append(row)
            continue
        try:
            outputs[impl] = call(sets.sets[0]).float()  # compiles the kernel outside the timed region
            t = common.bench(lambda call=call: call(sets.next()), device, warmup_ms, rep_ms)
            row.update(ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, gbps=common.gbps(counted[impl], t.median_ms),
                       status="ok")
            row["frac_copy"] = row["gbps"] / copy_gbps
            common.split_times(row, lambda call=call: call(sets.next()), device, args, rep_ms,
                               capturable=impl != "dequant+linear", why_not="not attempted (torch unpacking)")
        except Exception as err:  # noqa: BLE001 - report and go on
            row["status"] = "error: " + common.short_error(err)
        rows.append(row)
        print(f"  {case.name} {impl}: {row.get('ms', float('nan')):.4g} ms {row['status']}", file=sys.stderr)
    if "fused" in outputs and "dequant+linear" in outputs:
        # compiled kernel against the torch path on the same inputs (both bf16 out, fp32 sums)
        ref = outputs["dequant+linear"]
        rows[0]["rel_rms_vs_torch"] = ((outputs["fused"] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    times = {r["impl"]: r["ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        for base in ("dequant+linear", "bf16-linear"):
            if r["status"] == "ok" and base in times:
                r[f"t/{base}"] = r["ms"] / times[base]
    del sets, outputs
    common.release(device)
    return rows


COLUMNS = [
    ("case", "case"), ("impl", "impl"), ("bytes", "counted bytes"), ("ms", "ms"), ("gbps", "GB/s"),
    ("frac_copy", "of copy BW"), ("host_ms", "host ms"), ("graph_ms", "kernels ms (graph)"),
    ("t/dequant+linear", "t / dequant+linear"), ("t/bf16-linear", "t / bf16 linear"),
    ("rel_rms_vs_torch", "rel. RMS vs torch path"), ("status", "status"),
]


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], "default", PRESETS)
    p.add_argument("--bits", type=int, default=4, choices=range(1, 9), help="weight bits (default 4)")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    if device.type != "cuda":
        print("bench_dequant_matmul: skipped, it needs a CUDA device (no GPU here; the interpreter's "
              "time says nothing about the kernel)")
        return {"skipped": "no CUDA device"}
    common.apply_threads(args)
    warmup_ms, rep_ms = common.bench_times(args, device)
    env = common.environment(device)
    copy = common.copy_bandwidth(device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    rows = []
    for case in PRESETS[args.preset]:
        rows += run_case(case, args.bits, device, warmup_ms, rep_ms, copy["gbps"], args)
    sections = [{
        "title": f"Converted layer matmul, W{args.bits} codes, bf16 x",
        "text": (
            f"Copy bandwidth measured in this run: {copy['gbps']:.1f} GB/s "
            f"({copy['buffer_bytes'] / 2**20:.0f} MiB device-to-device copy, read + written). "
            "Counted bytes: x + y (bf16) + the weight as stored (packed codes + fp32 step; bf16 for "
            "bf16-linear). Ratios are time ratios (below 1: faster)."
        ),
        "rows": rows,
        "columns": COLUMNS,
    }]
    extra = {"preset": args.preset, "copy": copy, "bits": args.bits}
    return common.finish("dequant_matmul", env, sections, args, rows, extra)


if __name__ == "__main__":
    main()

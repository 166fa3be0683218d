"""Fake quantization forward and backward: Triton kernels against the torch reference.

    python -m benchmarks.bench_fake_quant                # GPU: 8192 tokens x {4096, 8192} bf16 + weights
    TRITON_INTERPRET=1 python -m benchmarks.bench_fake_quant --preset tiny --device cpu   # smoke run

Quantizer: W4, Hadamard block 128, trust mask (QuEST), ``rotate_back=True`` (output in the
input space: two rotations per call, the general case). Rows per case and direction:

- ``triton``: ``cage.ops.fake_quant.TRITON.quantize`` / ``.masked_grad`` (mask bit-packed);
- ``torch-eager``: ``cage.naive.quantize`` / ``cage.naive.masked_grad`` as shipped (bool mask);
- ``torch-compile``: ``torch.compile`` of the same reference math, with the Hadamard matrix
  passed in as a device tensor (``naive.hadamard_matrix`` builds it on the host and copies it
  over on every call; compiling that would bake a host-to-device copy into the graph, an unfair
  handicap for the compiled baseline).

Counted bytes (SPEC 4), the same for every implementation of one case (so GB/s ratios are time
ratios): forward = read x + write Q(x) + write the mask bit-packed (ceil(cols / 8) B a row);
backward = read the gradient + read the packed mask + write the gradient. The torch reference
stores its mask as one byte per element; that extra traffic is its cost, not counted work.
Inputs rotate through sets larger than 4 x L2 (built before timing; no clones in the timed call).

Host and kernels apart (CUDA): ``ms`` is do_bench's time of one call (the larger of the host's
part and the kernel's); ``host ms`` is the host's part alone (``common.host_time``) and
``kernels ms`` the call captured in a CUDA graph and replayed (``do_bench_cudagraph``, the
``triton`` rows: the eager reference copies its Hadamard matrix from the host on every call).
The ``triton`` rows call the planned op directly; ``cage.fake_quantize``'s autograd wrapper
adds its own host time, which ``benchmarks.bench_host`` measures.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

from . import common

BITS, BLOCK = 4, 128


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "activation" or "weight"
    rows: int
    cols: int
    dtype: torch.dtype


PRESETS = {
    "default": [
        Case("act 8192x4096 bf16", "activation", 8192, 4096, torch.bfloat16),
        Case("act 8192x8192 bf16", "activation", 8192, 8192, torch.bfloat16),
        Case("weight 4096x4096 fp32", "weight", 4096, 4096, torch.float32),
        Case("weight 14336x4096 fp32", "weight", 14336, 4096, torch.float32),
    ],
    "tiny": [
        Case("act 32x256 bf16", "activation", 32, 256, torch.bfloat16),
        Case("weight 32x128 fp32", "weight", 32, 128, torch.float32),
    ],
}
IMPLS = ("triton", "torch-eager", "torch-compile")
NOT_CAPTURED = {
    "torch-eager": "not capturable (naive copies its Hadamard matrix from the host every call)",
    "torch-compile": "not attempted (compiled reference)",
}


# ---- the reference with H as an argument (for torch.compile) ------------------------------


def _rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    b = h.shape[0]
    return (x.reshape(*x.shape[:-1], x.shape[-1] // b, b) @ h).reshape(x.shape)


def reference_quantize(x: torch.Tensor, h: torch.Tensor, config, rotate_back: bool = True):
    """``cage.naive.quantize`` op for op, with the rotation matrix ``h`` given."""
    from cage import naive

    x_h = x.to(naive.compute_dtype(x.dtype)).contiguous()
    if config.hadamard:
        x_h = _rotate(x_h, h)
    q, mask = naive.quantize_rotated(x_h, config)
    if config.hadamard and rotate_back:
        q = _rotate(q, h)
    return q.to(x.dtype), mask


def reference_masked_grad(grad: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, config):
    """``cage.naive.masked_grad`` (grad not yet rotated) with the rotation matrix given."""
    from cage import naive

    g = grad.to(naive.compute_dtype(grad.dtype)).contiguous()
    if config.hadamard:
        g = _rotate(g, h)
    g = g * mask
    if config.hadamard:
        g = _rotate(g, h)
    return g.to(grad.dtype)


_COMPILED = {}


def compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


# ---- one case ------------------------------------------------------------------------------


def impl_ops(impl: str, device: torch.device, h: torch.Tensor):
    """(forward(x, cfg) -> (q, mask_state), backward(g, mask_state, cfg) -> grad)."""
    if impl == "triton":
        from cage.ops.fake_quant import get_ops

        ops = get_ops("triton", device, "bench_fake_quant")
        return (lambda x, cfg: ops.quantize(x, cfg, True)), (lambda g, m, cfg: ops.masked_grad(g, m, cfg, False))
    if impl == "torch-eager":
        from cage import naive

        return (lambda x, cfg: naive.quantize(x, cfg, True)), (lambda g, m, cfg: naive.masked_grad(g, m, cfg, False))
    if impl == "torch-compile":
        fwd, bwd = compiled(reference_quantize), compiled(reference_masked_grad)
        return (lambda x, cfg: fwd(x, h, cfg, True)), (lambda g, m, cfg: bwd(g, m, h, cfg))
    raise ValueError(impl)


def mask_nbytes(mask_state: torch.Tensor) -> int:
    return mask_state.numel() * mask_state.element_size()


def run_case(case: Case, impls, device, warmup_ms, rep_ms, copy_gbps, directions, args=None) -> list[dict]:
    from cage import QuantConfig, naive

    cfg = QuantConfig(bits=BITS, hadamard=True, block_size=BLOCK, grad_mask="trust")
    h = naive.hadamard_matrix(BLOCK, torch.float32, device)
    es = torch.empty((), dtype=case.dtype).element_size()
    numel = case.rows * case.cols
    set_bytes = numel * es
    gen = torch.Generator(device=device).manual_seed(0)
    xs = common.Rotating(
        lambda i: torch.randn(case.rows, case.cols, device=device, generator=gen).to(case.dtype), set_bytes, device
    )
    gs = common.Rotating(
        lambda i: torch.randn(case.rows, case.cols, device=device, generator=gen).to(case.dtype), set_bytes, device
    )
    counted = {
        "fwd": common.fake_quant_forward_bytes(case.rows, case.cols, es, es),
        "bwd": common.fake_quant_backward_bytes(case.rows, case.cols, es),
    }
    rot_flops = 2 * BLOCK * numel  # one block rotation: a BLOCK-long dot product per element
    rows = []
    ref_q = None
    for impl in impls:
        why = common.compile_refused() if impl == "torch-compile" else common.over_budget()
        if why:
            for d in directions:
                rows.append({"case": case.name, "kind": case.kind, "dir": d, "impl": impl, "status": why})
            print(f"  {case.name} {impl}: {why}", file=sys.stderr)
            continue
        started = time.monotonic()
        try:
            fwd, bwd = impl_ops(impl, device, h)
            # build / compile outside the timed region; each implementation's own mask format
            q0, m0 = fwd(xs.sets[0], cfg)
            if impl == "torch-eager":
                ref_q = q0
            masks = [m0] + [fwd(x, cfg)[1] for x in xs.sets[1:]]
            written_mask = mask_nbytes(masks[0])
        except Exception as err:  # noqa: BLE001
            for d in directions:
                rows.append({"case": case.name, "kind": case.kind, "dir": d, "impl": impl,
                             "status": "error: " + common.short_error(err)})
            print(f"  {case.name} {impl}: {rows[-1]['status']}", file=sys.stderr)
            if impl == "torch-compile":
                common.spend_compile(time.monotonic() - started)
            continue
        for d in directions:
            row = {"case": case.name, "kind": case.kind, "dir": d, "impl": impl, "rows": case.rows,
                   "cols": case.cols, "dtype": str(case.dtype).replace("torch.", ""),
                   "bytes": counted[d], "rotation_flops": 2 * rot_flops, "mask_bytes_stored": written_mask}
            try:
                if d == "fwd":
                    def call(fwd=fwd):
                        return fwd(xs.next(), cfg)
                else:
                    idx = {"i": 0}

                    def call(bwd=bwd, idx=idx, masks=masks):
                        i = idx["i"]
                        idx["i"] = (i + 1) % len(masks)
                        return bwd(gs.sets[i % len(gs.sets)], masks[i], cfg)

                t = common.bench(call, device, warmup_ms, rep_ms)
                row.update(ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                           gbps=common.gbps(counted[d], t.median_ms), status="ok")
                row["frac_copy"] = row["gbps"] / copy_gbps
                common.split_times(row, call, device, args, rep_ms, capturable=impl == "triton",
                                   why_not=NOT_CAPTURED.get(impl, "not capturable"))
            except Exception as err:  # noqa: BLE001
                row["status"] = "error: " + common.short_error(err)
            rows.append(row)
            print(f"  {case.name} {d} {impl}: {row.get('ms', float('nan')):.4g} ms {row['status']}", file=sys.stderr)
        if impl != "torch-eager" and ref_q is not None:
            # A rounding tie or a level boundary may flip between implementations (different
            # summation order in the rotation): a few elements one grid step apart are expected.
            diff = (q0.float() - ref_q.float()).abs()
            for r in rows:
                if r["impl"] == impl and r["case"] == case.name and r["dir"] == "fwd":
                    r["max_abs_diff_vs_eager"] = diff.max().item()
                    r["frac_diff_vs_eager"] = (diff > 0).float().mean().item()
        del masks
        if impl == "torch-compile":
            common.spend_compile(time.monotonic() - started)
        common.release(device)
    # ratios within each direction of this case
    for d in directions:
        base = {r["impl"]: r["ms"] for r in rows if r["dir"] == d and r.get("status") == "ok"}
        for r in rows:
            if r["dir"] == d and r.get("status") == "ok":
                for b in ("torch-eager", "torch-compile"):
                    if b in base:
                        r[f"t/{b}"] = r["ms"] / base[b]
    del xs, gs
    common.release(device)
    return rows


def targets(rows, gpu: bool) -> list[dict]:
    out = []
    act_fwd = [r for r in rows if r["kind"] == "activation" and r["dir"] == "fwd"]
    for case in dict.fromkeys(r["case"] for r in act_fwd):
        r = next((x for x in act_fwd if x["case"] == case and x["impl"] == "triton"), None)
        if r is None or r.get("status") != "ok":
            out.append({"target": f"{case} forward: >= 70% of copy bandwidth, >= 1.5x faster than torch.compile",
                        "value": None, "status": "not measured (triton row missing or failed)"})
            continue
        for name, value, ok in (
            (f"{r['case']} forward >= 70% of copy bandwidth", r["frac_copy"], r["frac_copy"] >= 0.70),
            (f"{r['case']} forward >= 1.5x faster than torch.compile", r.get("t/torch-compile"),
             r.get("t/torch-compile") is not None and r["t/torch-compile"] <= 1 / 1.5),
        ):
            status = "not measured (no GPU in this run)" if not gpu else ("met" if ok else "MISSED")
            if value is None:
                status = "not measured (row missing)"
            out.append({"target": name, "value": value, "status": status})
    return out


COLUMNS = [
    ("case", "case"), ("dir", "dir"), ("impl", "impl"), ("bytes", "bytes"), ("ms", "ms"), ("gbps", "GB/s"),
    ("frac_copy", "of copy BW"), ("host_ms", "host ms"), ("graph_ms", "kernels ms (graph)"),
    ("t/torch-eager", "t / eager"), ("t/torch-compile", "t / compile"),
    ("max_abs_diff_vs_eager", "max |dQ| vs eager"), ("frac_diff_vs_eager", "frac dQ != 0"), ("status", "status"),
]


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], "default", PRESETS)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {IMPLS}")
    p.add_argument("--directions", default="fwd,bwd", help="fwd, bwd or both")
    args = p.parse_args(argv)
    common.apply_threads(args)
    device = common.pick_device(args.device)
    common.ensure_interpreter_for(device)
    impls = common.comma_choices(p, args.impls, IMPLS, "impl")
    # the eager reference first: the others are compared against its output
    impls = sorted(impls, key=lambda i: i != "torch-eager")
    if args.no_compile:
        impls = [i for i in impls if i != "torch-compile"]
    directions = common.comma_choices(p, args.directions, ("fwd", "bwd"), "direction")
    warmup_ms, rep_ms = common.bench_times(args, device)
    env = common.environment(device)
    copy = common.copy_bandwidth(device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    rows = []
    for case in PRESETS[args.preset]:
        rows += run_case(case, impls, device, warmup_ms, rep_ms, copy["gbps"], directions, args)
    order = {i: k for k, i in enumerate(IMPLS)}
    rows.sort(key=lambda r: (PRESETS[args.preset].index(next(c for c in PRESETS[args.preset] if c.name == r["case"])),
                             r["dir"] != "fwd", order[r["impl"]]))
    tgt = targets(rows, env["gpu_result"])
    sections = [
        {
            "title": f"Fake quantization W{BITS}, Hadamard {BLOCK}, trust mask, rotate_back=True",
            "text": (
                f"Copy bandwidth measured in this run: {copy['gbps']:.1f} GB/s "
                f"({copy['buffer_bytes'] / 2**20:.0f} MiB device-to-device copy, read + written). "
                "Counted bytes: fwd = x + Q(x) + packed mask; bwd = grad in + packed mask + grad out "
                "(the same count for every implementation). Ratios are time ratios (below 1: faster). "
                "On CUDA 'host ms' is a call's host part alone and 'kernels ms' the call replayed from a CUDA graph."
            ),
            "rows": rows,
            "columns": COLUMNS,
        },
        {"title": "Targets (issue 4)", "rows": tgt,
         "columns": [("target", "target"), ("value", "value"), ("status", "status")]},
    ]
    extra = {"preset": args.preset, "copy": copy, "targets": tgt,
             "quantizer": {"bits": BITS, "hadamard": True, "block_size": BLOCK, "grad_mask": "trust"}}
    return common.finish("fake_quant", env, sections, args, rows, extra)


if __name__ == "__main__":
    main()

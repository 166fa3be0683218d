"""The compile gate: every kernel configuration the launchers plan for a named set of
shapes, compiled for sm_80 and sm_90a without a GPU, with its registers, spills and
shared memory read from the cubin.

    python -m cage_kernels.compile_gate --arch 80 --arch 90 [--out FILE.md] [--jobs N]

The configurations are built by the launchers' own planning (``forward_launch``,
``backward_launch``, ``step_blocking`` / ``step_launch``, ``matmul_launch``,
``int8_matmul_launch``) from shapes and dtypes, so the
gate compiles exactly what a call would launch. Many configurations share one
specialization (bits, masks' radii and row counts are run-time values; widths matter
through the blocking and their divisibility); Triton's cache compiles each distinct one
once. Exit status 1 when a kernel spills, has
a stack, exceeds the shared memory of a CTA or leaves fewer than 2 CTAs resident per SM
(every kernel here streams memory). TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import sys
import time

# Shapes the gate covers (SPEC 3 sizes, Llama-7B/8B/70B and TinyLlama widths):
ROW_LENGTHS = (640, 768, 1024, 1792, 2048, 4096, 5632, 8192, 11008, 14336, 28672)
ROW_COUNTS = (1, 7, 16, 640, 16384)
BITS = (2, 3, 4, 8)
MASKS = ("none", "clip", "trust")
# (hadamard, rotate_back): rotation on, rotated-domain output, off
ROTATIONS = ((True, True), (True, False), (False, True))
BLOCK_SIZES = (128,)
# Smaller Hadamard blocks (one 16-wide stage, or two with a smaller slow one), at one width.
SMALL_BLOCKS = (64, 32, 16, 8)
SMALL_BLOCK_WIDTH = 4096
ALPHA = {2: 1.4935346200, 3: 2.0510683541, 4: 2.5139305786, 8: 3.8849386788}
RMS_EPS = 1e-20
MIN_CTAS_PER_SM = 2


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch the gate compiles: a label for people, the launch and its arguments."""

    op: str
    label: str
    launch: object
    args: tuple


def _dtypes():
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mask_mode(grad_mask: str, bits: int):
    from .quant_math import MASK_CLIP, MASK_NONE, MASK_TRUST

    if grad_mask == "none":
        return MASK_NONE, 0.0
    if grad_mask == "clip":
        return MASK_CLIP, 1.0
    return MASK_TRUST, 1.0 / (2**bits - 1)


def fake_quant_configs(quick: bool = False):
    """Forward and backward of fake quantization over shapes x dtypes x bits x masks x rotations."""
    import torch

    from .fake_quant import forward_launch
    from .masked_backward import backward_launch

    rows = (1, 16384) if quick else ROW_COUNTS
    for dname, dtype in _dtypes().items():
        for n_cols in ROW_LENGTHS[::5] if quick else ROW_LENGTHS:
            for n_rows in rows:
                for hadamard, rotate_back in ROTATIONS:
                    blocks = BLOCK_SIZES + (SMALL_BLOCKS if n_cols == SMALL_BLOCK_WIDTH else ())
                    for block in blocks if hadamard else (128,):
                        rot = torch.bfloat16 if hadamard else dtype
                        where = f"{dname} [{n_rows}x{n_cols}] {f'H{block}' if hadamard else 'noH'}"
                        for grad_mask in MASKS:
                            for bits in BITS:
                                mode, radius = _mask_mode(grad_mask, bits)
                                mask = torch.uint8 if grad_mask != "none" else dtype
                                launch, args = forward_launch(
                                    dtype, dtype, mask, rot, n_rows, n_cols, levels=2**bits, alpha=ALPHA[bits],
                                    hadamard=hadamard, block_size=block, mask_mode=mode, mask_radius=radius,
                                    rotate_back=rotate_back, rms_eps=RMS_EPS, interpreted=False,
                                )
                                out = "" if rotate_back else " rotated-out"
                                yield Config("forward", f"{where} b{bits} {grad_mask}{out}", launch, args)
                            apply_mask = grad_mask != "none"
                            if not apply_mask and not (hadamard and not rotate_back):
                                continue  # the identity: no kernel runs
                            launch, args = backward_launch(
                                dtype, torch.uint8 if apply_mask else dtype, dtype, rot, n_rows, n_cols,
                                hadamard=hadamard, block_size=block, apply_mask=apply_mask,
                                grad_is_rotated=hadamard and not rotate_back, interpreted=False,
                            )
                            grad_in = " rotated-in" if hadamard and not rotate_back else ""
                            yield Config("backward", f"{where} {grad_mask}{grad_in}", launch, args)


# Sampled, not crossed with everything above: the integer grid and the int8-code output are one
# switch each in the same kernels (what changes is a few instructions around the rounding).
GRID_CODE_WIDTHS = (640, 4096, 11008)


def grid_and_codes_configs(quick: bool = False):
    """The forward kernel on the integer grid, and emitting int8 codes (the int8 product's
    operands) on both grids; the optimizer's CAGE correction on the integer grid."""
    import torch

    from .adamw_cage import step_blocking, step_launch
    from .fake_quant import forward_launch

    widths = GRID_CODE_WIDTHS[:1] if quick else GRID_CODE_WIDTHS
    for dname, dtype in _dtypes().items():
        for n_cols in widths:
            for n_rows in ((16,) if quick else (16, 4096)):
                for integer, codes, rotate_back in ((True, False, True), (True, False, False), (False, True, False),
                                                    (True, True, False)):
                    for grad_mask in ("none", "trust"):
                        bits = 8 if integer and codes else 4
                        mode, radius = _mask_mode(grad_mask, bits)
                        launch, args = forward_launch(
                            dtype, torch.int8 if codes else dtype, torch.uint8 if grad_mask != "none" else dtype,
                            torch.bfloat16, n_rows, n_cols, levels=2**bits, alpha=ALPHA[bits], hadamard=True,
                            block_size=128, mask_mode=mode, mask_radius=radius, rotate_back=rotate_back,
                            rms_eps=RMS_EPS, interpreted=False, half_step=torch.float32 if codes else None,
                            integer_grid=integer,
                        )
                        what = ("integer" if integer else "centered") + (" codes" if codes else "")
                        out = "" if rotate_back else " rotated-out"
                        yield Config("forward", f"{dname} [{n_rows}x{n_cols}] H128 b{bits} {grad_mask}{out} {what}",
                                     launch, args)
    i64 = torch.int64
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n_cols in widths:
            for coupled in (False, True):
                blocking = step_blocking(n_cols, hadamard=True, block_size=128, interpreted=False)
                launch, args = step_launch(
                    i64, i64, torch.bfloat16, torch.float32, 1000, blocking, param_dtype=dtype, grad_dtype=dtype,
                    vec=16, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=10, cage_lambda=5.0,
                    coupled=coupled, levels=16, alpha=ALPHA[4], hadamard=True, block_size=128, rms_eps=RMS_EPS,
                    integer_grid=True,
                )
                yield Config("optimizer", f"{dname} cage {'coupled' if coupled else 'decoupled'} [{n_cols} cols] "
                             "H128 vec16 integer grid", launch, args)


def optimizer_configs(quick: bool = False):
    """The fused step: fp32/bf16/fp16 params, decoupled/coupled, CAGE on/off (a mixed
    model's groups), with and without the non-finite flag, aligned and unaligned streams."""
    import torch

    from .adamw_cage import step_blocking, step_launch

    widths = ROW_LENGTHS[::5] if quick else ROW_LENGTHS
    i64 = torch.int64
    dtypes = _dtypes()
    # (param dtype, grad dtype, non-finite flag, loss scale): every param dtype with its own grads
    # and the flag (the GPU default); fp32 grads of bf16 params; no flag (check_finite=False);
    # a GradScaler's loss scale (fp16 and fp32 training), sampled on a few cases
    variants = [(d, d, True, False) for d in dtypes.values()]
    variants += [(torch.bfloat16, torch.float32, True, False), (torch.float32, torch.float32, False, False),
                 (torch.bfloat16, torch.bfloat16, False, False), (torch.float16, torch.float16, True, True),
                 (torch.float32, torch.float32, True, True)]
    names = {v: k for k, v in dtypes.items()}
    for dtype, grad_dtype, found_inf, unscale in variants:
        flag = torch.float32 if found_inf else None
        what = (names[dtype] + ("" if grad_dtype == dtype else f" {names[grad_dtype]}-grads")
                + ("" if found_inf else " no-flag") + (" grad-scale" if unscale else ""))
        cases = [(None, False, False, 128, 16), (None, False, False, 128, 1)]  # plain AdamW, aligned or not
        if unscale:
            cases += [(n, coupled, True, 128, 16) for n in (640, 11008) for coupled in (False, True)]
        else:
            cases += [(n, coupled, hadamard, 128, 16) for n in widths for coupled in (False, True)
                      for hadamard in (True, False)]
            cases += [(n, coupled, True, 32, 16) for n in (640, 4096) for coupled in (False, True)]
            cases += [(4100, coupled, False, 128, 4) for coupled in (False, True)]  # an odd width, no rotation
        for n_cols, coupled, hadamard, block, vec in cases:
            cage = n_cols is not None
            blocking = step_blocking(n_cols, hadamard=hadamard, block_size=block, interpreted=False)
            launch, args = step_launch(
                i64, i64, torch.bfloat16 if cage and hadamard else i64, flag, 1000, blocking,
                param_dtype=dtype, grad_dtype=grad_dtype, vec=vec, lr=1e-3, beta1=0.9, beta2=0.95,
                eps=1e-8, weight_decay=0.1, step=10, cage_lambda=5.0 if cage else 0.0, coupled=coupled,
                levels=16 if cage else None, alpha=ALPHA[4] if cage else None, hadamard=hadamard,
                block_size=block, rms_eps=RMS_EPS, grad_scale=torch.float32 if unscale else None,
            )
            if cage:
                rot = f"H{block}" if hadamard else "noH"
                case = f"cage {'coupled' if coupled else 'decoupled'} [{n_cols} cols] {rot} vec{vec}"
            else:
                case = f"adamw plain vec{vec}"
            yield Config("optimizer", f"{what} {case}", launch, args)


# The converted layer's matmul: tokens per call (decode, a small batch, prefill chunks) and
# (K, N) pairs of Llama-7B/8B projections and a SPEC 3 size, from ROW_LENGTHS.
MATMUL_TOKENS = (1, 16, 512, 4096)
MATMUL_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (640, 1792), (1792, 640))
MATMUL_BITS = (1, 2, 3, 4, 5, 8)


def dequant_matmul_configs(quick: bool = False):
    """The fused dequantize-and-multiply over tokens x (K, N) x bits x dtypes x bias."""
    import torch

    from .dequant_matmul import matmul_launch

    dtypes = _dtypes()
    if quick:
        dtypes = {name: dtypes[name] for name in ("bf16", "fp32")}
    for dname, dtype in dtypes.items():
        for m in (1, 4096) if quick else MATMUL_TOKENS:
            for k, n in MATMUL_SHAPES[:1] if quick else MATMUL_SHAPES:
                for bits in (3, 4) if quick else MATMUL_BITS:
                    for bias in (False,) if quick else (False, True):
                        launch, args = matmul_launch(
                            dtype, torch.uint8, torch.float32, dtype if bias else None, dtype, m, n, k,
                            bits=bits, code_offset=2 ** (bits - 1) - 1, interpreted=False,
                        )
                        label = f"{dname} [{m}x{k}] @ [{n}x{k}]^T b{bits}{' bias' if bias else ''}"
                        yield Config("dequant_matmul", label, launch, args)


# The int8 x int8 GEMM (the exact QAT forward): the matmul's token counts and 64 (the
# planner's middle tiling, 17-64 tokens); Llama-7B/8B (K, N) pairs and a SPEC 3 size; and
# one K that is not a multiple of 16 (unaligned rows: the masked K loop and its own prefill
# tiling), sampled in bf16 only.
INT8_MATMUL_TOKENS = (1, 16, 64, 512, 4096)
INT8_MATMUL_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (640, 1792))
INT8_MATMUL_RAGGED_SHAPE = (4100, 4096)


def int8_matmul_configs(quick: bool = False):
    """The int8 GEMM with its fused epilogue over tokens x (K, N) x out dtypes x bias (bias
    in the output's dtype): 3 tilings x 3 dtypes x bias x aligned K, plus the ragged K (not a
    multiple of 16: the unaligned rows' own prefill tiling) in bf16."""
    import torch

    from .int8_matmul import int8_matmul_launch

    dtypes = _dtypes()
    if quick:
        dtypes = {name: dtypes[name] for name in ("bf16", "fp32")}
    for dname, dtype in dtypes.items():
        shapes = INT8_MATMUL_SHAPES[:1] if quick else INT8_MATMUL_SHAPES
        if dname == "bf16" and not quick:
            shapes += (INT8_MATMUL_RAGGED_SHAPE,)
        for m in (1, 4096) if quick else INT8_MATMUL_TOKENS:
            for k, n in shapes:
                for bias in (False,) if quick else (False, True):
                    launch, args = int8_matmul_launch(
                        torch.int8, torch.int8, torch.float32, torch.float32, dtype if bias else None, dtype,
                        m, n, k, interpreted=False,
                    )
                    label = f"{dname} [{m}x{k}] @ [{n}x{k}]^T int8{' bias' if bias else ''}"
                    yield Config("int8_matmul", label, launch, args)


def all_configs(quick: bool = False):
    yield from fake_quant_configs(quick)
    yield from grid_and_codes_configs(quick)
    yield from optimizer_configs(quick)
    yield from dequant_matmul_configs(quick)
    yield from int8_matmul_configs(quick)


@dataclasses.dataclass
class Row:
    """One distinct compiled kernel and the configurations that compile to it."""

    resources: object
    meta: dict
    labels: list
    ops: set


def compile_arch(arch: int, quick: bool = False):
    """``(rows, n_configs, seconds)`` for one architecture."""
    from .compile_check import compile_target, inspect

    t0 = time.perf_counter()
    rows: dict[tuple, Row] = {}
    n = 0
    with compile_target(arch):
        for config in all_configs(quick):
            n += 1
            compiled = config.launch.warmup(*config.args)
            key = (config.launch.name, compiled.hash)
            if key not in rows:
                rows[key] = Row(inspect(compiled, config.launch.name, arch), dict(config.launch.meta), [], set())
            rows[key].labels.append(config.label)
            rows[key].ops.add(config.op)
    return list(rows.values()), n, time.perf_counter() - t0


def _arch_worker(arch: int, quick: bool):
    rows, n, seconds = compile_arch(arch, quick)
    return arch, rows, n, seconds


_META_SHOWN = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BITS", "EVEN_K", "HAS_BIAS", "DOT_DTYPE",
               "BLOCK_ROWS", "TILES", "ROT_WIDTH", "SINGLE_CHUNK", "HADAMARD", "CAGE", "COUPLED",
               "X_SPLIT", "GRAD_SPLIT", "STORE_MASK", "ROTATE_BACK", "ROTATE_IN", "APPLY_MASK", "VEC",
               "PARAM_DTYPE", "CHECK_FOUND_INF")


def _meta_text(meta: dict) -> str:
    short = []
    for key in _META_SHOWN:
        if key in meta:
            value = meta[key]
            value = {True: "1", False: "0"}.get(value, value) if isinstance(value, bool) else value
            short.append(f"{key}={str(value).replace('triton.language.', '')}")
    return " ".join(short)


def _per_op(rows) -> dict:
    """Registers, shared memory and CTAs per SM at their worst, per op."""
    ops = sorted({op for r in rows for op in r.ops})
    return {
        op: {"max_registers": max(r.resources.registers for r in rows if op in r.ops),
             "max_shared_memory": max(r.resources.shared_memory for r in rows if op in r.ops),
             "min_ctas_per_sm": min(r.resources.ctas_per_sm for r in rows if op in r.ops)}
        for op in ops
    }


def render(results, versions: str) -> tuple[str, int]:
    """Markdown report and the number of kernels with problems."""
    lines = [
        "# Kernel resources: the compile gate",
        "",
        f"`python -m cage_kernels.compile_gate {' '.join(f'--arch {a}' for a, *_ in results)}` ({versions}).",
        "Every configuration the launchers plan for the shapes below, compiled for each architecture",
        "without a GPU; each distinct specialization once. Registers, stack and LDL/STL (spill) counts",
        "come from the cubin (`cuobjdump`), shared memory is what the launch requests plus static;",
        "a kernel passes with no spill, no stack, shared memory within 227 KB and at least",
        f"{MIN_CTAS_PER_SM} resident CTAs per SM.",
        "",
        f"- rows of {', '.join(map(str, ROW_LENGTHS))} columns; {', '.join(map(str, ROW_COUNTS))} rows",
        f"- fp32, bf16, fp16; bits {', '.join(map(str, BITS))}; masks {', '.join(MASKS)};",
        f"  rotation on (block 128; blocks {', '.join(map(str, SMALL_BLOCKS))} at {SMALL_BLOCK_WIDTH} columns),",
        "  rotated-domain output, off",
        "- optimizer: fp32/bf16/fp16 params (bf16 also with fp32 grads), decoupled and coupled, CAGE on",
        "  and off (plain AdamW groups), with and without the non-finite flag, aligned and unaligned",
        f"- dequantize-and-multiply: {', '.join(map(str, MATMUL_TOKENS))} tokens; (K, N) "
        f"{', '.join(f'{k}x{n}' for k, n in MATMUL_SHAPES)}; bits {', '.join(map(str, MATMUL_BITS))};",
        "  fp32, bf16, fp16; with and without bias",
        f"- int8 GEMM (int32 accumulation, fused fp32 epilogue): {', '.join(map(str, INT8_MATMUL_TOKENS))} tokens; "
        f"(K, N) {', '.join(f'{k}x{n}' for k, n in INT8_MATMUL_SHAPES)}",
        f"  (and {'x'.join(map(str, INT8_MATMUL_RAGGED_SHAPE))} in bf16); fp32, bf16, fp16 out; with and without bias.",
        "  Its MMA column counts IMMA (sm_80, and sm_90a's 16-row decode tiles) and IGMMA (sm_90a's int8 wgmma)",
        "",
    ]
    bad_total = 0
    for arch, rows, n_configs, seconds in results:
        bad = [r for r in rows if r.resources.problems(MIN_CTAS_PER_SM)]
        bad_total += len(bad)
        worst = max(rows, key=lambda r: r.resources.registers)
        least = min(r.resources.ctas_per_sm for r in rows)
        lines += [
            f"## sm_{arch}{'a' if arch == 90 else ''}",
            "",
            f"{n_configs} configurations, {len(rows)} distinct kernels, compiled in {seconds:.0f} s: "
            f"**{len(bad)} with problems**; at most {worst.resources.registers} registers, "
            f"max stack {max(r.resources.stack for r in rows)} B, "
            f"{sum(r.resources.spill_instructions for r in rows)} spill instructions in all, "
            f"max shared memory {max(r.resources.shared_memory for r in rows)} B, "
            f"at least {least} CTAs/SM.",
            "",
            *(f"- {op}: at most {v['max_registers']} registers, {v['max_shared_memory']} B shared memory, "
              f"at least {v['min_ctas_per_sm']} CTAs/SM" for op, v in _per_op(rows).items()),
            "",
            "| kernel | specialization | configs | e.g. | warps | regs | stack | LDL/STL | smem B | MMA | FFMA | CTAs/SM | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: (r.resources.name, -r.resources.registers)):
            res = r.resources
            problems = res.problems(MIN_CTAS_PER_SM)
            lines.append(
                f"| `{res.name}` | {_meta_text(r.meta)} | {len(r.labels)} | {r.labels[0]} | {res.num_warps} | "
                f"{res.registers} | {res.stack} | {res.spill_instructions} | {res.shared_memory} | "
                f"{res.mma_instructions} | {res.ffma_instructions} | {res.ctas_per_sm} | "
                f"{'ok' if not problems else '; '.join(problems)} |"
            )
        lines.append("")
    return "\n".join(lines), bad_total


def summary(results) -> dict:
    """What the gate covered and found, per architecture (for tests and tools)."""
    import triton

    return {
        "triton": triton.__version__,
        "coverage": {"row_lengths": list(ROW_LENGTHS), "row_counts": list(ROW_COUNTS), "bits": list(BITS),
                     "masks": list(MASKS), "rotations": [list(r) for r in ROTATIONS],
                     "matmul_tokens": list(MATMUL_TOKENS), "matmul_shapes": [list(s) for s in MATMUL_SHAPES],
                     "matmul_bits": list(MATMUL_BITS),
                     "int8_matmul_tokens": list(INT8_MATMUL_TOKENS),
                     "int8_matmul_shapes": [list(shape) for shape in INT8_MATMUL_SHAPES + (INT8_MATMUL_RAGGED_SHAPE,)]},
        "archs": {
            str(arch): {
                "configs": n_configs,
                "kernels": len(rows),
                "seconds": round(seconds, 1),
                "labels": sorted({label for r in rows for label in r.labels}),
                "problems": [f"{r.resources.name} ({r.labels[0]}): {'; '.join(r.resources.problems(MIN_CTAS_PER_SM))}"
                             for r in rows if r.resources.problems(MIN_CTAS_PER_SM)],
                "max_registers": max(r.resources.registers for r in rows),
                "min_ctas_per_sm": min(r.resources.ctas_per_sm for r in rows),
                "ops": sorted({op for r in rows for op in r.ops}),
                "per_op": _per_op(rows),
            }
            for arch, rows, n_configs, seconds in results
        },
    }


def versions_text() -> str:
    import torch
    import triton

    return f"triton {triton.__version__}, torch {torch.__version__}, python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=(80, 90),
                        help="compute capability x10; repeat for several (default: 80 and 90)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--json", help="also write a machine-readable summary to this file")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="architectures compiled in parallel processes (default: up to 2)")
    parser.add_argument("--quick", action="store_true", help="fewer row counts and widths (a smoke run, not the gate)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels are not compiled")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    archs = args.arch or [80, 90]
    if args.jobs > 1 and len(archs) > 1:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh triton per process
        with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(archs)), mp_context=context) as pool:
            results = list(pool.map(_arch_worker, archs, [args.quick] * len(archs)))
    else:
        results = [_arch_worker(arch, args.quick) for arch in archs]
    text, bad = render(results, versions_text())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary(results), f, indent=1)
    print(f"compile gate: {bad} kernel(s) with problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

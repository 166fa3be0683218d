"""Fused AdamW + CAGE step (SPEC 2): one launch per (step, dtypes, row blocking) bucket
of a parameter group, many tensors per launch.

Multi-tensor addressing: a per-tensor table (int64 records: param, grad, exp_avg,
exp_avg_sq addresses, rows, columns, numel) and a per-program tile table (tensor index,
first row). A program owns ``BLOCK_ROWS`` whole rows of one tensor, so the CAGE row
scale is computed in registers: ``rms(x_h) = rms(x)`` (SPEC 1), the rotation is needed
only to round in the rotated domain.

- plain AdamW (no quantizer, or lambda_t = 0): the tensor is viewed as rows of one chunk.
- decoupled: AdamW, then ``x <- x - lr * lambda_t * (x - Q(x))`` with Q of the updated row.
- coupled: ``g <- g + lambda_t * (x - Q(x))`` with x before the step, then AdamW.

A row longer than one chunk is swept twice: a dry run for the sum of squares (of x for
coupled, of the AdamW-updated x for decoupled, which is recomputed identically in the
second sweep), then the update. All math is fp32; lr, lambda_t and the bias corrections
arrive as scalars computed on the host from the CPU step counters: no device sync.
The AdamW part follows torch's single-tensor CPU path op for op, including where its
kernels fuse a multiply-add (lerp, addcmul, sub with alpha), so fp32 results match the
torch backend bit for bit under the interpreter when lambda_t = 0.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import triton
import triton.language as tl

from cage import naive
from cage.config import RMS_EPS
from cage.optim import local_tensor

from .hadamard import MAX_KERNEL_BLOCK, load_rotation, load_rotation_args
from .quant_math import chunk_offsets, quantize_chunk, row_scale, row_sum_squares, store_rounded
from .tiling import (
    PLAIN_TILE_WIDTH,
    exact_dot_dtype,
    is_interpreted,
    level_dot_dtype,
    plan_rows,
    quant_rot_width,
    tl_dtype,
)

RECORD: tl.constexpr = 8  # int64 fields per tensor in the tensor table (7 used, padded)
# Plain AdamW views a tensor as rows of this many elements (one chunk each).
PLAIN_ROW = 8 * PLAIN_TILE_WIDTH
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _adamw_update(
    x, g, m, v, decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size,
    bias_correction2_sqrt, eps, LERP_SMALL_WEIGHT: tl.constexpr,
):
    """torch.optim.AdamW (single tensor) on fp32 values; returns ``(x, m, v)``.

    Scalars are splat to full tiles before tl.fma / tl.div_rn: older Triton does not
    broadcast their operands."""
    x = x * decay_factor
    if LERP_SMALL_WEIGHT:  # exp_avg.lerp_(g, w), as ATen's vector lerp: fma(w, g - m, m)
        m = tl.fma(beta1_weight + tl.zeros_like(m), g - m, m)
    else:  # the other branch of ATen's lerp: fma(w - 1, g - m, g)
        m = tl.fma((beta1_weight - 1.0) + tl.zeros_like(m), g - m, g)
    v = v * beta2
    v = tl.fma(one_minus_beta2 * g, g, v)  # addcmul_(g, g, value=1 - beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt + tl.zeros_like(v)) + eps
    x = x + tl.div_rn(neg_step_size * m, denom)  # addcdiv_(m, denom, value=-step_size)
    return x, m, v


@triton.jit
def _step_chunk(
    x, g, m, v, in_bounds, scale, n_cols, rot,
    decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
    cage_lambda, cage_step, alpha, inv_sqrt_block,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr, LERP_SMALL_WEIGHT: tl.constexpr,
    CAGE: tl.constexpr, COUPLED: tl.constexpr, SCALE_FROM_CHUNK: tl.constexpr, HADAMARD: tl.constexpr,
    LEVELS: tl.constexpr, RMS_EPS: tl.constexpr, X_DOT_DTYPE: tl.constexpr, LEVEL_DOT_DTYPE: tl.constexpr,
):
    """AdamW + CAGE on a chunk; ``scale`` is the row scale unless SCALE_FROM_CHUNK (then
    the chunk is the whole row and the scale is computed here)."""
    if CAGE and COUPLED:
        if SCALE_FROM_CHUNK:
            scale = row_scale(row_sum_squares(x), n_cols, alpha, RMS_EPS)
        q, keep = quantize_chunk(
            x, rot, scale, inv_sqrt_block, 0.0, BLOCK_ROWS, TILES, ROT_WIDTH, LEVELS,
            HADAMARD, True, 0, X_DOT_DTYPE, LEVEL_DOT_DTYPE,
        )
        g = g + cage_lambda * (x - q)
    x, m, v = _adamw_update(
        x, g, m, v, decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size,
        bias_correction2_sqrt, eps, LERP_SMALL_WEIGHT,
    )
    if CAGE and not COUPLED:
        x = tl.where(in_bounds, x, 0.0)  # padding lanes must not reach the row sum or the dot
        if SCALE_FROM_CHUNK:
            scale = row_scale(row_sum_squares(x), n_cols, alpha, RMS_EPS)
        q, keep = quantize_chunk(
            x, rot, scale, inv_sqrt_block, 0.0, BLOCK_ROWS, TILES, ROT_WIDTH, LEVELS,
            HADAMARD, True, 0, X_DOT_DTYPE, LEVEL_DOT_DTYPE,
        )
        x = tl.fma(tl.zeros_like(x) - cage_step, x - q, x)  # sub_(x - q, alpha=lr * lambda)
    return x, m, v


@triton.jit
def _load_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds):
    x = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=in_bounds, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=in_bounds, other=0.0)
    return x, g, m, v


@triton.jit
def _store_chunk(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, x, m, v):
    store_rounded(param_ptr + offsets, x, in_bounds)
    tl.store(exp_avg_ptr + offsets, m, mask=in_bounds)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=in_bounds)


@triton.jit
def _adamw_cage_kernel(
    tensor_table, tile_table, rot_ptr,
    decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
    cage_lambda, cage_step, alpha, inv_sqrt_block,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    LERP_SMALL_WEIGHT: tl.constexpr, CAGE: tl.constexpr, COUPLED: tl.constexpr, HADAMARD: tl.constexpr,
    LEVELS: tl.constexpr, RMS_EPS: tl.constexpr, X_DOT_DTYPE: tl.constexpr, LEVEL_DOT_DTYPE: tl.constexpr,
):
    tile = tl.program_id(0)
    tensor = tl.load(tile_table + 2 * tile)
    first_row = tl.load(tile_table + 2 * tile + 1)
    record = tensor_table + tensor * RECORD
    param_ptr = tl.load(record).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(record + 1).to(tl.pointer_type(GRAD_DTYPE))
    exp_avg_ptr = tl.load(record + 2).to(tl.pointer_type(MOMENT_DTYPE))
    exp_avg_sq_ptr = tl.load(record + 3).to(tl.pointer_type(MOMENT_DTYPE))
    n_rows = tl.load(record + 4)
    n_cols = tl.load(record + 5)
    numel = tl.load(record + 6)
    rows = first_row + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    row_ok = rows < n_rows
    if CAGE and HADAMARD:
        rot = load_rotation(rot_ptr, ROT_WIDTH)
    else:
        rot = 0.0
    CHUNK_WIDTH: tl.constexpr = TILES * ROT_WIDTH

    if SINGLE_CHUNK:
        offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, 0, TILES, ROT_WIDTH)
        in_bounds = in_bounds & (offsets < numel)  # plain tensors: the last row is partial
        x, g, m, v = _load_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds)
        x, m, v = _step_chunk(
            x, g, m, v, in_bounds, 0.0, n_cols, rot,
            decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
            cage_lambda, cage_step, alpha, inv_sqrt_block,
            BLOCK_ROWS, TILES, ROT_WIDTH, LERP_SMALL_WEIGHT, CAGE, COUPLED, True, HADAMARD,
            LEVELS, RMS_EPS, X_DOT_DTYPE, LEVEL_DOT_DTYPE,
        )
        _store_chunk(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, x, m, v)
    else:
        # Sweep 1 (only quantized tensors have rows longer than a chunk): the row's sum
        # of squares of the tensor Q is taken of.
        sum_squares = tl.zeros((BLOCK_ROWS,), tl.float32)
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            x = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            if not COUPLED:  # dry run of the AdamW update; sweep 2 recomputes it identically
                g = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
                m = tl.load(exp_avg_ptr + offsets, mask=in_bounds, other=0.0)
                v = tl.load(exp_avg_sq_ptr + offsets, mask=in_bounds, other=0.0)
                x, m, v = _adamw_update(
                    x, g, m, v, decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size,
                    bias_correction2_sqrt, eps, LERP_SMALL_WEIGHT,
                )
                x = tl.where(in_bounds, x, 0.0)
            sum_squares += row_sum_squares(x)
        scale = row_scale(sum_squares, n_cols, alpha, RMS_EPS)
        # Sweep 2: the update, chunk by chunk, with the row scale known.
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            x, g, m, v = _load_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds)
            x, m, v = _step_chunk(
                x, g, m, v, in_bounds, scale, n_cols, rot,
                decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
                cage_lambda, cage_step, alpha, inv_sqrt_block,
                BLOCK_ROWS, TILES, ROT_WIDTH, LERP_SMALL_WEIGHT, CAGE, COUPLED, False, HADAMARD,
                LEVELS, RMS_EPS, X_DOT_DTYPE, LEVEL_DOT_DTYPE,
            )
            _store_chunk(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, x, m, v)


# ---- host side --------------------------------------------------------------------------

# Device copies of the tables, keyed by their contents (addresses and shapes): a model
# whose gradients keep their storage reuses them every step without a host-to-device copy.
_TABLE_CACHE: collections.OrderedDict = collections.OrderedDict()
_TABLE_CACHE_SIZE = 64


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned + non_blocking: the copy is queued, not waited on
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _launch_tables(records: tuple[int, ...], block_rows: int, device: torch.device):
    """``(tensor table, tile table, number of tiles)`` on ``device``, cached."""
    key = (records, block_rows, str(device))
    cached = _TABLE_CACHE.get(key)
    if cached is not None:
        _TABLE_CACHE.move_to_end(key)
        return cached
    tensor_table = torch.tensor(records, dtype=torch.int64)
    tiles_per_tensor = (tensor_table.view(-1, RECORD)[:, 4] + block_rows - 1) // block_rows
    tensor_index = torch.repeat_interleave(torch.arange(len(tiles_per_tensor)), tiles_per_tensor)
    first_tile = torch.cumsum(tiles_per_tensor, 0) - tiles_per_tensor
    first_row = (torch.arange(len(tensor_index)) - first_tile[tensor_index]) * block_rows
    tile_table = torch.stack([tensor_index, first_row], dim=1).reshape(-1)
    cached = (_to_device(tensor_table, device), _to_device(tile_table, device), len(tensor_index))
    _TABLE_CACHE[key] = cached
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return cached


def _kernel_can_step(p: torch.Tensor, grad: torch.Tensor, state: dict, quant) -> bool:
    """What the kernel handles; anything else takes the torch reference step."""
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    moment_ok = exp_avg.dtype == exp_avg_sq.dtype == torch.promote_types(p.dtype, torch.float32)
    return (
        p.dtype in PARAM_DTYPES
        and grad.dtype in PARAM_DTYPES
        and moment_ok
        and p.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()
        and grad.device == p.device == exp_avg.device == exp_avg_sq.device
        and (quant is None or not quant.hadamard or quant.block_size <= MAX_KERNEL_BLOCK)
    )


def _launch_bucket(items, blocking, *, cage, quant, coupled, lr, lam, beta1, beta2, eps, weight_decay, step):
    p0, g0, exp_avg0, _ = items[0]
    device = p0.device
    records = []
    for p, grad, exp_avg, exp_avg_sq in items:
        if cage:  # a program owns whole rows of the matrix
            n_cols = p.shape[-1]
            n_rows = p.numel() // n_cols
        else:  # plain AdamW: any rows will do
            n_cols = blocking.chunk_width
            n_rows = triton.cdiv(p.numel(), n_cols)
        records += [p.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                    n_rows, n_cols, p.numel(), 0]
    tensor_table, tile_table, n_tiles = _launch_tables(tuple(records), blocking.block_rows, device)

    interpreted = is_interpreted(_adamw_cage_kernel)
    hadamard = cage and quant.hadamard
    rot, inv_sqrt_block = load_rotation_args(hadamard, quant.block_size if hadamard else 1, device, dummy=tile_table)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    beta1_weight = 1 - beta1
    _adamw_cage_kernel[(n_tiles,)](
        tensor_table, tile_table, rot,
        1 - lr * weight_decay, beta1_weight, beta2, 1 - beta2, -(lr / bias_correction1),
        bias_correction2**0.5, eps,
        lam, lr * lam, quant.alpha if cage else 0.0, inv_sqrt_block,
        PARAM_DTYPE=tl_dtype(p0.dtype), GRAD_DTYPE=tl_dtype(g0.dtype), MOMENT_DTYPE=tl_dtype(exp_avg0.dtype),
        BLOCK_ROWS=blocking.block_rows, TILES=blocking.tiles, ROT_WIDTH=blocking.rot_width,
        SINGLE_CHUNK=blocking.single_chunk, LERP_SMALL_WEIGHT=abs(beta1_weight) < 0.5,
        CAGE=cage, COUPLED=coupled, HADAMARD=hadamard, LEVELS=quant.levels if cage else 2,
        RMS_EPS=RMS_EPS, X_DOT_DTYPE=tl.float32, LEVEL_DOT_DTYPE=level_dot_dtype(interpreted),
        num_warps=blocking.num_warps,
    )


def adamw_cage_step_group(group: dict, params, states, lambda_at) -> None:
    """One CAGE-AdamW step of every param (with a gradient) of ``group``, in place.

    Same math as ``cage.naive.adamw_cage_step`` per parameter. ``states[i]["step"]`` is
    the CPU step counter, already incremented; ``lambda_at(step, group)`` gives lambda_t.
    """
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    quant = group["quant"]
    coupled = group["coupling"] == "coupled"
    interpreted = is_interpreted(_adamw_cage_kernel)
    buckets: dict[tuple, list] = collections.defaultdict(list)
    for param, full_state in zip(params, states):
        # FSDP2 shards (DTensor) are stepped through their local views; rows are whole
        # on every process (CAGEAdamW checks the sharding)
        p, grad = local_tensor(param), local_tensor(param.grad)
        state = {key: local_tensor(value) for key, value in full_state.items()}
        step = int(state["step"].item())  # a CPU tensor: no device sync
        lam = float(lambda_at(step, group))
        cage = quant is not None and lam != 0
        if grad.layout != torch.strided or not _kernel_can_step(p, grad, state, quant if cage else None):
            naive.adamw_cage_step(
                p, grad, state["exp_avg"], state["exp_avg_sq"], step, lr=lr, beta1=beta1, beta2=beta2,
                eps=eps, weight_decay=weight_decay, quant=quant, cage_lambda=lam, coupling=group["coupling"],
            )
            continue
        if cage:
            n_cols = p.shape[-1]
            # n_rows is not a blocking input here, so that matrices of one width share a launch
            blocking = plan_rows(
                1 << 30, n_cols, quant_rot_width(quant.hadamard, quant.block_size, n_cols),
                uses_dot=quant.hadamard, interpreted=interpreted,
            )
        else:
            blocking = plan_rows(
                1 << 30, PLAIN_ROW, PLAIN_TILE_WIDTH, uses_dot=False, interpreted=interpreted, max_chunk=PLAIN_ROW
            )
        if not blocking.single_chunk:
            # the kernel loops over a row's chunks at run time: longer rows share the launch
            blocking = dataclasses.replace(blocking, n_chunks=2)
        key = (step, lam, cage, p.dtype, grad.dtype, p.device, blocking)
        buckets[key].append((p, grad.contiguous(), state["exp_avg"], state["exp_avg_sq"]))
    for (step, lam, cage, *_rest, blocking), items in buckets.items():
        _launch_bucket(
            items, blocking, cage=cage, quant=quant, coupled=coupled, lr=lr, lam=lam, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
        )

"""Fused multi-tensor AdamW + CAGE step (SPEC 2): one launch per bucket of tensors that
share dtypes and row blocking, many tensors per launch.

Multi-tensor addressing: a per-tensor table (int64 records: param, grad, exp_avg,
exp_avg_sq addresses, rows, columns, numel) and a per-program tile table (tensor index,
first row). A program owns ``BLOCK_ROWS`` whole rows of one tensor and walks them in
chunks of ``[BLOCK_ROWS, TILES, ROT_WIDTH]`` (``tiling.plan_rows``): registers never
hold more than one chunk of each stream, whatever the row length.

- plain AdamW (no quantizer, or lambda_t = 0): the tensor is viewed as rows of one chunk.
- decoupled: AdamW, then ``x <- x - lr * lambda_t * (x - Q(x))`` with Q of the updated row
  and that row's own scale ``alpha * rms`` (``rms(x_h) = rms(x)``, SPEC 1).
- coupled: ``g <- g + lambda_t * (x - Q(x))`` with x before the step, then AdamW.

A row block that fits one chunk is read once (28 B per fp32 parameter). A longer one is
swept twice. Decoupled: sweep 1 reads p, g, m, v, stores the new moments and sums the
squares of the updated weights; sweep 2 reads p and the new moments, recomputes the
updated weights (AdamW's parameter update needs nothing else, and the same operations
give the same bits), quantizes and stores p: 40 B per parameter from DRAM, 28 B when the
second sweep's 12 B hit L2. Coupled: sweep 1 reads p for the sum of squares, sweep 2 is
the whole step: 32 B (28 B from L2).

All math is fp32; lr, lambda_t and the bias corrections arrive as scalars computed on
the host from the CPU step counters: no device sync. ``found_inf`` (a device flag,
nonzero: skip) masks every load and store of the launch, so a step with a non-finite
gradient changes nothing, again without a sync. The AdamW part follows torch's
single-tensor CPU path op for op, including where its kernels fuse a multiply-add (lerp,
addcmul, sub with alpha), so fp32 results match it bit for bit when lambda_t = 0.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from . import tiling
from .fake_quant import check_quantizer_args, step_divisor
from .hadamard import load_rotation, load_rotation_args
from .launch import Launch
from .quant_math import (
    add_scaled_squares,
    chunk_offsets,
    quantize_chunk,
    row_scale,
    scaled_sum_squares,
    store_rounded,
    sweep_sum_squares,
)
from .tiling import (
    CHUNK_ELEMS_COMPILED,
    CHUNK_ELEMS_INTERPRETED,
    PLAIN_TILE_WIDTH,
    RowTiling,
    cdiv,
    is_interpreted,
    plan_rows,
    quant_rot_width,
    split_parts,
    tl_dtype,
)

RECORD = tl.constexpr(8)  # int64 fields per tensor in the tensor table (7 used, padded)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _adamw_moments(g, m, v, beta1_weight, beta2, one_minus_beta2, LERP_SMALL_WEIGHT: tl.constexpr):
    """torch.optim.AdamW's moment updates on fp32 values; returns ``(m, v)``.

    Scalars are splat to full tiles before tl.fma: older Triton does not broadcast them."""
    if LERP_SMALL_WEIGHT:  # exp_avg.lerp_(g, w), as ATen's vector lerp: fma(w, g - m, m)
        m = tl.fma(beta1_weight + tl.zeros_like(m), g - m, m)
    else:  # the other branch of ATen's lerp: fma(w - 1, g - m, g)
        m = tl.fma((beta1_weight - 1.0) + tl.zeros_like(m), g - m, g)
    v = v * beta2
    v = tl.fma(one_minus_beta2 * g, g, v)  # addcmul_(g, g, value=1 - beta2)
    return m, v


@triton.jit
def _load_grad(grad_ptr, offsets, in_bounds, grad_scale, UNSCALE_GRAD: tl.constexpr):
    """The gradient in fp32, divided by the loss scale when a GradScaler scaled it (IEEE
    division, as torch's fused AdamW: ``grad / grad_scale``)."""
    g = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if UNSCALE_GRAD:
        g = tl.div_rn(g, grad_scale + tl.zeros_like(g))
    return g


@triton.jit
def _update_moments(g, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, beta1_weight, beta2, one_minus_beta2,
                    LERP_SMALL_WEIGHT: tl.constexpr):
    """Load, update and store the moments of a chunk; returns the new ``(m, v)``."""
    m = tl.load(exp_avg_ptr + offsets, mask=in_bounds, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=in_bounds, other=0.0)
    m, v = _adamw_moments(g, m, v, beta1_weight, beta2, one_minus_beta2, LERP_SMALL_WEIGHT)
    tl.store(exp_avg_ptr + offsets, m, mask=in_bounds)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=in_bounds)
    return m, v


@triton.jit
def _adamw_param(x, m, v, decay_factor, neg_step_size, bias_correction2_sqrt, eps):
    """torch.optim.AdamW's parameter update from the new moments (no fused multiply-add:
    torch's mul_ and addcdiv_ round separately)."""
    x = x * decay_factor
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt + tl.zeros_like(v)) + eps
    return x + tl.div_rn(neg_step_size * m, denom)  # addcdiv_(m, denom, value=-step_size)


@triton.jit
def _step_chunk(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, scale, n_cols, rot,
    decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
    cage_lambda, cage_step, alpha, step_divisor, inv_sqrt_block, rms_eps, grad_scale,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr, LERP_SMALL_WEIGHT: tl.constexpr,
    CAGE: tl.constexpr, COUPLED: tl.constexpr, SCALE_FROM_CHUNK: tl.constexpr, HADAMARD: tl.constexpr,
    X_SPLIT: tl.constexpr, UNSCALE_GRAD: tl.constexpr, INTEGER_GRID: tl.constexpr,
):
    """AdamW (+ CAGE) on a chunk read whole, stored back: ``scale`` is the row scale unless
    SCALE_FROM_CHUNK (the chunk is the whole row block; the scale is computed here). The
    moments are stored as soon as they are known, so they hold no registers during Q."""
    x = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    g = _load_grad(grad_ptr, offsets, in_bounds, grad_scale, UNSCALE_GRAD)
    if CAGE and COUPLED:
        if SCALE_FROM_CHUNK:
            sum_squares, power = scaled_sum_squares(x)
            scale = row_scale(sum_squares, power, n_cols, alpha, rms_eps)
        q, keep = quantize_chunk(
            x, rot, scale, inv_sqrt_block, step_divisor, 0.0, 0.0, BLOCK_ROWS, TILES, ROT_WIDTH,
            HADAMARD, True, False, X_SPLIT, INTEGER_GRID,
        )
        g = g + cage_lambda * (x - q)
    m, v = _update_moments(g, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, beta1_weight, beta2, one_minus_beta2,
                           LERP_SMALL_WEIGHT)
    x = _adamw_param(x, m, v, decay_factor, neg_step_size, bias_correction2_sqrt, eps)
    if CAGE and not COUPLED:
        x = tl.where(in_bounds, x, 0.0)  # padding lanes must not reach the row sum or the dot
        if SCALE_FROM_CHUNK:
            sum_squares, power = scaled_sum_squares(x)
            scale = row_scale(sum_squares, power, n_cols, alpha, rms_eps)
        x = _decoupled_correction(
            x, rot, scale, inv_sqrt_block, step_divisor, cage_step, BLOCK_ROWS, TILES, ROT_WIDTH, HADAMARD,
            INTEGER_GRID,
        )
    store_rounded(param_ptr + offsets, x, in_bounds)


@triton.jit
def _decoupled_correction(
    x, rot, scale, inv_sqrt_block, step_divisor, cage_step,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr, HADAMARD: tl.constexpr,
    INTEGER_GRID: tl.constexpr,
):
    """``x - lr * lambda_t * (x - Q(x))`` (x: fp32, any value: three bf16 parts)."""
    q, keep = quantize_chunk(
        x, rot, scale, inv_sqrt_block, step_divisor, 0.0, 0.0, BLOCK_ROWS, TILES, ROT_WIDTH, HADAMARD, True, False, 3,
        INTEGER_GRID,
    )
    return tl.fma(tl.zeros_like(x) - cage_step, x - q, x)  # sub_(x - q, alpha=lr * lambda)


@triton.jit
def _adamw_cage_kernel(
    tensor_table, tile_table, rot_ptr, found_inf_ptr, grad_scale_ptr,
    decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
    cage_lambda, cage_step, alpha, step_divisor, inv_sqrt_block, rms_eps,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    LERP_SMALL_WEIGHT: tl.constexpr, CAGE: tl.constexpr, COUPLED: tl.constexpr, HADAMARD: tl.constexpr,
    X_SPLIT: tl.constexpr, CHECK_FOUND_INF: tl.constexpr, UNSCALE_GRAD: tl.constexpr, VEC: tl.constexpr,
    PARAM_BYTES: tl.constexpr, GRAD_BYTES: tl.constexpr, INTEGER_GRID: tl.constexpr,
):
    tile = tl.program_id(0)
    tensor = tl.load(tile_table + 2 * tile)
    first_row = tl.load(tile_table + 2 * tile + 1)
    record = tensor_table + tensor * RECORD
    # Addresses and row lengths come from the table, so the compiler cannot see their
    # alignment: VEC (checked on the host for every tensor of the launch) lets it
    # vectorize the loads and stores, which also saves most of the address registers.
    param_ptr = tl.multiple_of(tl.load(record).to(tl.pointer_type(PARAM_DTYPE)), VEC * PARAM_BYTES)
    grad_ptr = tl.multiple_of(tl.load(record + 1).to(tl.pointer_type(GRAD_DTYPE)), VEC * GRAD_BYTES)
    exp_avg_ptr = tl.multiple_of(tl.load(record + 2).to(tl.pointer_type(tl.float32)), VEC * 4)
    exp_avg_sq_ptr = tl.multiple_of(tl.load(record + 3).to(tl.pointer_type(tl.float32)), VEC * 4)
    n_rows = tl.load(record + 4)
    n_cols = tl.multiple_of(tl.load(record + 5), VEC)
    numel = tl.multiple_of(tl.load(record + 6), VEC)
    rows = first_row + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    row_ok = rows < n_rows
    if CHECK_FOUND_INF:  # a non-finite gradient anywhere in the step: touch nothing
        row_ok = row_ok & ((tl.zeros((BLOCK_ROWS,), tl.float32) + tl.load(found_inf_ptr)) == 0)
    if CAGE and HADAMARD:
        rot = load_rotation(rot_ptr, ROT_WIDTH)
    else:
        rot = 0.0
    if UNSCALE_GRAD:
        grad_scale = tl.load(grad_scale_ptr)
    else:
        grad_scale = 1.0
    CHUNK_WIDTH: tl.constexpr = TILES * ROT_WIDTH

    if SINGLE_CHUNK:
        offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, 0, TILES, ROT_WIDTH)
        in_bounds = in_bounds & (offsets < numel)  # plain tensors: the last row is partial
        _step_chunk(
            param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, 0.0, n_cols, rot,
            decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
            cage_lambda, cage_step, alpha, step_divisor, inv_sqrt_block, rms_eps, grad_scale,
            BLOCK_ROWS, TILES, ROT_WIDTH, LERP_SMALL_WEIGHT, CAGE, COUPLED, True, HADAMARD, X_SPLIT, UNSCALE_GRAD,
            INTEGER_GRID,
        )
    elif COUPLED:
        # sweep 1: the row sums of squares of x before the step
        sum_squares, power = sweep_sum_squares(param_ptr, rows, row_ok, n_cols, BLOCK_ROWS, TILES, ROT_WIDTH)
        scale = row_scale(sum_squares, power, n_cols, alpha, rms_eps)
        # sweep 2: the whole step, chunk by chunk, with the row scale known
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            _step_chunk(
                param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, scale, n_cols, rot,
                decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
                cage_lambda, cage_step, alpha, step_divisor, inv_sqrt_block, rms_eps, grad_scale,
                BLOCK_ROWS, TILES, ROT_WIDTH, LERP_SMALL_WEIGHT, CAGE, COUPLED, False, HADAMARD, X_SPLIT,
                UNSCALE_GRAD, INTEGER_GRID,
            )
    else:
        # sweep 1: the moments, and the row sums of squares of the AdamW-updated weights
        sum_squares = tl.zeros((BLOCK_ROWS,), tl.float32)
        compensation = tl.zeros((BLOCK_ROWS,), tl.float32)
        power = tl.zeros((BLOCK_ROWS,), tl.float32) + 1.0
        row_max = tl.zeros((BLOCK_ROWS,), tl.float32)
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            x = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            g = _load_grad(grad_ptr, offsets, in_bounds, grad_scale, UNSCALE_GRAD)
            m, v = _update_moments(g, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, beta1_weight, beta2,
                                   one_minus_beta2, LERP_SMALL_WEIGHT)
            x = _adamw_param(x, m, v, decay_factor, neg_step_size, bias_correction2_sqrt, eps)
            sum_squares, compensation, power, row_max = add_scaled_squares(
                sum_squares, compensation, power, row_max, tl.where(in_bounds, x, 0.0)
            )
        scale = row_scale(sum_squares, power, n_cols, alpha, rms_eps)
        # sweep 2: the same updated weights again from p and the new moments, then Q
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            x = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            m = tl.load(exp_avg_ptr + offsets, mask=in_bounds, other=0.0)
            v = tl.load(exp_avg_sq_ptr + offsets, mask=in_bounds, other=0.0)
            x = tl.where(in_bounds, _adamw_param(x, m, v, decay_factor, neg_step_size, bias_correction2_sqrt, eps), 0.0)
            x = _decoupled_correction(
                x, rot, scale, inv_sqrt_block, step_divisor, cage_step, BLOCK_ROWS, TILES, ROT_WIDTH, HADAMARD,
                INTEGER_GRID,
            )
            store_rounded(param_ptr + offsets, x, in_bounds)


# ---- host side --------------------------------------------------------------------------


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned + non_blocking: the copy is queued, not waited on
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


@functools.lru_cache(maxsize=256)
def _tile_table(row_counts: tuple[int, ...], block_rows: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """``(tile table, number of tiles)``: (tensor index, first row) of every program. It holds
    no address, so it is cached by row counts: reallocated gradients never rebuild it."""
    tiles_per_tensor = torch.tensor([cdiv(rows, block_rows) for rows in row_counts], dtype=torch.int64)
    tensor_index = torch.repeat_interleave(torch.arange(len(row_counts)), tiles_per_tensor)
    first_tile = torch.cumsum(tiles_per_tensor, 0) - tiles_per_tensor
    first_row = (torch.arange(len(tensor_index)) - first_tile[tensor_index]) * block_rows
    return _to_device(torch.stack([tensor_index, first_row], dim=1).reshape(-1), device), len(tensor_index)


def plain_row_length(interpreted: bool) -> int:
    """Plain AdamW views a tensor as rows of one chunk."""
    return CHUNK_ELEMS_INTERPRETED if interpreted else CHUNK_ELEMS_COMPILED


def step_blocking(n_cols: int | None, *, hadamard: bool, block_size: int, interpreted: bool) -> RowTiling:
    """Row blocking of a tensor in a launch: its rows (``n_cols``) when CAGE quantizes it,
    rows of one chunk for plain AdamW (``n_cols=None``). Rows longer than a chunk are
    walked at run time, so every tensor of one width (and all plain ones) shares a launch."""
    return _step_blocking(n_cols, hadamard, block_size, interpreted, tiling.ROW_CHUNK_MAX)


@functools.lru_cache(maxsize=1024)
def _step_blocking(n_cols, hadamard, block_size, interpreted, row_chunk_max) -> RowTiling:
    if n_cols is None:  # rows of exactly one chunk
        row = plain_row_length(interpreted)
        blocking = plan_rows(row, PLAIN_TILE_WIDTH, uses_dot=False, interpreted=interpreted)
        return dataclasses.replace(blocking, n_chunks=1)
    blocking = plan_rows(n_cols, quant_rot_width(hadamard, block_size, n_cols),
                         uses_dot=hadamard, interpreted=interpreted)
    return blocking if blocking.single_chunk else dataclasses.replace(blocking, n_chunks=2)


def alignment(p, g, m, v, n_cols: int) -> int:
    """Largest VEC in 1, 2, 4, 8, 16 such that the row length, the element count and every
    address of the tensor's streams are multiples of VEC elements (torch's allocations
    of sizes in multiples of 16 always are)."""
    addresses = [(t.data_ptr(), t.element_size()) for t in (p, g, m, v)]
    numel = p.numel()
    vec = 16
    while vec > 1 and (n_cols % vec or numel % vec or any(ptr % (vec * size) for ptr, size in addresses)):
        vec //= 2
    return vec


@functools.lru_cache(maxsize=1024)
def _step_kernel_launch(n_tiles, blocking, param_dtype, grad_dtype, vec, lerp_small_weight, cage, coupled, hadamard,
                        check_found_inf, unscale_grad, integer_grid=False):
    return Launch.of(
        _adamw_cage_kernel, (n_tiles,), blocking,
        PARAM_DTYPE=tl_dtype(param_dtype), GRAD_DTYPE=tl_dtype(grad_dtype),
        BLOCK_ROWS=blocking.block_rows, TILES=blocking.tiles, ROT_WIDTH=blocking.rot_width,
        SINGLE_CHUNK=blocking.single_chunk, LERP_SMALL_WEIGHT=lerp_small_weight,
        CAGE=cage, COUPLED=cage and coupled, HADAMARD=cage and hadamard,
        X_SPLIT=split_parts(param_dtype), CHECK_FOUND_INF=check_found_inf, UNSCALE_GRAD=unscale_grad, VEC=vec,
        PARAM_BYTES=param_dtype.itemsize, GRAD_BYTES=grad_dtype.itemsize, INTEGER_GRID=cage and integer_grid,
    )


def step_launch(tensor_table, tile_table, rot, found_inf, n_tiles, blocking: RowTiling, *, param_dtype, grad_dtype,
                vec: int, lr, beta1, beta2, eps, weight_decay, step, cage_lambda, coupled, levels, alpha, hadamard,
                block_size, rms_eps, grad_scale=None, integer_grid=False):
    """``(Launch, args)`` of one bucket; the tensors may be dtypes (compile gate)."""
    cage = levels is not None and cage_lambda != 0
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    beta1_weight = 1 - beta1
    launch = _step_kernel_launch(n_tiles, blocking, param_dtype, grad_dtype, vec, abs(beta1_weight) < 0.5, cage,
                                 coupled, hadamard, found_inf is not None, grad_scale is not None, integer_grid)
    args = (
        tensor_table, tile_table, rot, found_inf if found_inf is not None else tile_table,
        grad_scale if grad_scale is not None else tile_table,
        1 - lr * weight_decay, beta1_weight, beta2, 1 - beta2, -(lr / bias_correction1), bias_correction2**0.5, eps,
        float(cage_lambda), lr * cage_lambda, alpha if cage else 0.0, step_divisor(levels, integer_grid) if cage else 1.0,
        1.0 / block_size**0.5 if cage and hadamard else 1.0, rms_eps,
    )
    return launch, args


def kernel_can_step(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    """What the kernel takes: float params and grads, contiguous tensors with fp32 moments, one device."""
    return (
        p.dtype in PARAM_DTYPES and grad.dtype in PARAM_DTYPES
        and exp_avg.dtype == exp_avg_sq.dtype == torch.float32
        and p.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()
        and grad.layout == torch.strided
        and grad.device == p.device == exp_avg.device == exp_avg_sq.device
    )


class _Bucket:
    """Tensors of one launch: the same dtypes, device, row blocking and alignment. ``members``
    are their positions in the plan's input lists; ``records`` the tensor table's contents."""

    __slots__ = ("param_dtype", "grad_dtype", "device", "blocking", "vec", "members", "records", "tensor_table",
                 "tile_table", "n_tiles", "rot")

    def __init__(self, param_dtype, grad_dtype, device, blocking, vec, members, records, tile_table, n_tiles, rot):
        self.param_dtype, self.grad_dtype, self.device, self.blocking, self.vec = (
            param_dtype, grad_dtype, device, blocking, vec)
        self.members, self.records = members, records
        self.tensor_table = _to_device(torch.tensor(records, dtype=torch.int64), device)
        self.tile_table, self.n_tiles, self.rot = tile_table, n_tiles, rot


class StepPlan:
    """The launches of one fused step over fixed tensors, planned once and launched every step.

    The tensor table holds the tensors' addresses: a plan is valid while the same storage
    holds every param, grad and moment. The caller owns that check (``cage.ops.adamw_cage``
    keys its plans by the addresses) and keeps no reference to the gradients, so that the
    caching allocator can hand the next step's gradients the same blocks; when it hands
    others, :meth:`retarget` rewrites the gradients' addresses without planning again.
    ``cage`` chooses the kernel variant: ``levels``/``alpha``/``hadamard``/``block_size``
    describe the quantizer of every tensor (each a matrix quantized per row), and
    ``cage=False`` is plain AdamW.
    """

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, *, cage: bool = False, levels: int | None = None,
                 alpha: float | None = None, hadamard: bool = True, block_size: int = 128, integer_grid: bool = False):
        interpreted = is_interpreted(_adamw_cage_kernel)
        self.cage, self.levels, self.alpha = cage, levels, alpha
        self.hadamard, self.block_size, self.integer_grid = hadamard, block_size, integer_grid
        groups: dict[tuple, list] = collections.defaultdict(list)
        for index, (p, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            if not kernel_can_step(p, grad, exp_avg, exp_avg_sq):
                raise ValueError(
                    "cage_kernels.adamw_cage_step: every tensor needs float32/bfloat16/float16 params and grads, "
                    "contiguous tensors and float32 moments, all on one device; got param "
                    f"{p.dtype} {tuple(p.shape)} on {p.device}, grad {grad.dtype} "
                    f"(contiguous: {grad.is_contiguous()}), moments {exp_avg.dtype}"
                )
            if cage:
                check_quantizer_args(p.dtype, levels, alpha, hadamard, block_size, 0, p.shape[-1], integer_grid)
            blocking = step_blocking(p.shape[-1] if cage else None, hadamard=hadamard, block_size=block_size,
                                     interpreted=interpreted)
            n_cols = p.shape[-1] if cage else blocking.chunk_width
            vec = alignment(p, grad, exp_avg, exp_avg_sq, n_cols)
            groups[(p.dtype, grad.dtype, p.device, blocking, vec)].append(
                (index, p.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), p.numel(), n_cols))
        self.size = len(params)
        self.buckets = []
        for (param_dtype, grad_dtype, device, blocking, vec), items in groups.items():
            records = []
            for _, p_ptr, g_ptr, m_ptr, v_ptr, numel, n_cols in items:
                records += [p_ptr, g_ptr, m_ptr, v_ptr, cdiv(numel, n_cols), n_cols, numel, 0]
            tile_table, n_tiles = _tile_table(tuple(records[4::RECORD.value]), blocking.block_rows, device)
            rot, _ = load_rotation_args(cage and hadamard, block_size, device, dummy=tile_table,
                                        interpreted=interpreted)
            self.buckets.append(_Bucket(param_dtype, grad_dtype, device, blocking, vec, [it[0] for it in items],
                                        records, tile_table, n_tiles, rot))

    def retarget(self, grad_addresses: list[int]) -> bool:
        """Point the plan at gradients that moved (``grad_addresses``: one per input tensor, in
        the order the plan was built with; same shapes and dtypes). False, changing nothing,
        when an address breaks a bucket's vector alignment: then plan again."""
        for b in self.buckets:
            unit = b.vec * b.grad_dtype.itemsize
            if any(grad_addresses[i] % unit for i in b.members):
                return False
        for b in self.buckets:
            b.records[1::RECORD.value] = [grad_addresses[i] for i in b.members]
            b.tensor_table = _to_device(torch.tensor(b.records, dtype=torch.int64), b.device)
        return True

    def __call__(self, *, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 cage_lambda: float = 0.0, coupled: bool = False, rms_eps: float = 1e-20,
                 found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> None:
        """One step of every tensor of the plan (``step`` counts from 1). ``found_inf``: a
        one-element flag, nonzero leaves everything unchanged; ``grad_scale``: a one-element
        loss scale the gradients are divided by (torch's fused-AdamW protocol). Both stay on
        the device (moved there if they are elsewhere: no host read)."""
        if self.cage and cage_lambda == 0:
            raise ValueError("cage_kernels.StepPlan: a CAGE plan needs cage_lambda != 0; plan plain AdamW instead")
        levels = self.levels if self.cage else None
        for b in self.buckets:
            flag = found_inf if found_inf is None or found_inf.device == b.device else found_inf.to(b.device)
            scale = grad_scale if grad_scale is None or grad_scale.device == b.device else grad_scale.to(b.device)
            launch, args = step_launch(
                b.tensor_table, b.tile_table, b.rot, flag, b.n_tiles, b.blocking, param_dtype=b.param_dtype,
                grad_dtype=b.grad_dtype, vec=b.vec, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, step=step, cage_lambda=cage_lambda if self.cage else 0.0, coupled=coupled,
                levels=levels, alpha=self.alpha, hadamard=self.hadamard, block_size=self.block_size,
                rms_eps=rms_eps, grad_scale=scale, integer_grid=self.integer_grid,
            )
            launch(*args)


def adamw_cage_step(
    params, grads, exp_avgs, exp_avg_sqs, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, cage_lambda: float = 0.0, coupled: bool = False, levels: int | None = None,
    alpha: float | None = None, hadamard: bool = True, block_size: int = 128, rms_eps: float = 1e-20,
    found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None, integer_grid: bool = False,
) -> None:
    """One AdamW (+ CAGE) step of every tensor, in place, sharing hyperparameters and step:
    a :class:`StepPlan` built and launched once (callers that step the same tensors again
    keep the plan instead).

    ``levels``/``alpha``/``hadamard``/``block_size`` describe the quantizer (``levels``
    None: plain AdamW); with ``cage_lambda != 0`` every tensor is a matrix quantized per
    row. ``step`` counts from 1. ``found_inf``: an optional one-element device tensor; a
    nonzero value makes the launch change nothing. ``grad_scale``: an optional one-element
    device tensor the gradients are divided by. Tensors must pass ``kernel_can_step``.
    """
    cage = levels is not None and cage_lambda != 0
    plan = StepPlan(params, grads, exp_avgs, exp_avg_sqs, cage=cage, levels=levels, alpha=alpha, hadamard=hadamard,
                    block_size=block_size, integer_grid=integer_grid)
    plan(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, cage_lambda=cage_lambda,
         coupled=coupled, rms_eps=rms_eps, found_inf=found_inf, grad_scale=grad_scale)

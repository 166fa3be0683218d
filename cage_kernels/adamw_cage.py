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

import torch
import triton
import triton.language as tl

from .fake_quant import check_quantizer_args
from .hadamard import load_rotation, load_rotation_args
from .launch import Launch
from .quant_math import (
    chunk_offsets,
    compensated_add,
    quantize_chunk,
    row_scale,
    row_sum_squares,
    store_rounded,
    sweep_sum_squares,
)
from .tiling import (
    CHUNK_ELEMS_COMPILED,
    CHUNK_ELEMS_INTERPRETED,
    PLAIN_TILE_WIDTH,
    RowTiling,
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
    cage_lambda, cage_step, alpha, step_divisor, inv_sqrt_block, rms_eps,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr, LERP_SMALL_WEIGHT: tl.constexpr,
    CAGE: tl.constexpr, COUPLED: tl.constexpr, SCALE_FROM_CHUNK: tl.constexpr, HADAMARD: tl.constexpr,
    X_SPLIT: tl.constexpr,
):
    """AdamW (+ CAGE) on a chunk read whole, stored back: ``scale`` is the row scale unless
    SCALE_FROM_CHUNK (the chunk is the whole row block; the scale is computed here). The
    moments are stored as soon as they are known, so they hold no registers during Q."""
    x = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if CAGE and COUPLED:
        if SCALE_FROM_CHUNK:
            scale = row_scale(row_sum_squares(x), n_cols, alpha, rms_eps)
        q, keep = quantize_chunk(
            x, rot, scale, inv_sqrt_block, step_divisor, 0.0, 0.0, BLOCK_ROWS, TILES, ROT_WIDTH,
            HADAMARD, True, False, X_SPLIT,
        )
        g = g + cage_lambda * (x - q)
    m, v = _update_moments(g, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, beta1_weight, beta2, one_minus_beta2,
                           LERP_SMALL_WEIGHT)
    x = _adamw_param(x, m, v, decay_factor, neg_step_size, bias_correction2_sqrt, eps)
    if CAGE and not COUPLED:
        x = tl.where(in_bounds, x, 0.0)  # padding lanes must not reach the row sum or the dot
        if SCALE_FROM_CHUNK:
            scale = row_scale(row_sum_squares(x), n_cols, alpha, rms_eps)
        x = _decoupled_correction(
            x, rot, scale, inv_sqrt_block, step_divisor, cage_step, BLOCK_ROWS, TILES, ROT_WIDTH, HADAMARD,
        )
    store_rounded(param_ptr + offsets, x, in_bounds)


@triton.jit
def _decoupled_correction(
    x, rot, scale, inv_sqrt_block, step_divisor, cage_step,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr, HADAMARD: tl.constexpr,
):
    """``x - lr * lambda_t * (x - Q(x))`` (x: fp32, any value: three bf16 parts)."""
    q, keep = quantize_chunk(
        x, rot, scale, inv_sqrt_block, step_divisor, 0.0, 0.0, BLOCK_ROWS, TILES, ROT_WIDTH, HADAMARD, True, False, 3,
    )
    return tl.fma(tl.zeros_like(x) - cage_step, x - q, x)  # sub_(x - q, alpha=lr * lambda)


@triton.jit
def _adamw_cage_kernel(
    tensor_table, tile_table, rot_ptr, found_inf_ptr,
    decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
    cage_lambda, cage_step, alpha, step_divisor, inv_sqrt_block, rms_eps,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    LERP_SMALL_WEIGHT: tl.constexpr, CAGE: tl.constexpr, COUPLED: tl.constexpr, HADAMARD: tl.constexpr,
    X_SPLIT: tl.constexpr, CHECK_FOUND_INF: tl.constexpr, VEC: tl.constexpr,
    PARAM_BYTES: tl.constexpr, GRAD_BYTES: tl.constexpr,
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
    CHUNK_WIDTH: tl.constexpr = TILES * ROT_WIDTH

    if SINGLE_CHUNK:
        offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, 0, TILES, ROT_WIDTH)
        in_bounds = in_bounds & (offsets < numel)  # plain tensors: the last row is partial
        _step_chunk(
            param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, 0.0, n_cols, rot,
            decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
            cage_lambda, cage_step, alpha, step_divisor, inv_sqrt_block, rms_eps,
            BLOCK_ROWS, TILES, ROT_WIDTH, LERP_SMALL_WEIGHT, CAGE, COUPLED, True, HADAMARD, X_SPLIT,
        )
    elif COUPLED:
        # sweep 1: the row sums of squares of x before the step
        scale = row_scale(sweep_sum_squares(param_ptr, rows, row_ok, n_cols, BLOCK_ROWS, TILES, ROT_WIDTH),
                          n_cols, alpha, rms_eps)
        # sweep 2: the whole step, chunk by chunk, with the row scale known
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            _step_chunk(
                param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, scale, n_cols, rot,
                decay_factor, beta1_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
                cage_lambda, cage_step, alpha, step_divisor, inv_sqrt_block, rms_eps,
                BLOCK_ROWS, TILES, ROT_WIDTH, LERP_SMALL_WEIGHT, CAGE, COUPLED, False, HADAMARD, X_SPLIT,
            )
    else:
        # sweep 1: the moments, and the row sums of squares of the AdamW-updated weights
        sum_squares = tl.zeros((BLOCK_ROWS,), tl.float32)
        compensation = tl.zeros((BLOCK_ROWS,), tl.float32)
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            x = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            m, v = _update_moments(g, exp_avg_ptr, exp_avg_sq_ptr, offsets, in_bounds, beta1_weight, beta2,
                                   one_minus_beta2, LERP_SMALL_WEIGHT)
            x = _adamw_param(x, m, v, decay_factor, neg_step_size, bias_correction2_sqrt, eps)
            sum_squares, compensation = compensated_add(
                sum_squares, compensation, row_sum_squares(tl.where(in_bounds, x, 0.0))
            )
        scale = row_scale(sum_squares, n_cols, alpha, rms_eps)
        # sweep 2: the same updated weights again from p and the new moments, then Q
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            x = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            m = tl.load(exp_avg_ptr + offsets, mask=in_bounds, other=0.0)
            v = tl.load(exp_avg_sq_ptr + offsets, mask=in_bounds, other=0.0)
            x = tl.where(in_bounds, _adamw_param(x, m, v, decay_factor, neg_step_size, bias_correction2_sqrt, eps), 0.0)
            x = _decoupled_correction(
                x, rot, scale, inv_sqrt_block, step_divisor, cage_step, BLOCK_ROWS, TILES, ROT_WIDTH, HADAMARD,
            )
            store_rounded(param_ptr + offsets, x, in_bounds)


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
    tiles_per_tensor = (tensor_table.view(-1, RECORD.value)[:, 4] + block_rows - 1) // block_rows
    tensor_index = torch.repeat_interleave(torch.arange(len(tiles_per_tensor)), tiles_per_tensor)
    first_tile = torch.cumsum(tiles_per_tensor, 0) - tiles_per_tensor
    first_row = (torch.arange(len(tensor_index)) - first_tile[tensor_index]) * block_rows
    tile_table = torch.stack([tensor_index, first_row], dim=1).reshape(-1)
    cached = (_to_device(tensor_table, device), _to_device(tile_table, device), len(tensor_index))
    _TABLE_CACHE[key] = cached
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return cached


def plain_row_length(interpreted: bool) -> int:
    """Plain AdamW views a tensor as rows of one chunk."""
    return CHUNK_ELEMS_INTERPRETED if interpreted else CHUNK_ELEMS_COMPILED


def step_blocking(n_cols: int | None, *, hadamard: bool, block_size: int, interpreted: bool) -> RowTiling:
    """Row blocking of a tensor in a launch: its rows (``n_cols``) when CAGE quantizes it,
    rows of one chunk for plain AdamW (``n_cols=None``). Rows longer than a chunk are
    walked at run time, so every tensor of one width (and all plain ones) shares a launch."""
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
    vec = 16
    while vec > 1 and not (
        n_cols % vec == 0 and p.numel() % vec == 0
        and all(t.data_ptr() % (vec * t.element_size()) == 0 for t in (p, g, m, v))
    ):
        vec //= 2
    return vec


def step_launch(tensor_table, tile_table, rot, found_inf, n_tiles, blocking: RowTiling, *, param_dtype, grad_dtype,
                vec: int, lr, beta1, beta2, eps, weight_decay, step, cage_lambda, coupled, levels, alpha, hadamard,
                block_size, rms_eps):
    """``(Launch, args)`` of one bucket; the tensors may be dtypes (compile gate)."""
    cage = levels is not None and cage_lambda != 0
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    beta1_weight = 1 - beta1
    launch = Launch.of(
        _adamw_cage_kernel, (n_tiles,), blocking,
        PARAM_DTYPE=tl_dtype(param_dtype), GRAD_DTYPE=tl_dtype(grad_dtype),
        BLOCK_ROWS=blocking.block_rows, TILES=blocking.tiles, ROT_WIDTH=blocking.rot_width,
        SINGLE_CHUNK=blocking.single_chunk, LERP_SMALL_WEIGHT=abs(beta1_weight) < 0.5,
        CAGE=cage, COUPLED=cage and coupled, HADAMARD=cage and hadamard,
        X_SPLIT=split_parts(param_dtype), CHECK_FOUND_INF=found_inf is not None, VEC=vec,
        PARAM_BYTES=param_dtype.itemsize, GRAD_BYTES=grad_dtype.itemsize,
    )
    args = (
        tensor_table, tile_table, rot, found_inf if found_inf is not None else tile_table,
        1 - lr * weight_decay, beta1_weight, beta2, 1 - beta2, -(lr / bias_correction1), bias_correction2**0.5, eps,
        float(cage_lambda), lr * cage_lambda, alpha if cage else 0.0, float(levels - 1) if cage else 1.0,
        1.0 / block_size**0.5 if cage and hadamard else 1.0, rms_eps,
    )
    return launch, args


def kernel_can_step(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    """What the kernel takes: float params and grads, fp32 contiguous moments, one device."""
    return (
        p.dtype in PARAM_DTYPES and grad.dtype in PARAM_DTYPES
        and exp_avg.dtype == exp_avg_sq.dtype == torch.float32
        and p.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()
        and grad.layout == torch.strided
        and grad.device == p.device == exp_avg.device == exp_avg_sq.device
    )


def adamw_cage_step(
    params, grads, exp_avgs, exp_avg_sqs, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, cage_lambda: float = 0.0, coupled: bool = False, levels: int | None = None,
    alpha: float | None = None, hadamard: bool = True, block_size: int = 128, rms_eps: float = 1e-20,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdamW (+ CAGE) step of every tensor, in place, sharing hyperparameters and step.

    ``levels``/``alpha``/``hadamard``/``block_size`` describe the quantizer (``levels``
    None: plain AdamW); with ``cage_lambda != 0`` every tensor is a matrix quantized per
    row. ``step`` counts from 1. ``found_inf``: an optional one-element device tensor; a
    nonzero value makes the launch change nothing. Tensors must pass ``kernel_can_step``.
    """
    interpreted = is_interpreted(_adamw_cage_kernel)
    cage = levels is not None and cage_lambda != 0
    buckets: dict[tuple, list] = collections.defaultdict(list)
    for p, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        if not kernel_can_step(p, grad, exp_avg, exp_avg_sq):
            raise ValueError(
                "cage_kernels.adamw_cage_step: every tensor needs float32/bfloat16/float16 params and grads, "
                "contiguous params and float32 moments, all on one device; got param "
                f"{p.dtype} {tuple(p.shape)} on {p.device}, grad {grad.dtype}, moments {exp_avg.dtype}"
            )
        if cage:
            check_quantizer_args(p.dtype, levels, alpha, hadamard, block_size, 0, p.shape[-1])
        blocking = step_blocking(p.shape[-1] if cage else None, hadamard=hadamard, block_size=block_size,
                                 interpreted=interpreted)
        grad = grad.contiguous()
        vec = alignment(p, grad, exp_avg, exp_avg_sq, p.shape[-1] if cage else blocking.chunk_width)
        buckets[(p.dtype, grad.dtype, p.device, blocking, vec)].append((p, grad, exp_avg, exp_avg_sq))
    for (param_dtype, grad_dtype, device, blocking, vec), items in buckets.items():
        records = []
        for p, grad, exp_avg, exp_avg_sq in items:
            n_cols = p.shape[-1] if cage else blocking.chunk_width
            records += [p.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                        triton.cdiv(p.numel(), n_cols), n_cols, p.numel(), 0]
        tensor_table, tile_table, n_tiles = _launch_tables(tuple(records), blocking.block_rows, device)
        rot, _ = load_rotation_args(cage and hadamard, block_size, device, dummy=tile_table, interpreted=interpreted)
        launch, args = step_launch(
            tensor_table, tile_table, rot, found_inf, n_tiles, blocking, param_dtype=param_dtype,
            grad_dtype=grad_dtype, vec=vec, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
            cage_lambda=cage_lambda, coupled=coupled, levels=levels, alpha=alpha, hadamard=hadamard,
            block_size=block_size, rms_eps=rms_eps,
        )
        launch(*args)

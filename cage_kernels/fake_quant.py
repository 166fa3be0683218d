"""Forward fake quantization: ``Q(x)`` and the bit-packed straight-through mask, one pass.

A program owns ``BLOCK_ROWS`` whole rows. A row that fits in one chunk (ROW_CHUNK_MAX
columns, padded to a power of two) is loaded once: sum of squares, scale, rotation,
grid, rotation back and both stores come from registers. Longer rows are swept twice
(sum of squares first); the second read usually hits L2.

Mask storage (``mask_state``): uint8 ``[rows, ceil(n_cols / 8)]``, bit ``j`` of byte
``i`` of a row is column ``8 * i + j`` (little-endian bit order), 1 = the gradient
passes. For ``grad_mask="none"`` nothing is stored: an empty uint8 tensor.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cage import naive
from cage.config import RMS_EPS, QuantConfig

from .hadamard import MAX_KERNEL_BLOCK, load_rotation, load_rotation_args
from .quant_math import (
    MASK_NONE,
    chunk_offsets,
    mask_mode_and_radius,
    pack_mask_bits,
    quantize_chunk,
    row_scale,
    row_sum_squares,
    store_rounded,
)
from .tiling import exact_dot_dtype, is_interpreted, level_dot_dtype, plan_rows, quant_rot_width

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _quantize_store_chunk(
    x, offsets, in_bounds, col_start, rows, row_ok, scale, rot, q_ptr, mask_ptr, row_bytes,
    inv_sqrt_block, mask_radius,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr, LEVELS: tl.constexpr,
    HADAMARD: tl.constexpr, ROTATE_BACK: tl.constexpr, MASK_MODE: tl.constexpr,
    X_DOT_DTYPE: tl.constexpr, LEVEL_DOT_DTYPE: tl.constexpr,
):
    q, keep = quantize_chunk(
        x, rot, scale, inv_sqrt_block, mask_radius, BLOCK_ROWS, TILES, ROT_WIDTH, LEVELS,
        HADAMARD, ROTATE_BACK, MASK_MODE, X_DOT_DTYPE, LEVEL_DOT_DTYPE,
    )
    store_rounded(q_ptr + offsets, q, in_bounds)
    if MASK_MODE != 0:
        packed = pack_mask_bits(keep, in_bounds, BLOCK_ROWS, TILES * ROT_WIDTH)
        byte_cols = col_start // 8 + tl.arange(0, TILES * ROT_WIDTH // 8)
        byte_offsets = rows[:, None] * row_bytes + byte_cols[None, :]
        tl.store(mask_ptr + byte_offsets, packed, mask=row_ok[:, None] & (byte_cols < row_bytes)[None, :])


@triton.jit
def _fake_quant_fwd_kernel(
    x_ptr, q_ptr, mask_ptr, rot_ptr,
    n_rows, n_cols, row_bytes,
    alpha, inv_sqrt_block, mask_radius,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, LEVELS: tl.constexpr, HADAMARD: tl.constexpr,
    ROTATE_BACK: tl.constexpr, MASK_MODE: tl.constexpr, RMS_EPS: tl.constexpr,
    X_DOT_DTYPE: tl.constexpr, LEVEL_DOT_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    row_ok = rows < n_rows
    if HADAMARD:
        rot = load_rotation(rot_ptr, ROT_WIDTH)
    else:
        rot = 0.0
    CHUNK_WIDTH: tl.constexpr = TILES * ROT_WIDTH

    if SINGLE_CHUNK:
        offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, 0, TILES, ROT_WIDTH)
        x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        scale = row_scale(row_sum_squares(x), n_cols, alpha, RMS_EPS)
        _quantize_store_chunk(
            x, offsets, in_bounds, 0, rows, row_ok, scale, rot, q_ptr, mask_ptr, row_bytes,
            inv_sqrt_block, mask_radius, BLOCK_ROWS, TILES, ROT_WIDTH, LEVELS,
            HADAMARD, ROTATE_BACK, MASK_MODE, X_DOT_DTYPE, LEVEL_DOT_DTYPE,
        )
    else:
        sum_squares = tl.zeros((BLOCK_ROWS,), tl.float32)
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            sum_squares += row_sum_squares(x)
        scale = row_scale(sum_squares, n_cols, alpha, RMS_EPS)
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            _quantize_store_chunk(
                x, offsets, in_bounds, col_start, rows, row_ok, scale, rot, q_ptr, mask_ptr, row_bytes,
                inv_sqrt_block, mask_radius, BLOCK_ROWS, TILES, ROT_WIDTH, LEVELS,
                HADAMARD, ROTATE_BACK, MASK_MODE, X_DOT_DTYPE, LEVEL_DOT_DTYPE,
            )


# ---- torch side of the mask format ------------------------------------------------------

_BIT_WEIGHTS = {}


def _bit_weights(device) -> torch.Tensor:
    key = str(device)
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = (1 << torch.arange(8, dtype=torch.int32)).to(device=device, dtype=torch.uint8)
    return _BIT_WEIGHTS[key]


def mask_bytes_per_row(n_cols: int) -> int:
    return (n_cols + 7) // 8


def empty_mask(device) -> torch.Tensor:
    """The mask_state of ``grad_mask="none"``: nothing to store."""
    return torch.empty(0, dtype=torch.uint8, device=device)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., n]`` -> the kernels' packed uint8 ``[rows, ceil(n / 8)]``."""
    n_cols = mask.shape[-1]
    flat = mask.reshape(-1, n_cols)
    pad = mask_bytes_per_row(n_cols) * 8 - n_cols
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    bits = flat.reshape(flat.shape[0], -1, 8).to(torch.uint8)
    return (bits * _bit_weights(mask.device)).sum(dim=-1, dtype=torch.uint8)


def mask_to_bool(mask_state: torch.Tensor, shape) -> torch.Tensor:
    """The packed mask as a bool tensor of ``shape`` (the quantized tensor's shape)."""
    shape = torch.Size(shape)
    if mask_state.numel() == 0:  # grad_mask="none" stores nothing: everything passes
        return torch.ones(shape, dtype=torch.bool, device=mask_state.device)
    n_cols = shape[-1] if len(shape) else 1
    bits = (mask_state.unsqueeze(-1) & _bit_weights(mask_state.device)) != 0
    return bits.reshape(mask_state.shape[0], -1)[:, :n_cols].reshape(shape)


# ---- launcher ---------------------------------------------------------------------------


def uses_kernel(dtype: torch.dtype, config: QuantConfig) -> bool:
    """fp64 and Hadamard blocks above MAX_KERNEL_BLOCK go to the torch reference."""
    return dtype in KERNEL_DTYPES and (not config.hadamard or config.block_size <= MAX_KERNEL_BLOCK)


def fake_quant_forward(
    x: torch.Tensor, config: QuantConfig, rotate_back: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(x) in x's dtype and shape, contiguous; packed mask)``."""
    n_cols = x.shape[-1] if x.dim() else 1
    mode, radius = mask_mode_and_radius(config)
    if not uses_kernel(x.dtype, config):
        q, mask = naive.quantize(x, config, rotate_back)
        return q.contiguous(), (empty_mask(x.device) if mode == MASK_NONE else pack_mask(mask))

    x = x.contiguous()
    n_rows = x.numel() // n_cols if n_cols else 0
    q = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if mode == MASK_NONE:
        mask = empty_mask(x.device)
    else:
        mask = torch.empty((n_rows, mask_bytes_per_row(n_cols)), dtype=torch.uint8, device=x.device)
    if x.numel() == 0:
        return q, mask

    interpreted = is_interpreted(_fake_quant_fwd_kernel)
    blocking = plan_rows(
        n_rows, n_cols, quant_rot_width(config.hadamard, config.block_size, n_cols),
        uses_dot=config.hadamard, interpreted=interpreted,
    )
    rot, inv_sqrt_block = load_rotation_args(config.hadamard, config.block_size, x.device, dummy=x)
    grid = (triton.cdiv(n_rows, blocking.block_rows),)
    _fake_quant_fwd_kernel[grid](
        x, q, mask if mask.numel() else q, rot,
        n_rows, n_cols, mask_bytes_per_row(n_cols),
        config.alpha, inv_sqrt_block, radius,
        BLOCK_ROWS=blocking.block_rows, TILES=blocking.tiles, ROT_WIDTH=blocking.rot_width,
        SINGLE_CHUNK=blocking.single_chunk, LEVELS=config.levels, HADAMARD=config.hadamard,
        ROTATE_BACK=rotate_back, MASK_MODE=mode, RMS_EPS=RMS_EPS,
        X_DOT_DTYPE=exact_dot_dtype(x.dtype, interpreted), LEVEL_DOT_DTYPE=level_dot_dtype(interpreted),
        num_warps=blocking.num_warps,
    )
    return q, mask


# ---- custom op: torch.compile sees an opaque node with a fake (shape-only) impl ----------


@torch.library.custom_op("cage::fake_quant_fwd", mutates_args=())
def fake_quant_fwd_op(
    x: torch.Tensor, bits: int, hadamard: bool, block_size: int, grad_mask: str, rotate_back: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    config = QuantConfig(bits=bits, hadamard=hadamard, block_size=block_size, grad_mask=grad_mask)
    return fake_quant_forward(x, config, rotate_back)


@fake_quant_fwd_op.register_fake
def _(x, bits, hadamard, block_size, grad_mask, rotate_back):
    q = x.new_empty(x.shape)
    if grad_mask == "none":
        return q, x.new_empty(0, dtype=torch.uint8)
    n_cols = x.shape[-1] if x.dim() else 1
    n_rows = math.prod(x.shape[:-1]) if x.dim() else 1
    return q, x.new_empty((n_rows, (n_cols + 7) // 8), dtype=torch.uint8)


def quantize(x: torch.Tensor, config: QuantConfig, rotate_back: bool = True):
    """The backend contract of cage.functional: ``(Q(x), mask_state)``."""
    return fake_quant_fwd_op(x, config.bits, config.hadamard, config.block_size, config.grad_mask, rotate_back)

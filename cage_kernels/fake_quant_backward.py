"""Backward of fake quantization: ``dL/dx = H (mask * (H g))`` per block (SPEC 1).

Nothing spans a row here, so the grid is 2-D: (row blocks, column chunks). The
incoming gradient is rotated (skipped when the forward did not rotate back: it is
already in the rotated domain), masked with the packed bits of the forward, rotated
back and stored in the gradient's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cage import naive
from cage.config import QuantConfig

from .fake_quant import mask_to_bool, uses_kernel
from .hadamard import load_rotation, load_rotation_args, rotate_tiles
from .quant_math import chunk_offsets, load_mask_bits, store_rounded
from . import tiling
from .tiling import exact_dot_dtype, is_interpreted, plan_rows, quant_rot_width

# A chunk of the backward never needs the whole row: keep chunks modest.
BACKWARD_CHUNK_MAX = 1024


@triton.jit
def _fake_quant_bwd_kernel(
    grad_ptr, mask_ptr, out_ptr, rot_ptr,
    n_rows, n_cols, row_bytes, inv_sqrt_block,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr,
    ROTATE_IN: tl.constexpr, ROTATE_OUT: tl.constexpr, APPLY_MASK: tl.constexpr,
    GRAD_DOT_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    row_ok = rows < n_rows
    col_start = tl.program_id(1) * (TILES * ROT_WIDTH)
    offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
    g = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if ROTATE_IN or ROTATE_OUT:
        rot = load_rotation(rot_ptr, ROT_WIDTH)
    if ROTATE_IN:
        g = rotate_tiles(g, rot, BLOCK_ROWS, TILES, ROT_WIDTH, GRAD_DOT_DTYPE) * inv_sqrt_block
    if APPLY_MASK:
        keep = load_mask_bits(mask_ptr, rows, row_ok, row_bytes, n_cols, col_start, TILES, ROT_WIDTH)
        g = tl.where(keep, g, 0.0)
    if ROTATE_OUT:
        # the masked gradient is a general fp32 tile: IEEE fp32 dot
        g = rotate_tiles(g, rot, BLOCK_ROWS, TILES, ROT_WIDTH, tl.float32) * inv_sqrt_block
    store_rounded(out_ptr + offsets, g, in_bounds)


def fake_quant_backward(
    grad: torch.Tensor, mask_state: torch.Tensor, config: QuantConfig, grad_is_rotated: bool = False
) -> torch.Tensor:
    """The straight-through gradient for the input, in ``grad``'s dtype and shape (contiguous)."""
    if not uses_kernel(grad.dtype, config):
        mask = mask_to_bool(mask_state, grad.shape)
        return naive.masked_grad(grad, mask, config, grad_is_rotated).contiguous()

    rotate_in = config.hadamard and not grad_is_rotated
    rotate_out = config.hadamard
    apply_mask = config.grad_mask != "none"
    if not apply_mask and rotate_in == rotate_out:
        return grad.contiguous().clone()  # H H = I (or no rotation at all): the identity

    grad = grad.contiguous()
    n_cols = grad.shape[-1] if grad.dim() else 1
    n_rows = grad.numel() // n_cols if n_cols else 0
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    if grad.numel() == 0:
        return out
    interpreted = is_interpreted(_fake_quant_bwd_kernel)
    blocking = plan_rows(
        n_rows, n_cols, quant_rot_width(config.hadamard, config.block_size, n_cols),
        uses_dot=config.hadamard, interpreted=interpreted, max_chunk=min(BACKWARD_CHUNK_MAX, tiling.ROW_CHUNK_MAX),
    )
    rot, inv_sqrt_block = load_rotation_args(config.hadamard, config.block_size, grad.device, dummy=grad)
    grid = (triton.cdiv(n_rows, blocking.block_rows), blocking.n_chunks)
    _fake_quant_bwd_kernel[grid](
        grad, mask_state if apply_mask else grad, out, rot,
        n_rows, n_cols, (n_cols + 7) // 8, inv_sqrt_block,
        BLOCK_ROWS=blocking.block_rows, TILES=blocking.tiles, ROT_WIDTH=blocking.rot_width,
        ROTATE_IN=rotate_in, ROTATE_OUT=rotate_out, APPLY_MASK=apply_mask,
        GRAD_DOT_DTYPE=exact_dot_dtype(grad.dtype, interpreted),
        num_warps=blocking.num_warps,
    )
    return out


@torch.library.custom_op("cage::fake_quant_bwd", mutates_args=())
def fake_quant_bwd_op(
    grad: torch.Tensor, mask_state: torch.Tensor, hadamard: bool, block_size: int, grad_mask: str,
    grad_is_rotated: bool,
) -> torch.Tensor:
    # bits does not enter the backward; any valid value rebuilds the config
    config = QuantConfig(bits=4, hadamard=hadamard, block_size=block_size, grad_mask=grad_mask)
    return fake_quant_backward(grad, mask_state, config, grad_is_rotated)


@fake_quant_bwd_op.register_fake
def _(grad, mask_state, hadamard, block_size, grad_mask, grad_is_rotated):
    return grad.new_empty(grad.shape)


def masked_grad(grad: torch.Tensor, mask_state: torch.Tensor, config: QuantConfig, grad_is_rotated: bool = False):
    """The backend contract of cage.functional: the input gradient, in grad's dtype."""
    return fake_quant_bwd_op(grad, mask_state, config.hadamard, config.block_size, config.grad_mask, grad_is_rotated)

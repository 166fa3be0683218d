"""Backward of fake quantization: ``dL/dx = H (mask * (H g))`` per block (SPEC 1).

Nothing spans a row here, so the grid is 2-D: (row blocks, column chunks). The
incoming gradient is rotated (skipped when the forward did not rotate back: it is
already in the rotated domain), masked with the packed bits of the forward, rotated
back and stored in the gradient's dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import tiling

from .fake_quant import KERNEL_DTYPES, MAX_KERNEL_BLOCK
from .hadamard import load_rotation, load_rotation_args, rotate_tiles
from .launch import Launch, PlanCache, dtype_of
from .quant_math import chunk_offsets, load_mask_bits, store_rounded
from .tiling import cdiv, is_interpreted, plan_rows, quant_rot_width, split_parts


@triton.jit(do_not_specialize=["n_rows"])  # any row count: one kernel
def _fake_quant_bwd_kernel(
    grad_ptr, mask_ptr, out_ptr, rot_ptr,
    n_rows, n_cols, row_bytes, inv_sqrt_block,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr,
    ROTATE_IN: tl.constexpr, ROTATE_OUT: tl.constexpr, APPLY_MASK: tl.constexpr,
    GRAD_SPLIT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    row_ok = rows < n_rows
    col_start = tl.program_id(1) * (TILES * ROT_WIDTH)
    offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
    g = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    if ROTATE_IN or ROTATE_OUT:
        rot = load_rotation(rot_ptr, ROT_WIDTH)
    if ROTATE_IN:
        g = rotate_tiles(g, rot, BLOCK_ROWS, TILES, ROT_WIDTH, GRAD_SPLIT, 3) * inv_sqrt_block
    if APPLY_MASK:
        keep = load_mask_bits(mask_ptr, rows, row_ok, row_bytes, n_cols, col_start, TILES, ROT_WIDTH)
        g = tl.where(keep, g, 0.0)
    if ROTATE_OUT:
        # the masked gradient is a general fp32 tile (the rotation scaled it): three parts
        g = rotate_tiles(g, rot, BLOCK_ROWS, TILES, ROT_WIDTH, 3, 3) * inv_sqrt_block
    store_rounded(out_ptr + offsets, g, in_bounds)


def backward_launch(grad, mask, out, rot, n_rows, n_cols, *, hadamard, block_size, apply_mask,
                    grad_is_rotated, interpreted=None):
    """``(Launch, args)`` of the backward kernel; the tensors may be dtypes (compile gate)."""
    if interpreted is None:
        interpreted = is_interpreted(_fake_quant_bwd_kernel)
    launch = _backward_kernel_launch(n_rows, n_cols, dtype_of(grad), hadamard, block_size, apply_mask,
                                     grad_is_rotated, interpreted, tiling.ROW_CHUNK_MAX)
    args = (grad, mask, out, rot, n_rows, n_cols, (n_cols + 7) // 8, 1.0 / block_size**0.5 if hadamard else 1.0)
    return launch, args


@functools.lru_cache(maxsize=4096)
def _backward_kernel_launch(n_rows, n_cols, dtype, hadamard, block_size, apply_mask, grad_is_rotated, interpreted,
                            row_chunk_max):
    blocking = plan_rows(n_cols, quant_rot_width(hadamard, block_size, n_cols),
                         uses_dot=hadamard, interpreted=interpreted)
    return Launch.of(
        _fake_quant_bwd_kernel, (cdiv(n_rows, blocking.block_rows), blocking.n_chunks), blocking,
        BLOCK_ROWS=blocking.block_rows, TILES=blocking.tiles, ROT_WIDTH=blocking.rot_width,
        ROTATE_IN=hadamard and not grad_is_rotated, ROTATE_OUT=hadamard, APPLY_MASK=apply_mask,
        GRAD_SPLIT=split_parts(dtype),
    )


class BackwardPlan:
    """A backward call planned once for one gradient shape, dtype, device and rotation:
    ``plan(grad, mask_state) -> grad_x`` (``plan_backward``)."""

    __slots__ = ("launch", "identity", "rot", "tail", "apply_mask")

    def __init__(self, launch, identity, rot, tail, apply_mask):
        self.launch, self.identity, self.rot, self.tail, self.apply_mask = launch, identity, rot, tail, apply_mask

    def __call__(self, grad: torch.Tensor, mask_state: torch.Tensor) -> torch.Tensor:
        if self.identity:  # no mask, and the rotations cancel (H H = I) or there are none
            return grad.contiguous().clone()
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        if self.launch is not None:
            self.launch(grad, mask_state if self.apply_mask else grad, out, grad if self.rot is None else self.rot,
                        *self.tail)
        return out


def plan_backward(shape, dtype: torch.dtype, device: torch.device, *, hadamard: bool, block_size: int,
                  apply_mask: bool, grad_is_rotated: bool = False) -> BackwardPlan:
    """The :class:`BackwardPlan` of gradients of ``shape``/``dtype`` on ``device``."""
    if dtype not in KERNEL_DTYPES or (hadamard and block_size > MAX_KERNEL_BLOCK):
        raise ValueError(
            f"cage_kernels: grad dtype {dtype} with hadamard={hadamard}, block_size={block_size} is not "
            f"supported (dtypes {KERNEL_DTYPES}, Hadamard blocks up to {MAX_KERNEL_BLOCK})"
        )
    if not apply_mask and (hadamard and not grad_is_rotated) == hadamard:
        return BackwardPlan(None, True, None, (), apply_mask)
    n_cols = shape[-1] if len(shape) else 1
    numel = math.prod(shape)
    n_rows = numel // n_cols if n_cols else 0
    if numel == 0:
        return BackwardPlan(None, False, None, (), apply_mask)
    interpreted = is_interpreted(_fake_quant_bwd_kernel)
    rot, _ = load_rotation_args(hadamard, block_size, device, dummy=None, interpreted=interpreted)
    launch, args = backward_launch(
        dtype, torch.uint8, dtype, rot, n_rows, n_cols, hadamard=hadamard, block_size=block_size,
        apply_mask=apply_mask, grad_is_rotated=grad_is_rotated, interpreted=interpreted,
    )
    return BackwardPlan(launch, False, rot, args[4:], apply_mask)


_BACKWARD_PLANS = PlanCache()


def fake_quant_backward(
    grad: torch.Tensor, mask_state: torch.Tensor, *, hadamard: bool, block_size: int, apply_mask: bool,
    grad_is_rotated: bool = False,
) -> torch.Tensor:
    """The straight-through gradient for the input, in ``grad``'s dtype and shape
    (contiguous). ``mask_state`` is the forward's bit-packed mask (ignored without
    ``apply_mask``). Plans are cached by shape, dtype, device and arguments."""
    key = (grad.shape, grad.dtype, grad.device, hadamard, block_size, apply_mask, grad_is_rotated,
           tiling.ROW_CHUNK_MAX)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = _BACKWARD_PLANS.put(key, plan_backward(grad.shape, grad.dtype, grad.device, hadamard=hadamard,
                                                       block_size=block_size, apply_mask=apply_mask,
                                                       grad_is_rotated=grad_is_rotated))
    return plan(grad, mask_state)

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

import functools
import math

import torch
import triton
import triton.language as tl

from . import tiling

from .hadamard import MAX_KERNEL_BLOCK, load_rotation, load_rotation_args
from .launch import Launch, PlanCache, dtype_of
from .quant_math import (
    MASK_CLIP,
    MASK_NONE,
    MASK_TRUST,
    chunk_offsets,
    grid_levels,
    grid_step,
    pack_mask_bits,
    quantize_chunk,
    row_scale,
    scaled_sum_squares,
    store_rounded,
    sweep_sum_squares,
)
from .tiling import cdiv, is_interpreted, plan_rows, quant_rot_width, split_parts

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_MODES = (MASK_NONE, MASK_CLIP, MASK_TRUST)


@triton.jit
def _quantize_store_chunk(
    x, offsets, in_bounds, col_start, rows, row_ok, scale, rot, q_ptr, mask_ptr, row_bytes,
    inv_sqrt_block, step_divisor, mask_center, mask_radius,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr,
    HADAMARD: tl.constexpr, ROTATE_BACK: tl.constexpr, STORE_MASK: tl.constexpr, X_SPLIT: tl.constexpr,
    EMIT_CODES: tl.constexpr, INTEGER_GRID: tl.constexpr,
):
    if EMIT_CODES:  # signed integer codes, rotated domain: odd C = 2 * level (centered), or k itself
        level, step, keep = grid_levels(
            x, rot, scale, inv_sqrt_block, step_divisor, mask_center, mask_radius, BLOCK_ROWS, TILES, ROT_WIDTH,
            HADAMARD, STORE_MASK, X_SPLIT, INTEGER_GRID,
        )
        if INTEGER_GRID:
            tl.store(q_ptr + offsets, level.to(tl.int8), mask=in_bounds)
        else:
            tl.store(q_ptr + offsets, (2.0 * level).to(tl.int8), mask=in_bounds)
    else:
        q, keep = quantize_chunk(
            x, rot, scale, inv_sqrt_block, step_divisor, mask_center, mask_radius, BLOCK_ROWS, TILES, ROT_WIDTH,
            HADAMARD, ROTATE_BACK, STORE_MASK, X_SPLIT, INTEGER_GRID,
        )
        store_rounded(q_ptr + offsets, q, in_bounds)
    if STORE_MASK:
        packed = pack_mask_bits(keep, in_bounds, BLOCK_ROWS, TILES * ROT_WIDTH)
        byte_cols = col_start // 8 + tl.arange(0, TILES * ROT_WIDTH // 8)
        byte_offsets = rows[:, None] * row_bytes + byte_cols[None, :]
        tl.store(mask_ptr + byte_offsets, packed, mask=row_ok[:, None] & (byte_cols < row_bytes)[None, :])


@triton.jit
def _code_scale(scale, step_divisor, INTEGER_GRID: tl.constexpr):
    """What the integer codes multiply to give q: ``d / 2`` (centered) or ``d`` (integer)."""
    if INTEGER_GRID:
        return grid_step(scale, step_divisor)
    return grid_step(scale, step_divisor) * 0.5


@triton.jit(do_not_specialize=["n_rows"])  # any row count: one kernel
def _fake_quant_fwd_kernel(
    x_ptr, q_ptr, mask_ptr, rot_ptr, half_step_ptr,
    n_rows, n_cols, row_bytes,
    alpha, step_divisor, inv_sqrt_block, mask_center, mask_radius, rms_eps, scale_cap,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, HADAMARD: tl.constexpr,
    ROTATE_BACK: tl.constexpr, STORE_MASK: tl.constexpr, X_SPLIT: tl.constexpr, EMIT_CODES: tl.constexpr,
    INTEGER_GRID: tl.constexpr,
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
        sum_squares, power = scaled_sum_squares(x)
        scale = tl.minimum(row_scale(sum_squares, power, n_cols, alpha, rms_eps), scale_cap)
        if EMIT_CODES:
            tl.store(half_step_ptr + rows, _code_scale(scale, step_divisor, INTEGER_GRID), mask=row_ok)
        _quantize_store_chunk(
            x, offsets, in_bounds, 0, rows, row_ok, scale, rot, q_ptr, mask_ptr, row_bytes,
            inv_sqrt_block, step_divisor, mask_center, mask_radius, BLOCK_ROWS, TILES, ROT_WIDTH,
            HADAMARD, ROTATE_BACK, STORE_MASK, X_SPLIT, EMIT_CODES, INTEGER_GRID,
        )
    else:
        # sweep 1: the rows' sums of squares; sweep 2 re-reads the row block from L2
        sum_squares, power = sweep_sum_squares(x_ptr, rows, row_ok, n_cols, BLOCK_ROWS, TILES, ROT_WIDTH)
        scale = tl.minimum(row_scale(sum_squares, power, n_cols, alpha, rms_eps), scale_cap)
        if EMIT_CODES:
            tl.store(half_step_ptr + rows, _code_scale(scale, step_divisor, INTEGER_GRID), mask=row_ok)
        for col_start in range(0, n_cols, CHUNK_WIDTH):
            offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
            x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            _quantize_store_chunk(
                x, offsets, in_bounds, col_start, rows, row_ok, scale, rot, q_ptr, mask_ptr, row_bytes,
                inv_sqrt_block, step_divisor, mask_center, mask_radius, BLOCK_ROWS, TILES, ROT_WIDTH,
                HADAMARD, ROTATE_BACK, STORE_MASK, X_SPLIT, EMIT_CODES, INTEGER_GRID,
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


def supports(dtype: torch.dtype, hadamard: bool, block_size: int) -> bool:
    """What the kernels take; callers send anything else (fp64, Hadamard blocks above
    MAX_KERNEL_BLOCK) to a reference implementation."""
    return dtype in KERNEL_DTYPES and (not hadamard or block_size <= MAX_KERNEL_BLOCK)


def check_quantizer_args(dtype, levels, alpha, hadamard, block_size, mask_mode, n_cols, integer_grid=False) -> None:
    if not supports(dtype, hadamard, block_size):
        raise ValueError(
            f"cage_kernels: dtype {dtype} with hadamard={hadamard}, block_size={block_size} is not supported "
            f"(dtypes {KERNEL_DTYPES}, Hadamard blocks up to {MAX_KERNEL_BLOCK})"
        )
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
        raise ValueError(f"cage_kernels: levels must be an integer in 2..256 (2**bits), got {levels!r}")
    if integer_grid and levels < 4:
        raise ValueError(f"cage_kernels: the integer grid needs levels >= 4 (2 bits), got {levels!r}")
    if not alpha > 0:
        raise ValueError(f"cage_kernels: alpha must be > 0, got {alpha!r}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"cage_kernels: mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    if hadamard and n_cols % block_size:
        raise ValueError(f"cage_kernels: rows of {n_cols} columns are not whole Hadamard blocks of {block_size}")


def step_divisor(levels: int, integer_grid: bool) -> float:
    """``2 s / d``: the step is ``2 s / (levels - 1)`` on the centered grid, ``2 s / levels`` on the integer one."""
    return float(levels if integer_grid else levels - 1)


def forward_launch(x, q, mask, rot, n_rows, n_cols, *, levels, alpha, hadamard, block_size, mask_mode,
                   mask_radius, rotate_back, rms_eps, interpreted=None, half_step=None, integer_grid=False):
    """``(Launch, args)`` of the forward kernel; the tensors may be dtypes (compile gate).
    With ``half_step`` (a tensor of one fp32 per row, or its dtype) the kernel emits the
    signed integer codes into ``q`` (int8) and each row's code scale (``d / 2``, or ``d`` on
    the integer grid) into ``half_step``."""
    if interpreted is None:
        interpreted = is_interpreted(_fake_quant_fwd_kernel)
    launch = _forward_kernel_launch(n_rows, n_cols, dtype_of(x), hadamard, block_size, mask_mode != MASK_NONE,
                                    rotate_back, interpreted, tiling.ROW_CHUNK_MAX, half_step is not None,
                                    integer_grid)
    args = (x, q, mask, rot, half_step if half_step is not None else mask, n_rows, n_cols, mask_bytes_per_row(n_cols),
            alpha, step_divisor(levels, integer_grid), 1.0 / block_size**0.5 if hadamard else 1.0,
            1.0 if mask_mode == MASK_TRUST else 0.0, mask_radius, rms_eps, scale_cap(dtype_of(x)))
    return launch, args


def scale_cap(dtype: torch.dtype) -> float:
    """The largest clip point whose levels an output of ``dtype`` holds (fp16: 65504; others:
    no bound). As ``cage.naive.scale_cap``."""
    return float(torch.finfo(dtype).max) if dtype == torch.float16 else float("inf")


@functools.lru_cache(maxsize=4096)
def _forward_kernel_launch(n_rows, n_cols, dtype, hadamard, block_size, store_mask, rotate_back, interpreted,
                           row_chunk_max, emit_codes=False, integer_grid=False):
    blocking = plan_rows(n_cols, quant_rot_width(hadamard, block_size, n_cols),
                         uses_dot=hadamard, interpreted=interpreted)
    return Launch.of(
        _fake_quant_fwd_kernel, (cdiv(n_rows, blocking.block_rows),), blocking,
        BLOCK_ROWS=blocking.block_rows, TILES=blocking.tiles, ROT_WIDTH=blocking.rot_width,
        SINGLE_CHUNK=blocking.single_chunk, HADAMARD=hadamard, ROTATE_BACK=rotate_back,
        STORE_MASK=store_mask, X_SPLIT=split_parts(dtype), EMIT_CODES=emit_codes, INTEGER_GRID=integer_grid,
    )


# Codes fit int8 while |C| <= levels - 1 <= 127 (centered: up to 7 bits), or, on the integer
# grid, while -levels/2 >= -128 (up to 8 bits).
MAX_CODE_LEVELS = {False: 128, True: 256}


class ForwardPlan:
    """A forward call planned once for one input shape, dtype, device and quantizer,
    with nothing validated or planned again (``plan_forward``): ``plan(x) -> (q, mask)``,
    or with ``emit_codes`` ``plan(x) -> (codes, half_step, mask)``: int8 codes ``C`` of x's
    shape (rotated domain, ``q(x_h) = C * d / 2``) and fp32 ``d / 2`` per row."""

    __slots__ = ("launch", "mask_shape", "rot", "tail", "stores_mask", "n_rows", "emit_codes")

    def __init__(self, launch, mask_shape, rot, tail, stores_mask, n_rows, emit_codes):
        self.launch, self.mask_shape, self.rot, self.tail, self.stores_mask = launch, mask_shape, rot, tail, stores_mask
        self.n_rows, self.emit_codes = n_rows, emit_codes

    def __call__(self, x: torch.Tensor):
        x = x.contiguous()
        mask = x.new_empty(self.mask_shape, dtype=torch.uint8)
        if self.emit_codes:
            q = torch.empty_like(x, dtype=torch.int8)
            half_step = x.new_empty((self.n_rows,), dtype=torch.float32)
        else:
            q, half_step = torch.empty_like(x), mask
        if self.launch is not None:
            self.launch(x, q, mask if self.stores_mask else q, x if self.rot is None else self.rot, half_step,
                        *self.tail)
        return (q, half_step, mask) if self.emit_codes else (q, mask)


def plan_forward(shape, dtype: torch.dtype, device: torch.device, *, levels: int, alpha: float, hadamard: bool,
                 block_size: int, mask_mode: int, mask_radius: float, rotate_back: bool = True,
                 rms_eps: float = 1e-20, emit_codes: bool = False, integer_grid: bool = False) -> ForwardPlan:
    """The :class:`ForwardPlan` of inputs of ``shape``/``dtype`` on ``device`` (arguments as
    :func:`fake_quant_forward`'s); raises ValueError for what the kernel does not take."""
    n_cols = shape[-1] if len(shape) else 1
    check_quantizer_args(dtype, levels, alpha, hadamard, block_size, mask_mode, n_cols, integer_grid)
    if emit_codes and (rotate_back and hadamard or levels > MAX_CODE_LEVELS[integer_grid]):
        raise ValueError(
            f"cage_kernels: integer codes live in the rotated domain and fit int8 up to "
            f"{MAX_CODE_LEVELS[integer_grid]} levels on the {'integer' if integer_grid else 'centered'} grid; "
            f"got rotate_back={rotate_back} with hadamard={hadamard}, levels={levels}"
        )
    numel = math.prod(shape)
    n_rows = numel // n_cols if n_cols else 0
    stores_mask = mask_mode != MASK_NONE
    mask_shape = (n_rows, mask_bytes_per_row(n_cols)) if stores_mask else (0,)
    if numel == 0:
        return ForwardPlan(None, mask_shape, None, (), stores_mask, n_rows, emit_codes)
    interpreted = is_interpreted(_fake_quant_fwd_kernel)
    rot, _ = load_rotation_args(hadamard, block_size, device, dummy=None, interpreted=interpreted)
    launch, args = forward_launch(
        dtype, torch.int8 if emit_codes else dtype, torch.uint8, rot, n_rows, n_cols, levels=levels, alpha=alpha,
        hadamard=hadamard, block_size=block_size, mask_mode=mask_mode, mask_radius=mask_radius,
        rotate_back=rotate_back, rms_eps=rms_eps, interpreted=interpreted,
        half_step=torch.float32 if emit_codes else None, integer_grid=integer_grid,
    )
    return ForwardPlan(launch, mask_shape, rot, args[5:], stores_mask, n_rows, emit_codes)


_FORWARD_PLANS = PlanCache()


def fake_quant_forward(
    x: torch.Tensor, *, levels: int, alpha: float, hadamard: bool, block_size: int, mask_mode: int,
    mask_radius: float, rotate_back: bool = True, rms_eps: float = 1e-20, integer_grid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """QuEST fake quantization of ``x`` along its last dimension (SPEC 1):
    ``(Q(x) in x's dtype and shape, contiguous; bit-packed mask)``.

    ``levels = 2**bits``, ``alpha`` the clip in units of the row RMS, ``mask_mode`` one of
    MASK_NONE / MASK_CLIP (``|x_h| <= mask_radius * s``) / MASK_TRUST
    (``|q_h - x_h| <= mask_radius * s``); ``integer_grid``: levels ``k d``, ``k`` in
    ``-levels/2 .. levels/2 - 1`` (``d = 2 s / levels``) instead of the centered ``(k - 1/2) d``.
    Plans are cached by shape, dtype, device and arguments (a caller with its own key keeps
    :func:`plan_forward`'s plan instead)."""
    key = (x.shape, x.dtype, x.device, levels, alpha, hadamard, block_size, mask_mode, mask_radius, rotate_back,
           rms_eps, tiling.ROW_CHUNK_MAX, integer_grid)
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = _FORWARD_PLANS.put(key, plan_forward(
            x.shape, x.dtype, x.device, levels=levels, alpha=alpha, hadamard=hadamard, block_size=block_size,
            mask_mode=mask_mode, mask_radius=mask_radius, rotate_back=rotate_back, rms_eps=rms_eps,
            integer_grid=integer_grid,
        ))
    return plan(x)


_CODE_PLANS = PlanCache()


def fake_quant_codes(
    x: torch.Tensor, *, levels: int, alpha: float, hadamard: bool, block_size: int, mask_mode: int,
    mask_radius: float, rms_eps: float = 1e-20, integer_grid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantizer of :func:`fake_quant_forward` with the rotated-domain output given as
    integers: ``(codes, code_scale, mask)``: int8 codes of x's shape (centered: odd
    ``C = 2c - (levels - 1)``, code scale ``d / 2``; integer grid: ``C = k``, code scale ``d``),
    fp32 code scale per row (``q(x_h) = C * code_scale`` exactly), the bit-packed mask. Up to 7
    bits centered, 8 on the integer grid."""
    key = (x.shape, x.dtype, x.device, levels, alpha, hadamard, block_size, mask_mode, mask_radius, rms_eps,
           tiling.ROW_CHUNK_MAX, integer_grid)
    plan = _CODE_PLANS.get(key)
    if plan is None:
        plan = _CODE_PLANS.put(key, plan_forward(
            x.shape, x.dtype, x.device, levels=levels, alpha=alpha, hadamard=hadamard, block_size=block_size,
            mask_mode=mask_mode, mask_radius=mask_radius, rotate_back=False, rms_eps=rms_eps, emit_codes=True,
            integer_grid=integer_grid,
        ))
    return plan(x)

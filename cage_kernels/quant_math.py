"""Device helpers shared by the kernels: chunk addressing, rounding, the QuEST grid
(SPEC 1) on a chunk held in registers, the bit-packed mask, bf16 stores."""

from __future__ import annotations

import triton
import triton.language as tl

from .hadamard import rotate_tiles

# Grad-mask modes of the launchers' API. The 1-bit "trust" mask is a widened clip.
MASK_NONE = 0
MASK_CLIP = 1  # |x_h| <= radius * s
MASK_TRUST = 2  # |q_h - x_h| <= s * radius


@triton.jit
def chunk_offsets(rows, row_ok, n_cols, col_start, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr):
    """Element offsets ``[BLOCK_ROWS, TILES, ROT_WIDTH]`` (int64: rows are int64) of the
    chunk that starts at column ``col_start``, and where they are inside the tensor."""
    cols = col_start + tl.arange(0, TILES)[:, None] * ROT_WIDTH + tl.arange(0, ROT_WIDTH)[None, :]
    offsets = rows[:, None, None] * n_cols + cols[None, :, :]
    in_bounds = row_ok[:, None, None] & (cols < n_cols)[None, :, :]
    return offsets, in_bounds


@triton.jit
def round_half_even(v):
    """Round to the nearest integer, ties to even, for |v| < 2**22 (ours: |v| <= 129).

    Adding 1.5 * 2**23 leaves no fraction bits, so the fp32 add rounds like rint; the
    subtraction is exact. Works compiled and interpreted (no libdevice, SPEC 5)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def store_rounded(ptrs, value, in_bounds):
    """Store fp32 ``value`` into ``ptrs``' dtype, rounding to nearest even.

    The interpreter truncates fp32 -> bf16 (SPEC 5); rounding the bits first makes the
    cast exact in both modes (NaN payloads aside)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=in_bounds)


@triton.jit
def row_sum_squares(chunk):
    return tl.sum(tl.sum(chunk * chunk, axis=2), axis=1)


@triton.jit
def compensated_add(total, compensation, value):
    """Kahan summation step: ``(total, compensation)`` after adding ``value``. A row's sum
    of squares over many chunks stays as accurate as one tree sum (a plain running sum
    loses ~1e-6 relative over a 28672-column row, which moves the scale and so Q)."""
    y = value - compensation
    t = total + y
    return t, (t - total) - y


@triton.jit
def power_of_two_scale(amax):
    """``2**-E'`` per row with ``max|x| * 2**-E'`` in ``[1, 2)`` (E' the unbiased exponent of the
    row's largest magnitude, read from its bits: no libdevice), and 1 for a zero, subnormal, inf
    or NaN maximum. Any power of two makes the scaled sum of squares exact to the unscaled one
    (``cage.naive.power_of_two_scale`` picks ``[0.5, 1)``: the same bits come out)."""
    biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # 2**(127 - E) as bits; above E = 253 take 2**-126 (its scaled max stays below 4)
    scale = ((254 - tl.minimum(biased, 253)) << 23).to(tl.float32, bitcast=True)
    return tl.where((biased >= 1) & (biased <= 254), scale, 1.0)


@triton.jit
def scaled_sum_squares(chunk):
    """``(sum of squares of the chunk's rows scaled by f, f)``, f of each row's own maximum."""
    scale = power_of_two_scale(tl.max(tl.max(tl.abs(chunk), axis=2), axis=1))
    scaled = chunk * scale[:, None, None]
    return row_sum_squares(scaled), scale


@triton.jit
def add_scaled_squares(total, compensation, scale, row_max, chunk):
    """Adds a chunk to a running, power-of-two-scaled, compensated sum of squares: when the
    row's maximum grows, the sum so far is rescaled by the ratio of the two scales (a power
    of four: exact), so the result is what one pass with the final scale gives.
    Returns ``(total, compensation, scale, row_max)``."""
    row_max = tl.maximum(row_max, tl.max(tl.max(tl.abs(chunk), axis=2), axis=1))
    new_scale = power_of_two_scale(row_max)
    ratio = new_scale / scale  # a power of two (<= 1 once a row has a maximum)
    total = total * ratio * ratio
    compensation = compensation * ratio * ratio
    scaled = chunk * new_scale[:, None, None]
    total, compensation = compensated_add(total, compensation, row_sum_squares(scaled))
    return total, compensation, new_scale, row_max


@triton.jit
def sweep_sum_squares(ptr, rows, row_ok, n_cols, BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr,
                      ROT_WIDTH: tl.constexpr):
    """The rows' scaled sums of squares and their scales, read chunk by chunk (a first sweep)."""
    total = tl.zeros((BLOCK_ROWS,), tl.float32)
    compensation = tl.zeros((BLOCK_ROWS,), tl.float32)
    scale = tl.zeros((BLOCK_ROWS,), tl.float32) + 1.0
    row_max = tl.zeros((BLOCK_ROWS,), tl.float32)
    for col_start in range(0, n_cols, TILES * ROT_WIDTH):
        offsets, in_bounds = chunk_offsets(rows, row_ok, n_cols, col_start, TILES, ROT_WIDTH)
        x = tl.load(ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        total, compensation, scale, row_max = add_scaled_squares(total, compensation, scale, row_max, x)
    return total, scale


@triton.jit
def row_scale(sum_squares, scale, n_cols, alpha, rms_eps):
    """``s = alpha * sqrt(mean(x**2) + eps)`` from the rows' sums of squares of ``x * scale``
    (a power of two: the division by it is exact). The rotation is orthonormal, so the mean
    square of the unrotated row is that of the rotated one (SPEC 1 step 2). ``eps`` acts in the
    scaled domain: only an all-zero row feels it."""
    mean_square = tl.div_rn(sum_squares, n_cols.to(tl.float32))
    return tl.div_rn(alpha * tl.sqrt_rn(mean_square + rms_eps), scale)


@triton.jit
def grid_levels(
    x, rot, scale, inv_sqrt_block, step_divisor, mask_center, mask_radius,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr,
    HADAMARD: tl.constexpr, COMPUTE_MASK: tl.constexpr, X_SPLIT: tl.constexpr, INTEGER_GRID: tl.constexpr,
):
    """The grid levels of a chunk of whole rotation blocks (SPEC 1 steps 1 and 3), in the
    rotated domain: ``(level, step, keep)`` with ``step`` ``[BLOCK_ROWS, 1, 1]`` the row's step
    ``d`` and ``q_h = level * step``. Centered grid: ``level = k - 1/2`` a half-integer in
    ``[-(levels-1)/2, (levels-1)/2]`` (``2 * level`` is the signed integer code ``C``); integer
    grid (INTEGER_GRID): ``level = k`` in ``[-levels/2, levels/2 - 1]``, the code itself.

    x: fp32 ``[BLOCK_ROWS, TILES, ROT_WIDTH]``; scale: fp32 ``[BLOCK_ROWS]``, the row's s;
    ``step_divisor`` is ``levels - 1`` (centered) or ``levels`` (integer): a run-time value, one
    compiled kernel serves every bit width; ``X_SPLIT`` the bf16 parts x is exact in (``hadamard.rotate_tiles``);
    ``mask_center`` 0 (clip mask) or 1 (trust mask), ``mask_radius`` in units of s; keep is
    the straight-through mask in the rotated domain (meaningless for MASK_NONE).
    """
    if HADAMARD:
        x_h = rotate_tiles(x, rot, BLOCK_ROWS, TILES, ROT_WIDTH, X_SPLIT, 3) * inv_sqrt_block
    else:
        x_h = x
    s = scale[:, None, None]
    step = grid_step(s, step_divisor)
    if INTEGER_GRID:
        # clamped to the code range before rounding: the same as after it (integer bounds)
        half = step_divisor * 0.5
        level = round_half_even(tl.minimum(tl.maximum(tl.div_rn(x_h, step), -half), half - 1.0))
    else:
        clipped = tl.minimum(tl.maximum(x_h, -s), s)
        level = round_half_even(tl.div_rn(clipped, step) + 0.5) - 0.5
    if COMPUTE_MASK:
        # clip (center 0): |x_h| <= radius * s; trust (center 1): |q_h - x_h| <= radius * s.
        # Run-time values: one compiled kernel serves both masks.
        keep = tl.abs(mask_center * (level * step) - x_h) <= mask_radius * s
    else:
        keep = x_h == x_h
    return level, step, keep


@triton.jit
def grid_step(scale, step_divisor):
    """``d = 2 s / (levels - 1)``, IEEE-rounded (what the codes' ``d / 2`` is half of)."""
    return tl.div_rn(2.0 * scale, tl.zeros_like(scale) + step_divisor)


@triton.jit
def quantize_chunk(
    x, rot, scale, inv_sqrt_block, step_divisor, mask_center, mask_radius,
    BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr,
    HADAMARD: tl.constexpr, ROTATE_BACK: tl.constexpr, COMPUTE_MASK: tl.constexpr, X_SPLIT: tl.constexpr,
    INTEGER_GRID: tl.constexpr,
):
    """QuEST fake quantization of a chunk of whole rotation blocks (SPEC 1 steps 1, 3, 4):
    :func:`grid_levels`, then ``(q, keep)``: q fp32, ``Q(x)`` in the input space (or the
    rotated ``q(x_h)`` when not ROTATE_BACK)."""
    level, step, keep = grid_levels(
        x, rot, scale, inv_sqrt_block, step_divisor, mask_center, mask_radius, BLOCK_ROWS, TILES, ROT_WIDTH,
        HADAMARD, COMPUTE_MASK, X_SPLIT, INTEGER_GRID,
    )
    if HADAMARD and ROTATE_BACK:
        # rotate the levels, not q_h: (half-)integers of at most 128, exact in bf16 (and their sums
        # of 16 in two parts)
        q = rotate_tiles(level, rot, BLOCK_ROWS, TILES, ROT_WIDTH, 1, 2) * (step * inv_sqrt_block)
    else:
        q = level * step
    return q, keep


@triton.jit
def pack_mask_bits(keep, in_bounds, BLOCK_ROWS: tl.constexpr, CHUNK_WIDTH: tl.constexpr):
    """``[BLOCK_ROWS, CHUNK_WIDTH // 8]`` uint8: bit j of byte i is column 8*i + j."""
    bits = tl.reshape((keep & in_bounds).to(tl.int32), (BLOCK_ROWS, CHUNK_WIDTH // 8, 8))
    weights = 1 << tl.arange(0, 8)
    return tl.sum(bits * weights[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def load_mask_bits(mask_ptr, rows, row_ok, row_bytes, n_cols, col_start, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr):
    """The packed mask of a chunk, unpacked to int1 ``[BLOCK_ROWS, TILES, ROT_WIDTH]``."""
    cols = col_start + tl.arange(0, TILES)[:, None] * ROT_WIDTH + tl.arange(0, ROT_WIDTH)[None, :]
    in_bounds = row_ok[:, None, None] & (cols < n_cols)[None, :, :]
    byte_ptrs = mask_ptr + rows[:, None, None] * row_bytes + (cols // 8)[None, :, :]
    packed = tl.load(byte_ptrs, mask=in_bounds, other=0).to(tl.int32)
    return ((packed >> (cols % 8)[None, :, :]) & 1) != 0

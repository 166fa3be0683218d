"""``y = x @ W^T (+ bias)`` with ``W`` read as its packed grid codes: the converted layer's
matmul, dequantizing weight tiles in registers so the weight crosses memory at its packed size.

The weight format (``cage.packing``): row ``n`` of ``W`` is a dense little-endian bit stream
of ``K`` codes of ``BITS`` bits (code ``k`` at bits ``k*BITS ..``, bit 0 the lowest of byte 0),
``ceil(K * BITS / 8)`` bytes a row; one fp32 ``step[n]`` per row and one code offset for the
tensor, so that ``W[n, k] = ((code[n, k] - offset) - level_offset) * step[n]`` (``level_offset``
1/2 for the centered grid's half-integer levels, 0 for the integer grid).

A program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` and walks ``K`` in ``BLOCK_K`` slices.
The per-row step is factored out of the sum, ``y[m, n] = step[n] * sum_k x[m, k] (code - c)``
with ``c = offset + level_offset``: the tile that enters ``tl.dot`` holds half-integers (or
integers) of magnitude at most 128, exact in bf16, fp16 and tf32, so the product runs on tensor cores in x's own
dtype with nothing rounded on the weight side; the fp32 accumulator is scaled once at the end.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .launch import Launch, dtype_of
from .quant_math import store_rounded
from .tiling import is_interpreted, next_pow2, tl_dtype

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_BITS, MAX_BITS = 1, 8
# tl.dot needs at least 16 along each dimension: the floor of every block
MIN_DOT_TILE = 16


def packed_row_bytes(n_cols: int, bits: int) -> int:
    """Bytes of one packed row of ``n_cols`` codes (as ``cage.packing``; restated: no import)."""
    return (n_cols * bits + 7) // 8


@triton.jit
def split_halves(values, HALF_BITS: tl.constexpr):
    """``[R, C]`` values of ``2 * HALF_BITS`` bits -> ``[R, 2 C]``: each value's low half,
    then its high half (the order the codes stand in the bit stream)."""
    low, high = values & ((1 << HALF_BITS) - 1), values >> HALF_BITS
    return tl.reshape(tl.join(low, high), (values.shape[0], 2 * values.shape[1]))


@triton.jit
def load_code_tile(packed_ptr, rows, row_ok, k_start, n_cols, row_bytes, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes ``[len(rows), BLOCK_K]`` of columns ``k_start ..`` of a packed weight (rows
    int64; ``k_start`` and BLOCK_K multiples of 8, so the tile starts and ends on whole bytes);
    0 outside the tensor."""
    # One return at the end: compiled Triton generates the code after a constexpr branch's
    # early return as well (and rejects the mismatched shapes), where the interpreter stops.
    row_start = rows[:, None] * row_bytes  # int64: no overflow on large weights
    if BITS == 8:  # the bytes are the codes
        cols = k_start + tl.arange(0, BLOCK_K)
        codes = tl.load(packed_ptr + row_start + cols[None, :], mask=row_ok[:, None] & (cols < n_cols)[None, :],
                        other=0).to(tl.int32)
    elif 8 % BITS == 0:
        # 1, 2, 4 bits: whole codes a byte, the first in the lowest bits. The tile's bytes in
        # one contiguous (vectorized) load, then split in halves until a value is one code:
        # 4 bits is one split (low nibble first), 2 bits two, 1 bit three. Columns past K
        # are the row's zero padding or masked.
        byte_cols = k_start * BITS // 8 + tl.arange(0, BLOCK_K * BITS // 8)
        codes = tl.load(packed_ptr + row_start + byte_cols[None, :],
                        mask=row_ok[:, None] & (byte_cols < row_bytes)[None, :], other=0).to(tl.int32)
        codes = split_halves(codes, 4)
        if BITS <= 2:
            codes = split_halves(codes, 2)
        if BITS == 1:
            codes = split_halves(codes, 1)
    else:
        # 3, 5, 6, 7 bits, from the bit stream: code k at bits k*BITS .. of the row, which may
        # run on into the next byte (which then exists in the row). Per-code byte addresses:
        # these loads are not vectorized.
        cols = k_start + tl.arange(0, BLOCK_K)
        in_bounds = row_ok[:, None] & (cols < n_cols)[None, :]
        first_bit = cols * BITS
        shift = first_bit % 8
        byte_ptrs = packed_ptr + row_start + (first_bit // 8)[None, :]
        value = tl.load(byte_ptrs, mask=in_bounds, other=0).to(tl.int32)
        straddles = (shift + BITS > 8)[None, :]
        value = value | (tl.load(byte_ptrs + 1, mask=in_bounds & straddles, other=0).to(tl.int32) << 8)
        codes = (value >> shift[None, :]) & ((1 << BITS) - 1)
    return codes


@triton.jit(do_not_specialize=["M"])  # any token count of one tiling: one compiled kernel
def _dequant_matmul_kernel(
    x_ptr, packed_ptr, step_ptr, bias_ptr, y_ptr,
    M, N, K, x_row_stride, row_bytes, code_center,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # program_id(0) runs fastest: neighbouring programs share one weight tile (read once from
    # memory, then from L2) and differ in their rows of x
    rows_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows_m < M
    n_ok = rows_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k_start in range(0, K, BLOCK_K):
        cols = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None] * x_row_stride + cols[None, :],
                    mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)
        codes = load_code_tile(packed_ptr, rows_n, n_ok, k_start, K, row_bytes, BITS, BLOCK_K)
        # (code - offset) - 0.5 in one exact subtraction; columns past K meet x = 0
        levels = codes.to(tl.float32) - code_center
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(levels.to(DOT_DTYPE)), acc, input_precision=INPUT_PRECISION)
    y = acc * tl.load(step_ptr + rows_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_rounded(y_ptr + rows_m[:, None] * N + rows_n[None, :], y, m_ok[:, None] & n_ok[None, :])


# ---- planning ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatmulTiling:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _clamp_pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, next_pow2(n)))


def plan_matmul(m: int, n: int, k: int, *, interpreted: bool) -> MatmulTiling:
    """Blocks for ``[m, k] @ [n, k]^T``.

    Compiled, by token count: a decode batch (m <= 16) reads the weight once and does little
    else, so it takes a narrow N tile (4096 rows: 128 programs, about one per SM of an H100).
    More tokens take 64 x 64 tiles. Both keep every dtype and width (a straddling code needs
    its own pointers and a second load) under ~180 registers, no spills, >= 2 CTAs per SM
    on sm_80 and sm_90a; wider tiles spilled (128 x 64 x 64 in fp32: 668 spill instructions
    on sm_80) or left one CTA per SM (128 x 64 x 32 at 8 warps in fp32). Interpreted, every
    program costs ~1 ms of Python per op: as few, as large programs as the shape allows.
    """
    if interpreted:
        return MatmulTiling(_clamp_pow2(m, MIN_DOT_TILE, 64), _clamp_pow2(n, MIN_DOT_TILE, 64),
                            _clamp_pow2(k, MIN_DOT_TILE, 256), 4, 1)
    if m <= 16:
        return MatmulTiling(16, 32, 64, 4, 2)
    return MatmulTiling(64, 64, 32, 4, 2)


def _dot_dtype_and_precision(x_dtype: torch.dtype, interpreted: bool):
    """The operand dtype of ``tl.dot`` and its fp32 precision.

    bf16 / fp16 x: products in x's dtype (the weight side is exact in both). fp32 x: tf32x3
    (three tf32 products: ~22 significant bits of x, the weight side exact in tf32) keeps the
    tensor cores at about fp32 accuracy, where "ieee" would run on CUDA cores. The interpreter
    multiplies bf16 as raw integers (SPEC 5): it gets fp32 operands, computed exactly."""
    if interpreted or x_dtype == torch.float32:
        return tl.float32, "tf32x3"
    return tl_dtype(x_dtype), "tf32x3"  # the precision only matters for fp32 operands


def matmul_launch(x, packed, step, bias, y, m, n, k, *, bits, code_offset, x_row_stride=None, interpreted=None,
                  level_offset=0.5):
    """``(Launch, args)`` of the kernel; tensors may be dtypes (the compile gate), ``bias`` None."""
    if interpreted is None:
        interpreted = is_interpreted(_dequant_matmul_kernel)
    tiling = plan_matmul(m, n, k, interpreted=interpreted)
    dot_dtype, precision = _dot_dtype_and_precision(dtype_of(x), interpreted)
    launch = Launch.of(
        _dequant_matmul_kernel, (triton.cdiv(m, tiling.block_m), triton.cdiv(n, tiling.block_n)), tiling,
        BITS=bits, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
    )
    args = (x, packed, step, step if bias is None else bias, y, m, n, k,
            k if x_row_stride is None else x_row_stride, packed_row_bytes(k, bits), float(code_offset) + level_offset)
    return launch, args


# ---- launcher ---------------------------------------------------------------------------


def packed_matmul_supports(x_dtype: torch.dtype) -> bool:
    """Whether the kernel takes activations of this dtype (callers send fp64 to a reference)."""
    return x_dtype in KERNEL_DTYPES


def _describe(t) -> str:
    return f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_matmul_args(x, packed, step, code_offset, bits, bias, level_offset=0.5) -> None:
    """Clear errors, naming the parameter and what it accepts, before anything is launched."""
    owner = "packed_matmul"
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{owner}: bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not isinstance(x, torch.Tensor) or x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{owner}: x must be a tensor of dtype {KERNEL_DTYPES}, got {_describe(x)}")
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"{owner}: x must be 2-D [M, K] with a contiguous last dimension, got shape "
                         f"{list(x.shape)} and strides {list(x.stride())}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"{owner}: packed must be a uint8 tensor [N, ceil(K * bits / 8)], got {_describe(packed)}")
    k = x.shape[1]
    if packed.dim() != 2 or packed.shape[1] != packed_row_bytes(k, bits):
        raise ValueError(
            f"{owner}: packed must be [N, {packed_row_bytes(k, bits)}] for K={k} codes of {bits} bits, "
            f"got shape {list(packed.shape)}")
    n = packed.shape[0]
    if not isinstance(step, torch.Tensor) or step.dtype != torch.float32 or tuple(step.shape) != (n,):
        raise ValueError(f"{owner}: step must be a float32 tensor of shape [N] = [{n}], got {_describe(step)}")
    if isinstance(code_offset, bool) or not isinstance(code_offset, int) or not 0 <= code_offset < 2**bits:
        raise ValueError(f"{owner}: code_offset must be an integer in 0..{2**bits - 1} for bits={bits}, "
                         f"got {code_offset!r}")
    if level_offset not in (0.0, 0.5):
        raise ValueError(f"{owner}: level_offset must be 0.5 (centered grid) or 0.0 (integer grid), got {level_offset!r}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or tuple(bias.shape) != (n,)):
        raise ValueError(f"{owner}: bias must be None or a floating-point tensor of shape [N] = [{n}], "
                         f"got {_describe(bias)}")
    for name, t in (("packed", packed), ("step", step), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{owner}: {name} is on {t.device}, x on {x.device}: all must be on one device")


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, step: torch.Tensor, code_offset: int, bits: int,
                   bias: torch.Tensor | None = None, level_offset: float = 0.5) -> torch.Tensor:
    """``x @ W^T (+ bias)`` in x's dtype (fp32 accumulation), ``W[n, k] = ((code[n, k] -
    code_offset) - level_offset) * step[n]`` with the codes read from ``packed`` (uint8
    ``[N, ceil(K * bits / 8)]``, ``cage.packing``'s format). ``x``: ``[M, K]`` fp32, bf16 or
    fp16 with a contiguous last dimension; ``step``: fp32 ``[N]``; ``bias``: ``[N]`` or None."""
    check_matmul_args(x, packed, step, code_offset, bits, bias, level_offset)
    (m, k), n = x.shape, packed.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    packed, step = packed.contiguous(), step.contiguous()
    bias = None if bias is None else bias.contiguous()
    launch, args = matmul_launch(x, packed, step, bias, y, m, n, k, bits=bits, code_offset=code_offset,
                                 x_row_stride=x.stride(0), level_offset=level_offset)
    launch(*args)
    return y

"""``y = (A B^T) * scale_a[:, None] * scale_b[None, :] (+ bias)``: an int8 x int8 GEMM with
int32 accumulation and the fp32 epilogue fused (issue 20's exact QAT forward, SPEC 1 "Integer
codes": ``q(x_h) q(W_h)^T = diag(d_x / 2) (C_x C_w^T) diag(d_w / 2)``).

Operands: ``A`` int8 ``[M, K]`` (the activation codes), ``B`` int8 ``[N, K]`` (the weight codes,
row-major as ``nn.Linear`` stores a weight), both with a contiguous last dimension; fp32 row
scales ``scale_a [M]`` and ``scale_b [N]``; an optional bias ``[N]`` of any float dtype.

A program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` and walks ``K`` in ``BLOCK_K`` slices,
``acc += tl.dot(a_tile, b_tile^T, out_dtype=tl.int32)`` (IMMA on sm_80, IMMA or the int8 wgmma,
IGMMA, on sm_90a; under the interpreter numpy's integer matmul, exact): the sum is exact while it fits
int32, i.e. while ``K * max|a| * max|b| <= 2**31 - 1`` (K <= 133,144 for codes within +-127,
9.5M for 4-bit codes within +-15). The codes are not read on the host to check that: the
caller states its bound (``max_abs_code``), and the launcher checks K against it. (Past
the bound every path is wrong in its own way: sm_80's ``IMMA....SAT`` saturates, numpy
wraps.) SASS (Triton 3.9): ``IMMA.16832.S8.S8.SAT`` on sm_80 and in sm_90a's 16-row decode
tiles, ``IGMMA.64x{32,128}x32.S8.S8`` (the int8 wgmma) in its 64-row tiles; the epilogue
is ``I2F`` + ``FMUL`` + ``FMUL`` + ``FADD``, no ``FFMA``.

The epilogue, in fp32, in this order, each step one IEEE-rounded operation (no FMA: the
kernel never calls ``tl.fma``, and :class:`Launch` compiles with ``enable_fp_fusion=False``,
so ``* scale_b`` and ``+ bias`` are not contracted)::

    y = float32(acc)            # exact while |acc| <= 2**24, else rounded to nearest even
    y = y * scale_a[m]
    y = y * scale_b[n]
    y = y + float32(bias[n])    # with a bias
    store y rounded to nearest even in out_dtype

which is bit for bit torch's ``(acc.float() * scale_a[:, None]) * scale_b[None, :] +
bias.float()`` followed by ``.to(out_dtype)``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .launch import Launch, PlanCache
from .quant_math import store_rounded
from .tiling import cdiv, is_interpreted, next_pow2

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT32_MAX = 2**31 - 1
# The magnitude the codes are assumed to stay within by default: the centered grid's
# |C| <= L - 1 <= 127 up to 7 bits (and the integer grid up to 8 bits).
DEFAULT_MAX_ABS_CODE = 127
# An int8 tensor holds -128 too.
MAX_ABS_INT8 = 128
# tl.dot needs >= 16 along M and N; int8 MMAs take K in steps of 32 (m16n8k32), so every
# K slice is at least 32 wide.
MIN_DOT_MN = 16
MIN_DOT_K = 32


def max_exact_k(max_abs_code=DEFAULT_MAX_ABS_CODE) -> int:
    """The longest K whose int32 sums are exact for codes within ``max_abs_code`` (an int for
    both operands, or a pair ``(max |a|, max |b|)``): ``(2**31 - 1) // (max|a| * max|b|)``."""
    code_a, code_b = _code_bounds(max_abs_code)
    return INT32_MAX // (code_a * code_b)


def _code_bounds(max_abs_code) -> tuple[int, int]:
    pair = tuple(max_abs_code) if isinstance(max_abs_code, (tuple, list)) else (max_abs_code, max_abs_code)
    if len(pair) != 2 or any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_ABS_INT8
                             for c in pair):
        raise ValueError(f"int8_matmul: max_abs_code must be an integer in 1..{MAX_ABS_INT8} or a pair of them "
                         f"(max |a|, max |b|), got {max_abs_code!r}")
    return pair


# ---- kernel -----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])  # any token count of one tiling: one compiled kernel
def _int8_matmul_kernel(
    a_ptr, b_ptr, scale_a_ptr, scale_b_ptr, bias_ptr, y_ptr,
    M, N, K, a_row_stride, b_row_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # program_id(0) runs fastest: neighbouring programs share one weight tile (read once from
    # memory, then from L2) and differ in their rows of a
    rows_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows_m < M
    n_ok = rows_n < N
    a_ptrs = a_ptr + rows_m[:, None] * a_row_stride + tl.arange(0, BLOCK_K)[None, :]
    b_ptrs = b_ptr + rows_n[:, None] * b_row_stride + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for k_start in range(0, K, BLOCK_K):
        if EVEN_K:  # no column mask: full-width loads
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0)
            b = tl.load(b_ptrs, mask=n_ok[:, None], other=0)
        else:  # columns past K are 0 on both sides
            col_ok = (k_start + tl.arange(0, BLOCK_K) < K)[None, :]
            a = tl.load(a_ptrs, mask=m_ok[:, None] & col_ok, other=0)
            b = tl.load(b_ptrs, mask=n_ok[:, None] & col_ok, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    # The epilogue, one rounding per operation in the documented order (module docstring).
    y = acc.to(tl.float32)
    y = y * tl.load(scale_a_ptr + rows_m, mask=m_ok, other=0.0)[:, None]
    y = y * tl.load(scale_b_ptr + rows_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_rounded(y_ptr + rows_m[:, None] * N + rows_n[None, :], y, m_ok[:, None] & n_ok[None, :])


# ---- planning ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Int8Tiling:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _clamp_pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, next_pow2(n)))


# Compiled tilings by token count (see plan_int8_matmul).
DECODE_MAX_M = 16
SMALL_MAX_M = 64
DECODE_TILING = Int8Tiling(16, 32, 128, 4, 4)
SMALL_TILING = Int8Tiling(64, 32, 128, 4, 4)
PREFILL_TILING = Int8Tiling(64, 128, 128, 4, 3)
UNALIGNED_PREFILL_TILING = Int8Tiling(64, 128, 32, 4, 3)
# Rows start on 16-byte boundaries when K, both row strides and both base pointers are
# multiples of 16: Triton then vectorizes the loads (and copies asynchronously); otherwise
# every byte is its own load and a 128-wide K slice spills on sm_80.
ROW_ALIGN = 16


@functools.lru_cache(maxsize=1024)
def plan_int8_tiling(m: int, n: int, k: int, *, interpreted: bool, aligned: bool = True) -> Int8Tiling:
    """Blocks for ``[m, k] @ [n, k]^T`` in int8.

    Compiled, by token count (one compiled kernel per tiling: M is not specialized):
    - decode, m <= 16: a read of the weight. A narrow N tile (4096 rows: 128 programs, about
      one per SM), K slices of 128 codes (one 128-byte line a row per load), 4 stages in
      flight: 50 registers, 9 CTAs/SM; IMMA on both sm_80 and sm_90a (16 rows is below
      wgmma's 64).
    - up to 64 tokens: all rows in one M tile, the same narrow N tile (the weight still read
      once, as many programs): 64 x 32 x 128, 107-116 registers on sm_80, 48-56 on sm_90a
      (int8 wgmma), 4 CTAs/SM.
    - more (prefill, training): 64 x 128 x 128 at 4 warps, 3 stages: 235 registers on sm_80
      (2 CTAs/SM), ~124 on sm_90a (wgmma m64n128, 3 CTAs/SM), 48-73 KB shared memory.
      With rows not 16-byte aligned (``aligned=False``: a K of 4100, a strided view) the
      loads are per byte and this tiling spills on sm_80 (54-70 LDL/STL) and takes 252
      registers on sm_90a: such calls take 32-wide K slices, ~215 / ~230 registers, no
      spills (a slow path: pad K to a multiple of 16 where speed matters).
    Tried and rejected (Triton 3.9, the compile gate's criteria): 128 x 128 x 64 at 8 warps
    (138-147 registers on sm_80, 155 on sm_90a with a bf16 bias: 1 CTA/SM), at 4 warps
    (sm_90a spills in fp32 out), 128 x 128 x 128 at 8 warps (1 CTA/SM on sm_80), 64 x 256 x 64
    at 8 warps (1 CTA/SM on sm_80). Speed unmeasured (no GPU yet). Interpreted, every program
    costs ~1 ms of Python per op: as few, as large programs as the shape allows.
    """
    if interpreted:
        return Int8Tiling(_clamp_pow2(m, MIN_DOT_MN, 64), _clamp_pow2(n, MIN_DOT_MN, 64),
                          _clamp_pow2(k, MIN_DOT_K, 256), 4, 1)
    if m <= DECODE_MAX_M:
        return DECODE_TILING
    if m <= SMALL_MAX_M:
        return SMALL_TILING
    return PREFILL_TILING if aligned else UNALIGNED_PREFILL_TILING


def int8_matmul_launch(a, b, scale_a, scale_b, bias, y, m, n, k, *, a_row_stride=None, b_row_stride=None,
                       pointers_aligned=True, interpreted=None):
    """``(Launch, args)`` of the kernel for ``a [m, k]``, ``b [n, k]``; tensors may be dtypes
    (the compile gate), ``bias`` None; row strides default to ``k``; ``pointers_aligned``:
    whether a's and b's base pointers are multiples of 16 bytes."""
    if interpreted is None:
        interpreted = is_interpreted(_int8_matmul_kernel)
    a_row_stride = k if a_row_stride is None else a_row_stride
    b_row_stride = k if b_row_stride is None else b_row_stride
    aligned = pointers_aligned and (k % ROW_ALIGN == a_row_stride % ROW_ALIGN == b_row_stride % ROW_ALIGN == 0)
    tiling = plan_int8_tiling(m, n, k, interpreted=interpreted, aligned=aligned)
    launch = Launch.of(
        _int8_matmul_kernel, (cdiv(m, tiling.block_m), cdiv(n, tiling.block_n)), tiling,
        BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        EVEN_K=k % tiling.block_k == 0, HAS_BIAS=bias is not None,
    )
    args = (a, b, scale_a, scale_b, scale_b if bias is None else bias, y, m, n, k, a_row_stride, b_row_stride)
    return launch, args


# ---- validation, plans, launcher --------------------------------------------------------


def int8_matmul_supports(k: int, out_dtype: torch.dtype = torch.float32, *,
                         max_abs_code=DEFAULT_MAX_ABS_CODE) -> bool:
    """Whether the kernel computes ``K``-long sums of codes within ``max_abs_code`` exactly
    and stores ``out_dtype`` (a pure function of numbers: no tensor, no device)."""
    return out_dtype in OUT_DTYPES and 0 <= k <= max_exact_k(max_abs_code)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} of shape {list(t.shape)} on {t.device}"
    return type(t).__name__


def check_int8_matmul_args(a, b, scale_a, scale_b, bias, out_dtype, max_abs_code) -> None:
    """Clear errors, naming the parameter and what it accepts, before anything is planned."""
    owner = "int8_matmul"
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8:
            raise ValueError(f"{owner}: {name} must be an int8 tensor, got {_describe(t)}")
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(f"{owner}: {name} must be 2-D with a contiguous last dimension, got shape "
                             f"{list(t.shape)} and strides {list(t.stride())}")
    (m, k), (n, k_b) = a.shape, b.shape
    if k_b != k:
        raise ValueError(f"{owner}: b must be [N, K] with a's K = {k} (b is the weight, row-major as "
                         f"nn.Linear stores it), got b of shape {list(b.shape)} and a of shape {list(a.shape)}")
    for name, t, rows in (("scale_a", scale_a, m), ("scale_b", scale_b, n)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (rows,):
            raise ValueError(f"{owner}: {name} must be a float32 tensor of shape [{rows}], got {_describe(t)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or tuple(bias.shape) != (n,)):
        raise ValueError(f"{owner}: bias must be None or a floating-point tensor of shape [N] = [{n}], "
                         f"got {_describe(bias)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{owner}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    for name, t in (("b", b), ("scale_a", scale_a), ("scale_b", scale_b), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{owner}: {name} is on {t.device}, a on {a.device}: all must be on one device")
    limit = max_exact_k(max_abs_code)
    if k > limit:
        raise ValueError(
            f"{owner}: K = {k} is too long for exact int32 sums of codes within max_abs_code={max_abs_code!r}: "
            f"K * max|a| * max|b| must stay <= 2**31 - 1, so K <= {limit}")


class Int8MatmulPlan:
    """A call planned once for one set of shapes, strides, dtypes and device, with nothing
    validated or planned again: ``plan(a, b, scale_a, scale_b, bias) -> y``."""

    __slots__ = ("launch", "tail", "out_shape", "out_dtype")

    def __init__(self, launch, tail, out_shape, out_dtype):
        self.launch, self.tail, self.out_shape, self.out_dtype = launch, tail, out_shape, out_dtype

    def __call__(self, a, b, scale_a, scale_b, bias=None):
        y = torch.empty(self.out_shape, dtype=self.out_dtype, device=a.device)
        if self.launch is not None:
            scale_a, scale_b = scale_a.contiguous(), scale_b.contiguous()
            bias = scale_b if bias is None else bias.contiguous()
            self.launch(a, b, scale_a, scale_b, bias, y, *self.tail)
        return y


def plan_int8_matmul(a, b, scale_a, scale_b, bias=None, out_dtype=torch.float32, *,
                     max_abs_code=DEFAULT_MAX_ABS_CODE) -> Int8MatmulPlan:
    """The :class:`Int8MatmulPlan` of calls with tensors like these (arguments as
    :func:`int8_matmul`'s); raises ValueError for what the kernel does not take."""
    check_int8_matmul_args(a, b, scale_a, scale_b, bias, out_dtype, max_abs_code)
    (m, k), n = a.shape, b.shape[0]
    if m == 0 or n == 0:
        return Int8MatmulPlan(None, (), (m, n), out_dtype)
    # k == 0 launches too: the K loop is empty and y = 0 * scales (+ bias), as torch's.
    launch, args = int8_matmul_launch(a.dtype, b.dtype, torch.float32, torch.float32,
                                      None if bias is None else bias.dtype, out_dtype, m, n, k,
                                      a_row_stride=a.stride(0), b_row_stride=b.stride(0),
                                      pointers_aligned=_pointers_aligned(a, b))
    return Int8MatmulPlan(launch, args[6:], (m, n), out_dtype)


def _pointers_aligned(a, b) -> bool:
    return (a.data_ptr() | b.data_ptr()) % ROW_ALIGN == 0


_PLANS = PlanCache()


def _meta(t):
    return (t.shape, t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor) else None


def _plan_key(a, b, scale_a, scale_b, bias, out_dtype, max_abs_code):
    """What a plan depends on (``max_abs_code`` checked and normalized to a pair); None (plan
    without caching, so the checks run and raise) when an argument is not a tensor."""
    metas = tuple(map(_meta, (a, b, scale_a, scale_b)))
    if None in metas or (bias is not None and not isinstance(bias, torch.Tensor)):
        return None
    try:
        hash(out_dtype)
    except TypeError:
        return None
    return metas + (_meta(bias), out_dtype, _code_bounds(max_abs_code), _pointers_aligned(a, b))


def int8_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32, *,
                max_abs_code=DEFAULT_MAX_ABS_CODE) -> torch.Tensor:
    """``y[m, n] = float32(sum_k a[m, k] b[n, k]) * scale_a[m] * scale_b[n] (+ bias[n])`` in
    ``out_dtype`` (fp32, bf16 or fp16; computed in fp32 in the order of the module docstring,
    bit for bit torch's ``(acc.float() * scale_a[:, None]) * scale_b[None, :] + bias.float()``).

    ``a``: int8 ``[M, K]``; ``b``: int8 ``[N, K]`` (the weight codes); both with a contiguous
    last dimension (any row stride). ``scale_a``: fp32 ``[M]``; ``scale_b``: fp32 ``[N]``;
    ``bias``: ``[N]`` of any float dtype (converted to fp32 first) or None. ``max_abs_code``:
    the caller's bound on ``|a|`` and ``|b|`` (an int for both or a pair), which sets the
    longest exact K (:func:`max_exact_k`; 133,144 at the default 127); the codes themselves are
    not checked. The int32 sum becomes fp32 exactly while ``|sum| <= 2**24``. Plans are cached
    by shapes, strides, dtypes, devices and arguments."""
    key = _plan_key(a, b, scale_a, scale_b, bias, out_dtype, max_abs_code)
    plan = None if key is None else _PLANS.get(key)
    if plan is None:
        plan = plan_int8_matmul(a, b, scale_a, scale_b, bias, out_dtype, max_abs_code=max_abs_code)
        if key is not None:
            _PLANS.put(key, plan)
    return plan(a, b, scale_a, scale_b, bias)

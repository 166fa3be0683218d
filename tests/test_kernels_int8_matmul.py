"""The int8 x int8 GEMM with int32 accumulation and the fused fp32 epilogue
(``cage_kernels.int8_matmul``), under Triton's interpreter on CPU (compiled on a GPU when there
is one), against an int64 reference: ``(a.long() @ b.long().T)`` then the epilogue in torch,
``(acc.float() * scale_a[:, None]) * scale_b[None, :] + bias.float()`` and ``.to(out_dtype)``.

Every comparison is bit for bit: the integer sum is exact in int32 within the K bound, and the
epilogue is the same sequence of IEEE fp32 operations on both sides (no FMA in the kernel).
"""

import importlib
import os
import random
import zlib

import pytest
import torch

import triton  # noqa: F401  (a missing triton fails here, loudly)

import cage_kernels
from cage_kernels.launch import PlanCache

# the module, not the package's attribute of that name (the function)
kernel_module = importlib.import_module("cage_kernels.int8_matmul")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
INT32_MAX = 2**31 - 1


def seeded(name: str) -> int:
    return zlib.crc32(name.encode())


def reference(a, b, scale_a, scale_b, bias, out_dtype):
    acc = a.cpu().long() @ b.cpu().long().T
    assert acc.abs().max().item() <= INT32_MAX if acc.numel() else True
    y = (acc.float() * scale_a.cpu()[:, None]) * scale_b.cpu()[None, :]
    if bias is not None:
        y = y + bias.cpu().float()
    return y.to(out_dtype)


def make_case(m, k, n, code, seed, bias_dtype=None):
    """Codes uniform in -code..code (the extremes included), half-step-like positive scales of
    a spread of magnitudes (fp16 outputs stay finite), a bias of ``bias_dtype`` or None."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-code, code + 1, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-code, code + 1, (n, k), generator=gen, dtype=torch.int8)
    # |acc| ~ code**2 sqrt(k) / 3: scales ~ 1 / (code sqrt k) keep y of order 1..100
    unit = 1.0 / (code * max(k, 1) ** 0.5)
    scale_a = (unit * torch.exp(torch.randn(m, generator=gen))).float()
    scale_b = (unit * torch.exp(torch.randn(n, generator=gen))).float()
    bias = None if bias_dtype is None else torch.randn(n, generator=gen).to(bias_dtype)
    return a, b, scale_a, scale_b, bias


def to_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def check(m, k, n, code, seed, out_dtype, bias_dtype=None, **kwargs):
    a, b, scale_a, scale_b, bias = make_case(m, k, n, code, seed, bias_dtype)
    y = cage_kernels.int8_matmul(*to_device(a, b, scale_a, scale_b, bias), out_dtype=out_dtype, **kwargs)
    assert y.dtype == out_dtype and y.shape == (m, n) and y.device.type == DEVICE
    ref = reference(a, b, scale_a, scale_b, bias, out_dtype)
    assert torch.equal(y.cpu(), ref), (m, k, n, code, seed, out_dtype, bias_dtype,
                                       (y.cpu().double() - ref.double()).abs().max().item())


# ---- exactness ----------------------------------------------------------------------------

# K: multiples of 16 (one K slice, a partial slice, two slices) and not; N odd
SHAPE_CASES = [(m, k, n) for m in (1, 3, 17, 64) for k, n in ((16, 1), (48, 33), (50, 5), (96, 17), (200, 7), (512, 3))]


@pytest.mark.parametrize("m,k,n", SHAPE_CASES)
def test_odd_shapes_are_exact(m, k, n):
    for code in (127, 15):
        check(m, k, n, code, seeded(f"shape{m}{k}{n}{code}"), torch.float32, torch.float32)


def _dtype_cases():
    cases = []
    for out_dtype in OUT_DTYPES:
        for bias_dtype in (None, torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for code in (127, 15):
                name = f"{NAMES[out_dtype]}-bias{NAMES.get(bias_dtype, 'none')}-code{code}"
                rng = random.Random(seeded(name))
                shape = rng.choice((1, 3, 17, 64)), rng.choice((16, 40, 96, 130)), rng.choice((1, 7, 33))
                cases.append(pytest.param(shape, code, out_dtype, bias_dtype, id=name))
    return cases


@pytest.mark.parametrize("shape,code,out_dtype,bias_dtype", _dtype_cases())
def test_out_dtypes_and_bias_are_exact(shape, code, out_dtype, bias_dtype):
    check(*shape, code, seeded(f"{shape}{code}{out_dtype}{bias_dtype}"), out_dtype, bias_dtype)


def test_fresh_random_inputs():
    # a new seed every run (in the message when it fails): exactness holds for any codes
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    for _ in range(4):
        m, k, n = rng.randint(1, 70), rng.randint(1, 300), rng.randint(1, 70)
        code = rng.choice((1, 7, 15, 63, 127))
        out_dtype = rng.choice(OUT_DTYPES)
        bias_dtype = rng.choice((None, torch.float32, torch.bfloat16))
        check(m, k, n, code, rng.getrandbits(31), out_dtype, bias_dtype)


def test_several_programs_and_k_slices(monkeypatch):
    # the interpreter's tiles cover most shapes above in one program; here the compiled tilings
    # (decode 16x32x128, small 64x32x128, prefill 64x128x128) cut them into several programs
    # and K slices, ragged at every edge
    real_plan = kernel_module.plan_int8_tiling
    monkeypatch.setattr(kernel_module, "plan_int8_tiling",
                        lambda m, n, k, interpreted, aligned: real_plan(m, n, k, interpreted=False, aligned=aligned))
    monkeypatch.setattr(kernel_module, "_PLANS", PlanCache())
    for m, k, n in ((5, 300, 70), (33, 256, 70), (70, 300, 130), (70, 512, 130)):
        check(m, k, n, 127, seeded(f"tiled{m}{k}{n}"), torch.bfloat16, torch.float32)


def test_sums_beyond_2_24_round_once_like_torch():
    # all codes +-127 with one sign per row: |acc| = k * 16129 > 2**24, so the int32 -> fp32
    # conversion itself rounds (to nearest even, on both sides)
    k, n = 1100, 3
    sign = torch.tensor([1, -1], dtype=torch.int8)[:, None]
    a = (sign * torch.full((2, k), 127, dtype=torch.int8)).to(torch.int8)
    b = torch.full((n, k), 127, dtype=torch.int8)
    b[1, :7] = 126  # |acc| = 127 * (1093 * 127 + 7 * 126) = 17,741,011: odd, above 2**24, rounded
    scale_a, scale_b = torch.ones(2), torch.tensor([1.0, 1.0, 0.5])
    y = cage_kernels.int8_matmul(*to_device(a, b, scale_a, scale_b))
    ref = reference(a, b, scale_a, scale_b, None, torch.float32)
    assert torch.equal(y.cpu(), ref)
    acc = a.long() @ b.long().T
    assert (acc.abs() > 2**24).all() and (ref.double() != acc.double()).any()  # rounding happened


def test_the_k_bound_is_tight():
    # at K = max_exact_k the extreme codes sum to within int32, exactly
    for code, kwargs in ((127, {}), (128, {"max_abs_code": 128})):
        k = kernel_module.max_exact_k(code)
        assert k * code * code <= INT32_MAX < (k + 1) * code * code
        value = -128 if code == 128 else 127
        a = torch.full((2, k), value, dtype=torch.int8)
        a[1] = -value if code == 127 else value
        b = torch.full((1, k), value, dtype=torch.int8)
        scale = torch.ones(2), torch.ones(1)
        y = cage_kernels.int8_matmul(*to_device(a, b, *scale), **kwargs)
        assert torch.equal(y.cpu(), reference(a, b, *scale, None, torch.float32)), code


def test_arbitrary_scales_strided_rows_and_empty_shapes():
    gen = torch.Generator().manual_seed(5)
    wide = torch.randint(-127, 128, (6, 160), generator=gen, dtype=torch.int8)
    a = wide[:, 32:128]  # row stride 160, last dimension contiguous
    b_wide = torch.randint(-127, 128, (9, 100), generator=gen, dtype=torch.int8)
    b = b_wide[:, :96]
    scale_a = torch.tensor([1.0, -2.0, 0.0, 3e-3, -1e-20, 7.0])
    scale_b = torch.randn(9, generator=gen)[::1]
    bias = torch.randn(18, generator=gen)[::2]  # a strided bias
    y = cage_kernels.int8_matmul(*to_device(a, b, scale_a, scale_b, bias))
    assert torch.equal(y.cpu(), reference(a, b, scale_a, scale_b, bias, torch.float32))
    # non-contiguous scales are copied
    sa2 = torch.randn(12, generator=gen)[::2]
    y = cage_kernels.int8_matmul(*to_device(a, b, sa2, scale_b))
    assert torch.equal(y.cpu(), reference(a, b, sa2, scale_b, None, torch.float32))
    # empty outputs, and K = 0: y = 0 * scales (+ bias)
    for m, k, n in ((0, 16, 3), (2, 16, 0), (2, 0, 3)):
        a, b, sa, sb, bias = make_case(m, k, n, 127, 1, torch.float32)
        y = cage_kernels.int8_matmul(*to_device(a, b, sa, sb, bias), out_dtype=torch.bfloat16)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert torch.equal(y.cpu(), reference(a, b, sa, sb, bias, torch.bfloat16))


def test_plans_are_cached_and_reusable(monkeypatch):
    monkeypatch.setattr(kernel_module, "_PLANS", PlanCache())
    a, b, sa, sb, bias = to_device(*make_case(3, 40, 5, 127, 9, torch.bfloat16))
    y1 = cage_kernels.int8_matmul(a, b, sa, sb, bias, out_dtype=torch.float16)
    assert len(kernel_module._PLANS) == 1
    y2 = cage_kernels.int8_matmul(a, b, sa, sb, bias, out_dtype=torch.float16)
    assert len(kernel_module._PLANS) == 1 and torch.equal(y1, y2)
    cage_kernels.int8_matmul(a, b, sa, sb, None, out_dtype=torch.float16)
    cage_kernels.int8_matmul(a, b, sa, sb, bias, out_dtype=torch.float16, max_abs_code=(127, 15))
    assert len(kernel_module._PLANS) == 3
    plan = cage_kernels.plan_int8_matmul(a, b, sa, sb, bias, torch.float16)
    assert torch.equal(plan(a, b, sa, sb, bias), y1)
    # the launch planning picks tilings by token count, one compiled kernel per tiling
    def tile(m, n=4096, k=4096):
        return kernel_module.plan_int8_tiling(m, n, k, interpreted=False)

    assert tile(1) == tile(16) == tile(16, 11008, 14336) == kernel_module.DECODE_TILING
    assert tile(17) == tile(64, 11008) == kernel_module.SMALL_TILING
    assert tile(65) == tile(4096, 14336) == tile(16384, 640, 1792) == kernel_module.PREFILL_TILING

    def launch_of(m, k, **kwargs):
        return kernel_module.int8_matmul_launch(torch.int8, torch.int8, torch.float32, torch.float32, None,
                                                torch.bfloat16, m, 4096, k, interpreted=False, **kwargs)[0]

    launch = launch_of(4096, 4096)
    assert launch.grid == (64, 32) and dict(launch.meta)["EVEN_K"] is True and dict(launch.meta)["HAS_BIAS"] is False
    # rows not on 16-byte boundaries (K, a row stride, a base pointer): 32-wide K slices
    for launch in (launch_of(4096, 4100), launch_of(4096, 4096, a_row_stride=4100),
                   launch_of(4096, 4096, pointers_aligned=False)):
        assert dict(launch.meta)["BLOCK_K"] == kernel_module.UNALIGNED_PREFILL_TILING.block_k
    assert dict(launch_of(4096, 4100).meta)["EVEN_K"] is False
    assert dict(launch_of(16, 4100).meta)["BLOCK_K"] == kernel_module.DECODE_TILING.block_k
    assert launch.options["enable_fp_fusion"] is False  # the epilogue's order is the reference's


def test_supports():
    supports = cage_kernels.int8_matmul_supports
    assert supports(4096) and supports(4096, torch.bfloat16) and supports(133144)
    assert not supports(133145) and supports(133145, max_abs_code=(127, 15)) and supports(9_544_371, max_abs_code=15)
    assert not supports(9_544_372, max_abs_code=15)
    assert not supports(4096, torch.float64) and not supports(4096, torch.int32)
    assert kernel_module.max_exact_k() == 133144 and kernel_module.max_exact_k((127, 7)) == INT32_MAX // 889


# ---- errors -----------------------------------------------------------------------------


def _good():
    return make_case(3, 32, 5, 127, 0, torch.float32)


def _with(**changes):
    a, b, sa, sb, bias = _good()
    args = dict(a=a, b=b, scale_a=sa, scale_b=sb, bias=bias)
    kwargs = {k: changes.pop(k) for k in ("out_dtype", "max_abs_code") if k in changes}
    args.update(changes)
    return args, kwargs


BAD_INPUTS = [
    ("a-float", dict(a=torch.zeros(3, 32)), r"a must be an int8 tensor, got torch.float32"),
    ("a-uint8", dict(a=torch.zeros(3, 32, dtype=torch.uint8)), r"a must be an int8 tensor"),
    ("a-list", dict(a=[[1, 2]]), r"a must be an int8 tensor, got list"),
    ("b-int32", dict(b=torch.zeros(5, 32, dtype=torch.int32)), r"b must be an int8 tensor"),
    ("a-1d", dict(a=torch.zeros(32, dtype=torch.int8)), r"a must be 2-D"),
    ("b-3d", dict(b=torch.zeros(1, 5, 32, dtype=torch.int8)), r"b must be 2-D"),
    ("a-transposed", dict(a=torch.zeros(32, 3, dtype=torch.int8).t()),
     r"a must be 2-D with a contiguous last dimension"),
    ("b-k-mismatch", dict(b=torch.zeros(5, 33, dtype=torch.int8)), r"b must be \[N, K\] with a's K = 32"),
    ("b-transposed-weight", dict(b=torch.zeros(32, 5, dtype=torch.int8)), r"b must be \[N, K\]"),
    ("scale_a-fp16", dict(scale_a=torch.ones(3, dtype=torch.float16)),
     r"scale_a must be a float32 tensor of shape \[3\]"),
    ("scale_a-shape", dict(scale_a=torch.ones(3, 1)), r"scale_a must be a float32 tensor of shape \[3\]"),
    ("scale_b-shape", dict(scale_b=torch.ones(3)), r"scale_b must be a float32 tensor of shape \[5\]"),
    ("scale_b-none", dict(scale_b=None), r"scale_b must be a float32 tensor of shape \[5\], got NoneType"),
    ("bias-shape", dict(bias=torch.ones(4)),
     r"bias must be None or a floating-point tensor of shape \[N\] = \[5\]"),
    ("bias-int", dict(bias=torch.ones(5, dtype=torch.int32)), r"bias must be None or a floating-point tensor"),
    ("out-fp64", dict(out_dtype=torch.float64), r"out_dtype must be one of"),
    ("out-int32", dict(out_dtype=torch.int32), r"out_dtype must be one of"),
    ("out-str", dict(out_dtype="float32"), r"out_dtype must be one of"),
    ("scale-device", dict(scale_b=torch.ones(5, device="meta")), r"scale_b is on meta, a on"),
    ("b-device", dict(b=torch.zeros(5, 32, dtype=torch.int8, device="meta")), r"b is on meta, a on"),
    ("code-0", dict(max_abs_code=0), r"max_abs_code must be an integer in 1..128"),
    ("code-129", dict(max_abs_code=129), r"max_abs_code must be an integer in 1..128"),
    ("code-bool", dict(max_abs_code=True), r"max_abs_code must be an integer"),
    ("code-float", dict(max_abs_code=15.0), r"max_abs_code must be an integer"),
    ("code-triple", dict(max_abs_code=(1, 2, 3)), r"max_abs_code must be an integer in 1..128 or a pair"),
]


@pytest.mark.parametrize("name,changes,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, changes, message):
    args, kwargs = _with(**changes)
    with pytest.raises(ValueError, match=message):
        cage_kernels.int8_matmul(**args, **kwargs)
    with pytest.raises(ValueError, match=message):
        cage_kernels.plan_int8_matmul(**args, **kwargs)


def test_k_beyond_the_exact_bound_is_refused():
    k = kernel_module.max_exact_k() + 1
    a, b = torch.zeros(1, k, dtype=torch.int8), torch.zeros(2, k, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"K = 133145 is too long for exact int32 sums.*K <= 133144"):
        cage_kernels.int8_matmul(a, b, torch.ones(1), torch.ones(2))
    # a smaller stated bound admits it (nothing launched here: M = 0)
    y = cage_kernels.int8_matmul(a[:0], b, torch.ones(0), torch.ones(2), max_abs_code=(127, 15))
    assert y.shape == (0, 2)
    with pytest.raises(ValueError, match=r"K <= 9544371"):
        big = torch.zeros(0, 9_544_372, dtype=torch.int8)
        cage_kernels.int8_matmul(big, torch.zeros(1, 9_544_372, dtype=torch.int8), torch.ones(0), torch.ones(1),
                                 max_abs_code=15)

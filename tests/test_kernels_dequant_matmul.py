"""The fused dequantize-and-multiply kernel (``cage_kernels.packed_matmul``) and the converted
layer's Triton path, against ``dequantize_codes`` + ``F.linear`` computed in fp32, under
Triton's interpreter on CPU (compiled on a GPU when there is one).

Tolerances: relative RMS error of y against that fp32 reference, from the same inputs.
- fp32: both sides accumulate in fp32 and differ only in the order of the sums and in where
  the row step is applied (the kernel scales the finished sum): a few fp32 roundings per
  output, relative ~1e-7 here. 1e-5 leaves room for K up to thousands and for tf32x3 on a GPU
  (~22 significant bits of x per product); a wrong code, nibble or row is off by O(1).
- bf16 / fp16: the output is rounded once to x's dtype, a relative error of at most 2**-8
  (bf16) / 2**-11 (fp16) per element; the layer's rotate-back path rounds the rotated x once
  more. Two such roundings bound the RMS: 2**-7 and 2**-10.
Where the arithmetic is exact (fp32, small integers, a power-of-two step) the result must be
equal bit for bit.
"""

import importlib
import random
import zlib

import pytest
import torch

import torch.nn.functional as F
import triton  # noqa: F401  (a missing triton fails here, loudly)

import cage
import cage_kernels
from cage.convert import QuantizedLinear, _code_offset, _grid_step, dequantize_codes
from cage.functional import fake_quantize
from cage.packing import pack_codes
from cage_kernels import dequant_matmul as kernel_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
TOKENS, IN_FEATURES, OUT_FEATURES = (1, 5, 33), (32, 96, 200), (1, 17, 48)


def seeded(name: str) -> int:
    return zlib.crc32(name.encode())


def relative_rms(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_weight(n, k, bits, seed):
    """Random codes (every level, the extremes included), their packing, a per-row step of
    the size the quantizer gives unit-RMS rows, and the code offset."""
    gen = torch.Generator().manual_seed(seed)
    config = cage.QuantConfig(bits, hadamard=False)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    scale = config.alpha * torch.exp(0.5 * torch.randn(n, 1, generator=gen))
    return codes, pack_codes(codes, bits), scale, config


def reference(x, codes, scale, config, bias):
    """dequantize_codes + F.linear, all in fp32."""
    w = dequantize_codes(codes, scale, config, rotate_back=False, dtype=torch.float32)
    return F.linear(x.float(), w, None if bias is None else bias.float())


def run_kernel(x, packed, scale, config, bias):
    step = _grid_step(scale, config).reshape(-1)
    return cage_kernels.packed_matmul(x, packed, step, _code_offset(config), config.bits, bias)


def check_case(m, k, n, bits, dtype, with_bias, seed):
    codes, packed, scale, config = make_weight(n, k, bits, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    to = dict(device=DEVICE)
    y = run_kernel(x.to(**to), packed.to(**to), scale.to(**to), config, None if bias is None else bias.to(**to))
    assert y.dtype == dtype and y.shape == (m, n)
    ref = reference(x, codes, scale, config, bias)
    err = relative_rms(y.cpu(), ref)
    assert err <= RTOL[dtype], (m, k, n, bits, dtype, with_bias, err)
    return err


@pytest.mark.parametrize("k", IN_FEATURES)
@pytest.mark.parametrize("m", TOKENS)
def test_odd_shapes_match_the_reference(m, k):
    # 3 bits: codes straddle bytes; every N of the set, every dtype
    for n in OUT_FEATURES:
        for dtype in DTYPES:
            check_case(m, k, n, 3, dtype, True, seeded(f"{m}x{k}x{n}{dtype}"))


def _bits_cases():
    cases = []
    for bits in range(1, 9):
        for dtype in DTYPES:
            for with_bias in (False, True):
                name = f"b{bits}-{DTYPE_NAMES[dtype]}-{'bias' if with_bias else 'nobias'}"
                rng = random.Random(seeded(name))
                shape = rng.choice(TOKENS), rng.choice(IN_FEATURES), rng.choice(OUT_FEATURES)
                cases.append(pytest.param(shape, bits, dtype, with_bias, id=name))
    return cases


@pytest.mark.parametrize("shape,bits,dtype,with_bias", _bits_cases())
def test_every_width_dtype_and_bias_matches_the_reference(shape, bits, dtype, with_bias):
    check_case(*shape, bits, dtype, with_bias, seeded(f"{shape}{bits}{dtype}{with_bias}"))


def test_several_programs_and_k_slices(monkeypatch):
    # the interpreter's tiles cover the shapes above in one program; here the compiled tilings
    # (16 x 32 x 64 and 64 x 64 x 32) cut them into several programs and K slices, ragged
    real_plan = kernel_module.plan_matmul
    monkeypatch.setattr(kernel_module, "plan_matmul", lambda m, n, k, interpreted: real_plan(m, n, k, interpreted=False))
    for m, k, n in ((5, 200, 48), (33, 200, 48), (70, 96, 17)):
        for bits in (3, 4):
            check_case(m, k, n, bits, torch.float32, True, seeded(f"tiled{m}{k}{n}{bits}"))


def test_exact_for_small_integers_in_fp32():
    # x and bias small integers, step 0.5: every product and partial sum is a multiple of 1/4
    # far below 2**24, so any order of summation gives the same fp32 number
    gen = torch.Generator().manual_seed(3)
    for bits in (2, 3, 4, 5, 8):
        config = cage.QuantConfig(bits, hadamard=False)
        for m, k, n in ((1, 32, 17), (33, 200, 48)):
            codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
            scale = torch.full((n, 1), 0.25 * (config.levels - 1))  # step = 2 s / (levels - 1) = 0.5
            x = torch.randint(-3, 4, (m, k), generator=gen).float()
            bias = torch.randint(-5, 6, (n,), generator=gen).float()
            y = run_kernel(x.to(DEVICE), pack_codes(codes, bits).to(DEVICE), scale.to(DEVICE), config, bias.to(DEVICE))
            assert torch.equal(y.cpu(), reference(x, codes, scale, config, bias)), (bits, m, k, n)


def test_rows_of_x_with_a_stride():
    codes, packed, scale, config = make_weight(17, 96, 5, 11)
    wide = torch.randn(5, 160, generator=torch.Generator().manual_seed(12))
    x = wide[:, 32:128]  # row stride 160, last dimension contiguous
    y = run_kernel(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), config, None)
    assert relative_rms(y.cpu(), reference(x, codes, scale, config, None)) <= RTOL[torch.float32]


# ---- the converted layer -----------------------------------------------------------------


def _converted(in_f, out_f, bias, w_cfg, a_cfg, seed):
    torch.manual_seed(seed)
    qat = cage.QATLinear(in_f, out_f, bias, weight_quant=w_cfg, act_quant=a_cfg, backend="torch")
    with torch.no_grad():
        if bias:
            qat.bias.normal_()
    return QuantizedLinear.from_qat(qat.eval())


LAYER_CASES = {
    # one block Hadamard on both sides: the product runs in the rotated domain
    "shared-rotation": (200, dict(bits=4, block_size=8), dict(bits=4, block_size=8)),
    # different blocks: the weight would be rotated back; x is rotated instead
    "rotate-back": (96, dict(bits=3, block_size=32), dict(bits=4, block_size=16)),
    # weight-only quantization with a rotation: rotated back too
    "weight-only-rotated": (96, dict(bits=5, block_size=32), None),
    "no-rotation": (200, dict(bits=2, hadamard=False), dict(bits=8, hadamard=False)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("case", LAYER_CASES)
def test_quantized_linear_triton_path_matches_the_reference(case, dtype):
    in_f, w_kwargs, a_kwargs = LAYER_CASES[case]
    w_cfg = cage.QuantConfig(**w_kwargs)
    a_cfg = cage.QuantConfig(**a_kwargs) if a_kwargs else None
    layer = _converted(in_f, 17, case != "no-rotation", w_cfg, a_cfg, seeded(case)).to(DEVICE, dtype)
    layer.backend = "triton"
    x = torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(seeded(case) + 1)).to(DEVICE, dtype)
    with torch.no_grad():
        y = layer(x)
        rotate_back = layer.rotates_weight_back()
        assert rotate_back == (case != "shared-rotation")
        # the same (Triton) activation quantizer on both sides: this compares the matmul only
        x_q = x if a_cfg is None else fake_quantize(x, a_cfg, backend="triton", rotate_back=rotate_back)
        w = dequantize_codes(layer.codes(), layer.weight_scale, w_cfg, rotate_back, torch.float32)
        ref = F.linear(x_q.float(), w, None if layer.bias is None else layer.bias.float())
    assert y.dtype == dtype and y.shape == (2, 5, 17)
    assert relative_rms(y, ref) <= RTOL[dtype], relative_rms(y, ref)


def test_quantized_linear_dispatch(monkeypatch):
    calls = []
    real = cage_kernels.packed_matmul
    monkeypatch.setattr(cage_kernels, "packed_matmul", lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw))
    w_cfg, a_cfg = cage.QuantConfig(4, block_size=32), cage.QuantConfig(4, block_size=32)
    layer = _converted(64, 8, True, w_cfg, a_cfg, 0)
    x = torch.randn(3, 64)
    with torch.no_grad():
        reference_out = layer(x)  # backend "torch" from the QAT layer
        assert calls == []
        layer.backend = "triton"
        fused = layer(x)
        assert calls == [torch.float32]
        assert relative_rms(fused, reference_out) <= 1e-4  # the two activation quantizers may differ at a tie
        # "auto" keeps the torch path even where it resolves to Triton (a CUDA device): the
        # fused kernel is opt-in until it is measured on a GPU
        layer.backend = "auto"
        monkeypatch.setattr(importlib.import_module("cage.convert")._backend, "resolve", lambda *a, **kw: "triton")
        assert relative_rms(layer(x), reference_out) <= 1e-4 and calls == [torch.float32]  # no fused call
        monkeypatch.undo()
        monkeypatch.setattr(cage_kernels, "packed_matmul", lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw))
        layer.backend = "triton"
        layer.double()  # fp64: the kernel does not take it, the reference runs
        assert layer(x.double()).dtype == torch.float64 and calls == [torch.float32]
        layer.float()
        with pytest.raises(RuntimeError, match="dtype"):  # F.linear's own error, as before
            layer(x.half())


# ---- planning and bad input --------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 16, 17, 512, 4096])
@pytest.mark.parametrize("interpreted", [False, True])
def test_tiles_are_dot_shaped(m, interpreted):
    tiling = kernel_module.plan_matmul(m, 4096, 4096, interpreted=interpreted)
    for block in (tiling.block_m, tiling.block_n, tiling.block_k):
        assert block >= 16 and block & (block - 1) == 0
    if m <= 16:  # a decode batch is padded to the dot's 16 rows, no further
        assert tiling.block_m == 16


def _good_args():
    x = torch.randint(-3, 4, (4, 30), generator=torch.Generator().manual_seed(0)).float()
    packed = torch.zeros(6, 12, dtype=torch.uint8)  # 30 codes of 3 bits: 90 bits, 12 bytes
    return dict(x=x, packed=packed, step=torch.ones(6), code_offset=3, bits=3, bias=None)


@pytest.mark.parametrize("change,error,words", [
    (dict(packed=torch.zeros(6, 12, dtype=torch.int32)), TypeError, "packed must be a uint8 tensor"),
    (dict(packed=torch.zeros(6, 11, dtype=torch.uint8)), ValueError, r"packed must be \[N, 12\] for K=30 codes of 3 bits"),
    (dict(bits=4), ValueError, r"packed must be \[N, 15\]"),
    (dict(bits=0), ValueError, r"bits must be an integer in 1..8, got 0"),
    (dict(bits=9), ValueError, r"bits must be an integer in 1..8, got 9"),
    (dict(bits=True), ValueError, "bits must be an integer"),
    (dict(x=torch.ones(4, 30, dtype=torch.int64)), TypeError, "x must be a tensor of dtype"),
    (dict(x=torch.randn(4, 30, dtype=torch.float64)), TypeError, "x must be a tensor of dtype"),
    (dict(x=torch.randn(30)), ValueError, r"x must be 2-D \[M, K\]"),
    (dict(x=torch.randn(30, 4).t()), ValueError, "contiguous last dimension"),
    (dict(step=torch.ones(6, 1)), ValueError, r"step must be a float32 tensor of shape \[N\] = \[6\]"),
    (dict(step=torch.ones(6, dtype=torch.float64)), ValueError, "step must be a float32"),
    (dict(code_offset=8), ValueError, r"code_offset must be an integer in 0..7 for bits=3"),
    (dict(code_offset=3.0), ValueError, "code_offset must be an integer"),
    (dict(bias=torch.ones(5)), ValueError, r"bias must be None or a floating-point tensor of shape \[N\] = \[6\]"),
])
def test_bad_input_is_named(change, error, words):
    with pytest.raises(error, match=words):
        cage_kernels.packed_matmul(**{**_good_args(), **change})


def test_good_arguments_of_the_bad_input_test_run():
    # the cases above fail for their change alone
    y = cage_kernels.packed_matmul(**{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                                      for k, v in _good_args().items()})
    assert y.shape == (4, 6)
    # all codes 0, offset 3: every weight is -3.5, so y is -3.5 times the (integer) row sums of x
    assert torch.equal(y.cpu(), -3.5 * _good_args()["x"].sum(1, keepdim=True).expand(4, 6))

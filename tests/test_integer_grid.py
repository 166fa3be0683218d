"""The zero-including integer grid (``QuantConfig(grid="integer")``, SPEC 1): levels ``k d`` with
``k = -2**(b-1) .. 2**(b-1) - 1`` and ``d = s / 2**(b-1)``; its MSE-optimal clip table; the
reference, convert and the integer product on it. (The kernels' agreement with the reference on
this grid is in test_kernels_fake_quant.py and test_kernels_optim.py.)"""

import math

import pytest
import torch

from cage import QATLinear, QuantConfig, convert, naive, prepare_qat
from cage.config import ALPHA, ALPHA_INTEGER
from cage.ops import fake_quant


def test_grid_names_and_the_one_bit_refusal():
    assert QuantConfig(4).grid == "centered"  # the default of every method
    with pytest.raises(ValueError, match=r"grid must be one of \('centered', 'integer'\)"):
        QuantConfig(4, grid="zero")
    with pytest.raises(ValueError, match="integer grid needs bits in 2..8"):
        QuantConfig(1, grid="integer")
    c = QuantConfig(4, grid="integer")
    assert str(c) == "W4/H128/trust/int" and QuantConfig.from_dict(c.to_dict()) == c
    legacy = {"bits": 4, "hadamard": True, "block_size": 128, "grad_mask": "trust"}  # files from before the grid
    assert QuantConfig.from_dict(legacy).grid == "centered"


# ---- the clip table ---------------------------------------------------------------------


def gaussian_mse(levels: list[float]) -> float:
    """``E (z - Q(z))^2`` for ``z ~ N(0, 1)`` rounded to the nearest of ``levels`` (sorted)."""
    edges = [-math.inf] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [math.inf]
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    pdf = lambda z: 0.0 if math.isinf(z) else math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    zpdf = lambda z: 0.0 if math.isinf(z) else z * pdf(z)  # noqa: E731
    return sum((1 + c * c) * (cdf(b) - cdf(a)) - (zpdf(b) - zpdf(a)) + 2 * c * (pdf(b) - pdf(a))
               for c, a, b in zip(levels, edges, edges[1:]))


def integer_levels(alpha: float, bits: int, symmetric: bool = False) -> list[float]:
    half = 2 ** (bits - 1)
    if symmetric:  # the other candidate code range: -(half - 1) .. half - 1, step s / (half - 1)
        return [k * alpha / (half - 1) for k in range(-(half - 1), half)]
    return [k * alpha / half for k in range(-half, half)]


def argmin(f, lo=0.3, hi=8.0):
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(100):  # golden section; the MSE is unimodal in the clip
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return (lo + hi) / 2


@pytest.mark.parametrize("bits", range(2, 9))
def test_the_integer_clip_table_is_mse_optimal_and_beats_the_symmetric_code_range(bits):
    best = argmin(lambda a: gaussian_mse(integer_levels(a, bits)))
    assert abs(best - ALPHA_INTEGER[bits]) < 1e-6
    ours = gaussian_mse(integer_levels(ALPHA_INTEGER[bits], bits))
    symmetric = gaussian_mse(integer_levels(argmin(lambda a: gaussian_mse(integer_levels(a, bits, True))), bits, True))
    assert ours < symmetric  # the range int4 kernels take is also the better one
    assert QuantConfig(bits, grid="integer").alpha == ALPHA_INTEGER[bits] != ALPHA[bits]


# ---- the reference ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_levels_are_integer_multiples_of_the_step_with_zero(bits):
    config = QuantConfig(bits, hadamard=False, grid="integer")
    x = torch.randn(6, 256, dtype=torch.float64) * 3
    x[:, 0] = 0.0
    q, _ = naive.quantize(x, config)
    s = naive.row_scale(x, config)
    d = 2 * s / config.levels
    k = q / d
    assert bool(((k - torch.round(k)).abs() < 1e-9).all())  # q = k d was one rounding
    k = torch.round(k)
    assert int(k.min()) >= -(config.levels // 2) and int(k.max()) <= config.levels // 2 - 1
    assert bool((q[:, 0] == 0).all())  # zero is a level
    assert torch.equal(naive.round_to_grid(q, s, config), q)  # idempotent at a fixed scale


def test_the_trust_mask_is_half_a_step_of_the_integer_grid():
    config = QuantConfig(3, hadamard=False, grid="integer")
    x = torch.randn(4, 512, dtype=torch.float64) * 2
    q, mask = naive.quantize(x, config)
    d = 2 * naive.row_scale(x, config) / config.levels
    torch.testing.assert_close(mask, (q - x).abs() <= d / 2)
    assert not bool(mask.all())  # the clipped tails fall outside


# ---- convert, the fused packed matmul, the integer product ---------------------------------


def small_model(grid, bits=4, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
    q = QuantConfig(bits, block_size=32, grid=grid)
    return prepare_qat(model, weight=q, activation=q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_convert_is_bit_identical_on_the_integer_grid(bits):
    model = small_model("integer", bits)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
        convert(model)
        assert torch.equal(model(x), expected)
    codes = model[0].codes()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1


def test_the_fused_packed_matmul_reads_integer_levels():
    model = small_model("integer")
    with torch.no_grad():
        convert(model)
        layer = model[0]
        x = torch.randn(7, 64)
        reference = layer(x)
        layer.backend = "triton"  # the Triton kernel under the interpreter
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eight_bit_integer_codes_fit_the_int8_product(backend):
    torch.manual_seed(1)
    q8 = QuantConfig(8, block_size=32, grid="integer")
    layer = QATLinear(96, 16, True, weight_quant=q8, act_quant=q8, backend=backend, matmul="int8")
    x = torch.randn(20, 96)
    ops = fake_quant.get_ops(backend, x.device)
    cx, sx, _ = ops.quantize_codes(x, q8)
    cw, sw, _ = ops.quantize_codes(layer.weight.detach(), q8)
    assert int(cx.min()) >= -128 and int(cx.max()) <= 127
    exact = (cx.long() @ cw.long().t()).double() * sx.double()[:, None] * sw.double()[None, :]
    exact = exact + layer.bias.detach().double()
    y = layer(x)
    assert bool(((y.double() - exact).abs() <= 4 * 2.0**-24 * (exact.abs() + 1)).all())
    # on the centered grid 8 bits do not fit int8: that layer takes the dequantized product
    assert not QuantConfig(8).codes_fit_int8 and q8.codes_fit_int8

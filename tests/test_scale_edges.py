"""The quantizer's row scale at the edges of the dtypes (issue 17 item 8): squares that would
overflow or underflow, tiny rows the eps used to swamp, fp16 rows whose clip point leaves fp16,
all-zero rows; and bit-identity with the plain formula for every ordinary row. Reference and
kernels (interpreter on CPU) together."""

import pytest
import torch

from cage import QuantConfig, naive
from cage.config import RMS_EPS
from cage.ops import fake_quant
from cage.testing import check_fake_quant

Q4 = QuantConfig(4, block_size=32)
BACKENDS = ["torch", "triton"]


def quantize(x, config, backend, rotate_back=True):
    ops = fake_quant.get_ops(backend, x.device)
    q, mask = ops.quantize(x, config, rotate_back)
    return q, ops.mask_to_bool(mask, x.shape)


def exact_scale(x, config):
    """``alpha * rms`` of the rotated rows in float64, with no eps."""
    x_h = naive.block_rotate(x.double(), config.block_size) if config.hadamard else x.double()
    return config.alpha * x_h.square().mean(dim=-1, keepdim=True).sqrt()


def test_ordinary_rows_keep_the_plain_formulas_bits():
    # the power-of-two prescaling is exact: the scale is bit for bit alpha * sqrt(mean + eps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen) * torch.exp(torch.randn(64, 1, generator=gen) * 3)
    plain = Q4.alpha * torch.sqrt(x.square().mean(dim=-1, keepdim=True) + RMS_EPS)
    assert torch.equal(naive.row_scale(x, Q4), plain)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e20), (torch.bfloat16, 1e30), (torch.float32, 1e34)])
def test_squares_that_overflow_fp32_give_the_finite_scale(backend, dtype, big):
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    x[:, 5] = big
    x = x.to(dtype)
    assert not torch.isfinite(x.float().square().sum(dim=-1)).all()  # the premise: fp32 squares overflow
    s = naive.row_scale(naive.block_rotate(x.float(), 32), Q4)
    torch.testing.assert_close(s.double(), exact_scale(x, Q4), rtol=1e-6, atol=0)
    q, mask = quantize(x, Q4, backend)
    assert bool(torch.isfinite(q).all())
    check_fake_quant(x, Q4, True, q, mask)  # decisions as the reference's; values to rounding of s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [2.0**-60, 2.0**-30, 2.0**40])
def test_the_quantizer_is_scale_invariant_for_powers_of_two(backend, c):
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    q, mask = quantize(x, Q4, backend)
    q_c, mask_c = quantize(x * c, Q4, backend)
    assert torch.equal(q_c, q * c) and torch.equal(mask_c, mask)


@pytest.mark.parametrize("rms", [1e-12, 1e-20, 1e-30])
def test_tiny_rows_are_scaled_by_their_own_rms_not_by_the_eps(rms):
    # before: s = alpha * sqrt(mean + 1e-20) put an rms of 1e-12 off by a factor of 16
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3)) * rms
    s = naive.row_scale(x, QuantConfig(4, hadamard=False))
    torch.testing.assert_close(s.double(), exact_scale(x, QuantConfig(4, hadamard=False)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_rows_whose_clip_point_leaves_fp16_keep_finite_levels(backend):
    x = torch.full((2, 64), 30000.0, dtype=torch.float16)
    x[:, ::2] = -30000.0  # rms 30000: alpha * rms = 75418 > 65504
    for config in (QuantConfig(4, hadamard=False), QuantConfig(4, hadamard=False, grid="integer")):
        q, _ = quantize(x, config, backend, rotate_back=False)
        assert bool(torch.isfinite(q).all())
        assert float(q.float().abs().max()) <= 65504
        q_ref, _ = quantize(x, config, "torch", rotate_back=False)
        assert torch.equal(q, q_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_zero_row_stays_finite(backend):
    x = torch.zeros(3, 64)
    x[1] = torch.randn(64)
    q, _ = quantize(x, Q4, backend)
    assert bool(torch.isfinite(q).all()) and float(q[0].abs().max()) < 1e-8
    assert float(naive.row_scale(x, Q4)[0]) > 0

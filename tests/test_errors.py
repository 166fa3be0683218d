"""Bad input gets a clear error that names the parameter and what is accepted."""

import dataclasses

import pytest
import torch
from torch import nn

from cage import CAGEAdamW, QATLinear, QuantConfig, fake_quantize, prepare_qat, quantize_dequantize


@pytest.mark.parametrize("bits", [0, 9, -1, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        QuantConfig(bits)


@pytest.mark.parametrize("block_size", [0, 3, 96, -4, 2.0])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        QuantConfig(4, block_size=block_size)


def test_bad_grad_mask():
    with pytest.raises(ValueError, match=r"grad_mask must be one of \('none', 'clip', 'trust'\)"):
        QuantConfig(4, grad_mask="ste")


def test_bad_hadamard_flag():
    with pytest.raises(ValueError, match="hadamard must be True or False"):
        QuantConfig(4, hadamard="yes")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig(4).bits = 3


def test_row_not_divisible_by_block_names_both_numbers():
    with pytest.raises(ValueError, match=r"\(100\).*block_size \(128\)"):
        quantize_dequantize(torch.randn(3, 100), QuantConfig(4))
    with pytest.raises(ValueError, match=r"\(96\).*block_size \(64\)"):
        fake_quantize(torch.randn(2, 96, requires_grad=True), QuantConfig(4, block_size=64))
    # without rotation any row length works
    q, _ = quantize_dequantize(torch.randn(3, 100), QuantConfig(4, hadamard=False))
    assert q.shape == (3, 100)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_float_tensors_are_type_errors(dtype):
    x = torch.ones(2, 128).to(dtype)
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        quantize_dequantize(x, QuantConfig(4))


def test_non_tensor_and_non_config():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        quantize_dequantize([1.0, 2.0], QuantConfig(4, hadamard=False))
    with pytest.raises(TypeError, match="config must be a cage.QuantConfig"):
        quantize_dequantize(torch.randn(2, 128), 4)
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize_dequantize(torch.tensor(1.0), QuantConfig(4, hadamard=False))


def test_bad_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\)"):
        quantize_dequantize(torch.randn(2, 128), QuantConfig(4), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        CAGEAdamW([nn.Parameter(torch.randn(2, 2))], total_steps=1, backend="fast")


def test_prepare_qat_names_the_layer_the_block_does_not_divide():
    model = nn.Sequential(nn.Linear(128, 100), nn.Linear(100, 128))
    with pytest.raises(ValueError, match=r"layer '1'.*\(100\).*block_size \(128\)"):
        prepare_qat(model, weight=QuantConfig(4), activation=QuantConfig(4))


def test_qat_linear_rejects_non_config():
    with pytest.raises(TypeError, match="weight_quant must be a QuantConfig or None"):
        QATLinear(128, 4, weight_quant=4)


def params():
    return [nn.Parameter(torch.randn(4, 128))]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr must be >= 0"),
        (dict(betas=(0.9, 1.0)), r"betas must be a pair in \[0, 1\)"),
        (dict(eps=-1e-8), "eps must be >= 0"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(total_steps=0), "total_steps must be a positive integer"),
        (dict(total_steps=10.5), "total_steps must be a positive integer"),
        (dict(cage_lambda=-1.0), "cage_lambda must be >= 0"),
        (dict(silence_ratio=1.0), r"silence_ratio must be in \[0, 1\)"),
        (dict(schedule="cosine"), r"schedule must be one of \('linear_ramp', 'constant'\)"),
        (dict(coupling="both"), r"coupling must be one of \('decoupled', 'coupled'\)"),
        (dict(check_finite="yes"), "check_finite must be None, True, False, 'raise' or 'skip'"),
    ],
)
def test_optimizer_hyperparameters(kwargs, match):
    kwargs = {"total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        CAGEAdamW(params(), **kwargs)


def test_optimizer_requires_total_steps():
    with pytest.raises(TypeError, match="total_steps"):
        CAGEAdamW(params())


def test_optimizer_quant_group_checks():
    with pytest.raises(ValueError, match=r"quant must be a cage.QuantConfig or None"):
        CAGEAdamW([{"params": params(), "quant": 4}], total_steps=10)
    with pytest.raises(ValueError, match=r"shape \(4, 100\).*\(100\).*block_size \(128\)"):
        CAGEAdamW([{"params": [nn.Parameter(torch.randn(4, 100))], "quant": QuantConfig(4)}], total_steps=10)
    with pytest.raises(ValueError, match="quantized parameters are matrices"):
        CAGEAdamW([{"params": [nn.Parameter(torch.randn(128))], "quant": QuantConfig(4)}], total_steps=10)


def test_nan_gradient_is_a_clear_error_and_no_step_is_taken():
    p, q = nn.Parameter(torch.randn(4, 128)), nn.Parameter(torch.randn(4, 128))
    opt = CAGEAdamW([{"params": [p], "quant": QuantConfig(4)}, {"params": [q]}], total_steps=10)
    p.grad = torch.ones_like(p)
    q.grad = torch.ones_like(q)
    q.grad[1, 3] = float("nan")
    before = p.detach().clone()
    with pytest.raises(FloatingPointError, match=r"parameter 0 \(shape \(4, 128\)\) in param group 1 contains NaN or Inf"):
        opt.step()
    assert torch.equal(p, before) and not opt.state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_finite_gradients_are_not_mistaken_for_inf(dtype):
    # the fast check sums the gradient; a sum that overflows must not count as an Inf
    big = torch.finfo(dtype).max / 2
    p = nn.Parameter(torch.randn(4, 128).to(dtype))
    opt = CAGEAdamW([p], total_steps=10, cage_lambda=0.0)
    p.grad = torch.full_like(p, big)
    opt.step()
    assert torch.isfinite(p).all()
    p.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        opt.step()

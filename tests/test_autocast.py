"""Under bf16 autocast a QAT layer quantizes its activation in bf16 (as the product would
round it anyway): the quantizer's math stays fp32, it emits q in bf16, and the weight is
quantized as stored. Checked on CPU autocast against the reference, both backends."""

import pytest
import torch
import torch.nn.functional as F

import cage.linear
from cage import QATLinear, QuantConfig, naive
from cage.testing import check_fake_quant

W4, A4 = QuantConfig(4, block_size=32), QuantConfig(4, block_size=32)


def make_layer(backend, bias=True):
    torch.manual_seed(0)
    layer = QATLinear(64, 24, bias, weight_quant=W4, act_quant=A4, backend=backend)
    x = (torch.randn(5, 7, 64) * 3).requires_grad_()
    return layer, x


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_activation_reaches_the_quantizer_in_bf16_and_the_weight_as_stored(backend, monkeypatch):
    seen = []
    real = cage.linear.fake_quantize

    def spy(t, config, **kw):
        seen.append(t.dtype)
        return real(t, config, **kw)

    monkeypatch.setattr(cage.linear, "fake_quantize", spy)
    layer, x = make_layer(backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen == [torch.float32, torch.bfloat16]  # weight, then activation
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_output_is_the_reference_of_the_bf16_activation(backend):
    layer, x = make_layer(backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    x16 = x.detach().to(torch.bfloat16)
    q_x, _ = naive.quantize(x16, A4, rotate_back=False)
    q_w, _ = naive.quantize(layer.weight.detach(), W4, rotate_back=False)
    expected = F.linear(q_x, q_w.to(torch.bfloat16), layer.bias.detach().to(torch.bfloat16))
    if backend == "torch":
        assert torch.equal(y, expected)
    else:  # the kernel's q of the bf16 activation, decision by decision, then the same product
        q_kernel = cage.fake_quantize(x16, A4, backend="triton", rotate_back=False)
        _, mask = naive.quantize(x16, A4, rotate_back=False)
        check_fake_quant(x16, A4, False, q_kernel.detach(), mask)
        torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_without_autocast_nothing_is_cast():
    layer, x = make_layer("torch")
    y = layer(x)
    assert y.dtype == torch.float32
    q_x, _ = naive.quantize(x.detach(), A4, rotate_back=False)
    q_w, _ = naive.quantize(layer.weight.detach(), W4, rotate_back=False)
    assert torch.equal(y, F.linear(q_x, q_w, layer.bias.detach()))


def test_fp64_activations_are_left_alone_as_autocast_leaves_them():
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cage.linear.autocast_activation(x) is x
        assert cage.linear.autocast_activation(x.float()).dtype == torch.bfloat16

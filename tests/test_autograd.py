"""Straight-through gradients of fake_quantize and the QAT linear layer."""

import pytest
import torch
from torch import nn

from cage import QATLinear, QuantConfig, fake_quantize, prepare_qat, quantize_dequantize
from cage import naive


def explicit_ste_grad(g: torch.Tensor, mask: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """``H diag(mask) H g`` for each block, with the whole row's matrix written out."""
    n = g.shape[-1]
    if cfg.hadamard:
        h = torch.block_diag(*[naive.hadamard_matrix(cfg.block_size, torch.float64)] * (n // cfg.block_size))
    else:
        h = torch.eye(n, dtype=torch.float64)
    rows = [h @ torch.diag(m.double()) @ h @ gr.double() for gr, m in zip(g.reshape(-1, n), mask.reshape(-1, n))]
    return torch.stack(rows).reshape(g.shape)


@pytest.mark.parametrize("hadamard", [True, False])
@pytest.mark.parametrize("grad_mask", ["none", "clip", "trust"])
@pytest.mark.parametrize("bits", [1, 3, 4])
def test_fake_quantize_gradient_is_masked_ste(hadamard, grad_mask, bits):
    torch.manual_seed(bits)
    cfg = QuantConfig(bits, hadamard=hadamard, block_size=32, grad_mask=grad_mask)
    x = (torch.randn(2, 3, 64) * 2).requires_grad_()
    g = torch.randn(2, 3, 64)
    y = fake_quantize(x, cfg)
    y.backward(g)
    q, mask = quantize_dequantize(x.detach(), cfg)
    assert torch.equal(y.detach(), q)
    torch.testing.assert_close(x.grad.double(), explicit_ste_grad(g, mask, cfg), rtol=1e-5, atol=1e-5)
    if grad_mask != "none":
        assert not mask.all()  # the mask really drops something


def test_rotated_domain_output_and_gradient():
    torch.manual_seed(0)
    cfg = QuantConfig(4, block_size=64)
    x = torch.randn(5, 128, requires_grad=True)
    g_h = torch.randn(5, 128)
    y_h = fake_quantize(x, cfg, rotate_back=False)
    y_h.backward(g_h)
    q_h, mask = naive.quantize(x.detach(), cfg, rotate_back=False)
    assert torch.equal(y_h.detach(), q_h)
    expected = naive.block_rotate(g_h * mask, 64)
    torch.testing.assert_close(x.grad, expected)


def test_bf16_input_gets_bf16_gradient():
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    fake_quantize(x, QuantConfig(4)).sum().backward()
    assert x.grad.dtype == torch.bfloat16


def _qat_pair(weight_cfg, act_cfg):
    torch.manual_seed(0)
    layer = QATLinear(128, 48, weight_quant=weight_cfg, act_quant=act_cfg)
    return layer


@pytest.mark.parametrize(
    "weight_cfg,act_cfg",
    [
        (QuantConfig(4), QuantConfig(4)),  # shared rotation: rotated-domain identity
        (QuantConfig(4, hadamard=False, grad_mask="none"), QuantConfig(4, hadamard=False, grad_mask="none")),
        (QuantConfig(3, block_size=64), QuantConfig(4)),  # different blocks: explicit path
        (QuantConfig(4), None),
        (None, QuantConfig(2)),
    ],
)
def test_qat_linear_matches_explicit_fake_quant_linear(weight_cfg, act_cfg):
    layer = _qat_pair(weight_cfg, act_cfg)
    x = torch.randn(3, 7, 128, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    got = (y.detach(), x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())

    x2 = x.detach().clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    xq = fake_quantize(x2, act_cfg) if act_cfg else x2
    wq = fake_quantize(w2, weight_cfg) if weight_cfg else w2
    y2 = torch.nn.functional.linear(xq, wq, layer.bias.detach())
    y2.backward(g)
    torch.testing.assert_close(got[0], y2.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[2], w2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[3], g.sum((0, 1)))


def test_prepare_qat_swaps_linears_keeps_tensors_and_names():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(10, 128))
    model.add_module("proj", nn.Linear(128, 128))
    model.add_module("block", nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128, bias=False)))
    model.add_module("lm_head", nn.Linear(128, 10))
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    prepared = prepare_qat(model, weight=QuantConfig(4), activation=QuantConfig(4))
    assert prepared is model
    assert isinstance(model.proj, QATLinear) and isinstance(model.block[0], QATLinear) and isinstance(model.block[2], QATLinear)
    assert type(model.lm_head) is nn.Linear and type(model.embed) is nn.Embedding
    after = model.state_dict(keep_vars=True)
    assert list(before) == list(after)
    assert all(before[k] is after[k] for k in before)


def test_prepare_qat_skip_predicate():
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    prepare_qat(model, weight=QuantConfig(4), skip=lambda name, m: name == "1")
    assert isinstance(model[0], QATLinear) and type(model[1]) is nn.Linear


def test_qat_linear_under_autocast_keeps_quantizer_in_fp32():
    torch.manual_seed(0)
    layer = QATLinear(128, 16, weight_quant=QuantConfig(4), act_quant=QuantConfig(4))
    x = torch.randn(4, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    ref = layer(x)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()) < 2e-2

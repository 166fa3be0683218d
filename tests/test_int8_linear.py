"""The QAT linear forward as an exact int8 product (``matmul="int8"``): eligibility, exactness
against a float64 evaluation of ``q(x_h) q(W_h)^T``, gradients against today's dequantized
path, fallbacks, what is saved for the backward, torch.compile, activation checkpointing and
autocast. The Triton backend runs under the interpreter on CPU."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from cage import QATLinear, QuantConfig, naive, prepare_qat
from cage.ops import fake_quant, qat_linear
from cage.testing import check_fake_quant

EPS32 = 2.0**-24  # fp32 unit roundoff


def pair(bits, hadamard=True, block=32, k=96, n=24, bias=True, backend="torch", seed=0, matmul="int8",
         grid="centered"):
    """(int8 layer, dequant layer) with the same parameters."""
    torch.manual_seed(seed)
    w, a = (QuantConfig(bits, hadamard=hadamard, block_size=block, grid=grid),
            QuantConfig(bits, hadamard=hadamard, block_size=block, grid=grid))
    ref = QATLinear(k, n, bias, weight_quant=w, act_quant=a, backend=backend)
    with torch.no_grad():
        ref.weight.mul_(3.0)
        if bias:
            ref.bias.normal_()
    ours = QATLinear(k, n, bias, weight_quant=w, act_quant=a, backend=backend, matmul=matmul)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


# ---- eligibility ------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n,ok", [(17, 64, 64, True), (16, 64, 64, False), (1, 64, 64, False),
                                      (32, 60, 64, False), (32, 64, 20, False), (4096, 4096, 11008, True)])
def test_int_mm_rule_encodes_cudas_limits(m, k, n, ok):
    assert qat_linear.int_mm_takes(m, k, n, "cuda") is ok
    assert qat_linear.int_mm_takes(m, k, n, "cpu")  # the CPU kernel takes anything


def test_codes_rule():
    q4, q7, q8 = QuantConfig(4), QuantConfig(7), QuantConfig(8)
    assert qat_linear.codes_take(q4, q4, 4096) and qat_linear.codes_take(q7, q7, 4096)
    assert not qat_linear.codes_take(q8, q4, 4096)  # |C| <= 255 does not fit int8
    assert not qat_linear.codes_take(q4, None, 4096) and not qat_linear.codes_take(None, q4, 4096)
    assert not qat_linear.codes_take(q4, QuantConfig(4, block_size=64), 4096)  # two bases
    assert not qat_linear.codes_take(q4, QuantConfig(4, hadamard=False), 4096)
    assert qat_linear.codes_take(QuantConfig(4, hadamard=False), QuantConfig(3, hadamard=False), 4096)
    # exact in int32 while K (Lx - 1)(Lw - 1) <= 2**31 - 1: K <= 133144 at 7 bits
    assert qat_linear.codes_take(q7, q7, 133144) and not qat_linear.codes_take(q7, q7, 133145)


def test_matmul_names_are_checked():
    with pytest.raises(ValueError, match=r"matmul must be one of \('auto', 'dequant', 'int8', 'int8-fused'\)"):
        QATLinear(64, 8, matmul="fp8")
    with pytest.raises(ValueError, match="prepare_qat: matmul must be one of"):
        prepare_qat(torch.nn.Sequential(torch.nn.Linear(64, 8)), weight=QuantConfig(4), matmul="int4")


# ---- exactness --------------------------------------------------------------------------


def _float64_product(layer, x, ops):
    """``q(x_h) q(W_h)^T + b`` in float64 (exact up to the last multiply) from the codes the
    layer's quantizer gives."""
    cx, hx, _ = ops.quantize_codes(x.reshape(-1, x.shape[-1]), layer.act_quant)
    cw, hw, _ = ops.quantize_codes(layer.weight.detach(), layer.weight_quant)
    # the integer sum in int64 (a float64 matmul would round where terms cancel), then float64
    y = (cx.long() @ cw.long().t()).double() * hx.double()[:, None] * hw.double()[None, :]
    return y, (y if layer.bias is None else y + layer.bias.detach().double())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grid,bits", [("centered", b) for b in range(2, 8)] + [("integer", b) for b in range(2, 9)])
@pytest.mark.parametrize("hadamard,bias", [(True, True), (True, False), (False, True)], ids=["H-bias", "H", "noH-bias"])
def test_int8_forward_is_the_float64_product_to_the_epilogues_rounding(backend, grid, bits, hadamard, bias):
    # 8 bits fit int8 on the integer grid only (codes -128..127; centered ones reach 255)
    ours, _ = pair(bits, hadamard, k=160, n=21, bias=bias, backend=backend, seed=bits, grid=grid)
    assert qat_linear.codes_take(ours.weight_quant, ours.act_quant, 160)  # the int8 product, not the fallback
    x = torch.randn(3, 11, 160) * torch.exp(torch.randn(3, 11, 1))
    y = ours(x)
    product, expected = _float64_product(ours, x, fake_quant.get_ops(backend, x.device))
    # int32 accumulation is exact; acc -> fp32, two multiplies and the bias add round once each
    bound = 4 * EPS32 * (product.abs() + (ours.bias.detach().double().abs() if bias else 0))
    err = (y.reshape(-1, 21).double() - expected).abs()
    assert bool((err <= bound).all()), float((err / bound.clamp_min(1e-300)).max())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_codes_are_the_quantizers(backend):
    # the codes the product uses are the fake quantizer's q, decision for decision
    config = QuantConfig(4, block_size=32)
    x = torch.randn(37, 96) * 2
    ops = fake_quant.get_ops(backend, x.device)
    codes, half_step, mask_state = ops.quantize_codes(x, config)
    assert codes.dtype == torch.int8 and half_step.shape == (37,) and half_step.dtype == torch.float32
    assert bool((codes % 2 != 0).all()) and int(codes.abs().max()) <= 15
    check_fake_quant(x, config, False, codes.float() * half_step[:, None], ops.mask_to_bool(mask_state, x.shape))


def test_codes_of_eight_bits_are_refused():
    with pytest.raises(ValueError, match="do not fit int8"):
        naive.quantize_codes(torch.randn(2, 32), QuantConfig(8, block_size=32))


# ---- gradients, fallbacks ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bits", [3, 4])
def test_gradients_are_todays_paths(backend, bits):
    ours, ref = pair(bits, backend=backend, seed=10 + bits)
    x = torch.randn(4, 9, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # the forwards differ by fp32 summation only
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    # the same products of the same operands: the same bits
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)


def _uses_int8(layer, x, monkeypatch):
    used = []
    real = qat_linear.int8_qat_linear
    monkeypatch.setattr(qat_linear, "int8_qat_linear", lambda *a: used.append(1) or real(*a))
    layer(x)
    return bool(used)


def test_what_the_product_cannot_take_falls_back_to_todays_path(monkeypatch):
    q4_32 = QuantConfig(4, block_size=32)
    for layer, x in (
        (pair(8)[0], torch.randn(20, 96)),  # 8-bit codes do not fit int8
        (QATLinear(128, 8, weight_quant=q4_32, act_quant=QuantConfig(4), matmul="int8"), torch.randn(20, 128)),
        (QATLinear(96, 8, weight_quant=q4_32, act_quant=None, matmul="int8"), torch.randn(20, 96)),
        (QATLinear(96, 8, weight_quant=q4_32, act_quant=q4_32, matmul="int8").double(), torch.randn(20, 96).double()),
    ):
        assert not _uses_int8(layer, x, monkeypatch), layer
    ours, ref = pair(4)
    x = torch.randn(20, 96)
    assert _uses_int8(ours, x, monkeypatch)
    ours.matmul = "auto"  # auto is the dequantized product until a GPU shows int8 faster
    assert not _uses_int8(ours, x, monkeypatch)
    assert torch.equal(ours(x), ref(x))


def test_a_shape_cuda_refuses_falls_back_on_cuda(monkeypatch):
    # decode-sized M (<= 16) is not _int_mm's on CUDA: the rule is applied per call
    ours, _ = pair(4)
    monkeypatch.setattr(qat_linear, "int_mm_takes", lambda m, k, n, device_type: m > 16)
    assert not _uses_int8(ours, torch.randn(16, 96), monkeypatch)
    assert _uses_int8(ours, torch.randn(17, 96), monkeypatch)


# ---- memory, compile, checkpointing, autocast ---------------------------------------------


def saved_bytes(layer, x):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(total)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_int8_path_saves_about_a_byte_per_input_element(backend):
    ours, ref = pair(4, backend=backend, k=256, n=64, block=128)
    x = torch.randn(64, 256, requires_grad=True)
    weight_bytes = 64 * 256 * 1 + 64 * 4 + 64 * 256 // 8 * (backend == "triton") + 64 * 256 * (backend == "torch")
    per_input = (saved_bytes(ours, x) - weight_bytes) / x.numel()
    # int8 codes (1) + one fp32 d/2 per row (4 / 256) + the mask (1/8 packed; 1 as bool)
    assert per_input <= (1.2 if backend == "triton" else 2.02), per_input
    assert saved_bytes(ref, x) / x.numel() > 4  # today: fp32 q(x) and more


def test_compiled_layer_matches_eager():
    ours, _ = pair(4)
    x = torch.randn(33, 96)
    eager = ours(x)
    compiled = torch.compile(ours, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_activation_checkpointing_recomputes_to_the_same_gradients():
    ours, _ = pair(4, seed=3)
    x = torch.randn(40, 96, requires_grad=True)
    ours(x).square().sum().backward()
    expected = (x.grad.clone(), ours.weight.grad.clone())
    x.grad = ours.weight.grad = ours.bias.grad = None
    checkpoint(ours, x, use_reentrant=False).square().sum().backward()
    assert torch.equal(x.grad, expected[0]) and torch.equal(ours.weight.grad, expected[1])


def test_under_autocast_the_output_and_gradients_are_todays():
    ours, ref = pair(4, seed=4)
    x = torch.randn(24, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = ours(x), ref(x_ref)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    # ours: the exact product rounded once to bf16 (today's bf16 GEMM rounds its operands too)
    _, exact = _float64_product(ours, x.detach().to(torch.bfloat16), fake_quant.get_ops("torch", x.device))
    assert bool(((y.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6).all())
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(ours.weight.grad, ref.weight.grad)


# ---- the converted layer ----------------------------------------------------------------


def test_a_converted_layer_multiplies_on_int8_as_the_qat_layer_did():
    from cage import convert

    ours, _ = pair(4, seed=7)
    model = torch.nn.Sequential(ours)
    x = torch.randn(2, 13, 96)
    with torch.no_grad():
        y_qat = model(x)
        convert(model)
        layer = model[0]
        assert layer.matmul == "int8"  # the runtime choice carries over
        y = layer(x)
    assert torch.equal(y, y_qat)  # the same codes, scales and product: the same bits
    codes, half = layer.signed_codes()
    assert codes.dtype == torch.int8 and bool((codes % 2 != 0).all()) and half.shape == (24,)


def test_a_converted_layer_falls_back_where_the_product_does_not_take(monkeypatch):
    from cage import convert

    model = torch.nn.Sequential(pair(4, seed=8)[0])
    convert(model)
    layer = model[0]
    calls = []
    real = qat_linear.int8_linear_inference
    monkeypatch.setattr(qat_linear, "int8_linear_inference", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        layer(torch.randn(20, 96))
    assert calls == [1]
    layer(torch.randn(20, 96, requires_grad=True))  # a gradient asked for: the dequantized path
    monkeypatch.setattr(qat_linear, "int_mm_takes", lambda m, k, n, device_type: m > 16)  # CUDA's decode sizes
    with torch.no_grad():
        layer(torch.randn(16, 96))
    assert calls == [1]
    layer.matmul = "dequant"
    with torch.no_grad():
        dequant = layer(torch.randn(20, 96))
    assert calls == [1] and dequant.shape == (20, 24)


def test_the_codes_op_has_a_fake_for_torch_compile():
    x = torch.randn(6, 64)
    torch.library.opcheck(fake_quant.fake_quant_codes_op, (x, 4, True, 32, "trust"))
    torch.library.opcheck(fake_quant.fake_quant_codes_op, (x.to(torch.bfloat16), 3, False, 32, "none"))


# ---- the fused Triton GEMM (interpreter on CPU) -----------------------------------------


@pytest.mark.parametrize("grid,bits", [("centered", 4), ("centered", 7), ("integer", 8)])
def test_the_fused_gemm_is_bit_identical_to_int_mm_and_its_epilogue(grid, bits):
    q = QuantConfig(bits, block_size=32, grid=grid)
    torch.manual_seed(bits)
    layer = QATLinear(96, 24, True, weight_quant=q, act_quant=q, backend="triton", matmul="int8")
    x = torch.randn(2, 19, 96, requires_grad=True)
    y = layer(x)
    layer.matmul = "int8-fused"
    x2 = x.detach().clone().requires_grad_()
    y_fused = layer(x2)
    assert torch.equal(y_fused, y)  # the same int32 sums and the same epilogue order
    g = torch.randn_like(y)
    y.backward(g)
    grad_w = layer.weight.grad.clone()
    layer.weight.grad = None
    y_fused.backward(g)
    assert torch.equal(x2.grad, x.grad) and torch.equal(layer.weight.grad, grad_w)


def test_the_fused_gemm_takes_decode_sizes_that_int_mm_does_not(monkeypatch):
    ours, _ = pair(4, backend="triton", matmul="int8-fused")
    monkeypatch.setattr(qat_linear, "int_mm_takes", lambda m, k, n, device_type: m > 16)
    assert _uses_int8(ours, torch.randn(1, 96), monkeypatch)  # one token: the fused kernel runs it

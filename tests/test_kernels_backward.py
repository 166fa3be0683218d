"""Backward (masked straight-through gradient) kernel against cage.naive, and the
kernels behind cage's public autograd API (fake_quantize, QATLinear, torch.compile)."""

import pytest
import torch

import triton  # noqa: F401  (a missing triton fails here, loudly)

from cage.ops.fake_quant import TRITON as triton_ops
from cage import QATLinear, QuantConfig, fake_quantize, naive
from cage.config import GRAD_MASKS
from cage_kernels import tiling
from cage_kernels import pack_mask
from cage.ops.fake_quant import fake_quant_bwd_op
from cage.testing import assert_close_except_rare

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def randn(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def assert_grad_matches(grad, mask_state, config, grad_is_rotated):
    """The kernel's gradient equals naive.masked_grad given the same mask (no decisions
    here: every element within rounding)."""
    out = triton_ops.masked_grad(grad, mask_state, config, grad_is_rotated)
    mask = triton_ops.mask_to_bool(mask_state, grad.shape)
    expected = naive.masked_grad(grad, mask, config, grad_is_rotated)
    assert out.shape == grad.shape and out.dtype == grad.dtype
    assert_close_except_rare(out, expected, max_fraction=0.0, what="grad")


CASES = [
    pytest.param(hadamard, grad_mask, dtype, rotated, shape, id=f"{'H' if hadamard else 'noH'}-{grad_mask}-{DTYPE_NAMES[dtype]}-{'rot' if rotated else 'in'}")
    for i, (hadamard, grad_mask, dtype, rotated) in enumerate(
        (h, m, d, r) for h in (True, False) for m in GRAD_MASKS for d in DTYPES for r in (False, True)
        if h or not r  # without rotation the two gradient domains are one
    )
    for shape in [((3, 32), (7, 64), (33, 96), (5, 100))[i % 4]]
]


@pytest.mark.parametrize("hadamard,grad_mask,dtype,grad_is_rotated,shape", CASES)
def test_backward_matches_reference(hadamard, grad_mask, dtype, grad_is_rotated, shape):
    block = 32 if shape[1] % 32 == 0 else 4
    config = QuantConfig(3, hadamard=hadamard, block_size=block, grad_mask=grad_mask)
    x = randn(shape, dtype, seed=1)
    _, mask_state = triton_ops.quantize(x, config, not grad_is_rotated)
    assert_grad_matches(randn(shape, dtype, seed=2), mask_state, config, grad_is_rotated)


@pytest.mark.parametrize("block,n_blocks", [(16, 1), (32, 2), (64, 3), (128, 2), (8, 3)])
def test_backward_with_a_reference_mask(block, n_blocks):
    # the mask may come from anywhere in the packed format, e.g. packed from naive's bools
    config = QuantConfig(4, block_size=block)
    shape = (7, block * n_blocks)
    _, mask = naive.quantize(randn(shape, seed=3), config)
    assert_grad_matches(randn(shape, seed=4), pack_mask(mask), config, False)


def test_backward_non_contiguous_grad_and_two_chunks(monkeypatch):
    monkeypatch.setattr(tiling, "ROW_CHUNK_MAX", 32)  # 3 column chunks per row (2-D grid)
    config = QuantConfig(2, block_size=16, grad_mask="clip")
    x = randn((2, 5, 80), torch.bfloat16, seed=5)
    _, mask_state = triton_ops.quantize(x, config, True)
    grad = randn((2, 80, 5), torch.bfloat16, seed=6).transpose(1, 2)
    assert not grad.is_contiguous()
    assert_grad_matches(grad, mask_state, config, False)


def test_backward_custom_op_registration():
    config = QuantConfig(4, block_size=32)
    _, mask_state = triton_ops.quantize(randn((6, 64), seed=7), config, True)
    torch.library.opcheck(fake_quant_bwd_op, (randn((6, 64), seed=8), mask_state, True, 32, "trust", False))


# ---- the kernels behind cage's public API --------------------------------------------------


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    gen = torch.Generator().manual_seed(9)
    weights = torch.randn(out.shape, generator=gen).to(out.dtype).to(DEVICE)
    (out * weights).sum().backward()
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("rotate_back", [True, False])
def test_fake_quantize_gradients_equal_torch_backend(dtype, rotate_back):
    config = QuantConfig(3, block_size=32)
    x = randn((9, 96), dtype, seed=10)
    ref_out, (ref_grad,) = _grads(lambda t: fake_quantize(t, config, backend="torch", rotate_back=rotate_back), x)
    out, (grad,) = _grads(lambda t: fake_quantize(t, config, backend="triton", rotate_back=rotate_back), x)
    assert_close_except_rare(out, ref_out, max_fraction=0.0, what="Q(x)")
    assert_close_except_rare(grad, ref_grad, max_fraction=0.0, what="dL/dx")


@pytest.mark.parametrize("shared_rotation", [True, False])
def test_qat_linear_triton_matches_torch(shared_rotation):
    weight_quant = QuantConfig(4, block_size=32)
    act_quant = QuantConfig(4, block_size=32 if shared_rotation else 16, grad_mask="clip")
    torch.manual_seed(11)
    layers = {
        backend: QATLinear(64, 48, weight_quant=weight_quant, act_quant=act_quant, backend=backend).to(DEVICE)
        for backend in ("torch", "triton")
    }
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = randn((2, 5, 64), seed=12)
    results = {}
    for backend, layer in layers.items():
        out, (x_grad,) = _grads(layer, x)
        results[backend] = (out, x_grad, layer.weight.grad, layer.bias.grad)
    for name, ours, ref in zip(("out", "x.grad", "weight.grad", "bias.grad"), results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5, msg=name)


def test_torch_compile_traces_the_custom_ops():
    config = QuantConfig(4, block_size=32)

    def loss(t):
        return fake_quantize(t, config, backend="triton").square().sum()

    x = randn((6, 64), seed=13)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    _, (grad_compiled,) = _grads(compiled, x)
    _, (grad_eager,) = _grads(loss, x)
    assert torch.equal(grad_compiled, grad_eager)


@pytest.mark.parametrize("n_cols", [11008, 14336])
@pytest.mark.parametrize("grad_is_rotated", [False, True])
def test_backward_llama_mlp_row_lengths(n_cols, grad_is_rotated):
    config = QuantConfig(4)
    x = randn((2, n_cols), torch.float32, seed=n_cols)
    _, mask_state = triton_ops.quantize(x, config, not grad_is_rotated)
    assert_grad_matches(randn((2, n_cols), torch.bfloat16, seed=n_cols + 1).float(), mask_state, config, grad_is_rotated)
    assert_grad_matches(randn((2, n_cols), torch.bfloat16, seed=n_cols + 2), mask_state, config, grad_is_rotated)

"""CPU benchmarks of the torch fallback (pytest-benchmark).

    python -m pytest benchmarks/ --benchmark-only

Not part of the CI suite (testpaths is tests/). Each row is timed against a plain-torch
baseline on the same inputs (a block-rotation matmul for the quantizer, ``torch.optim.AdamW``
for the optimizer); ``conftest.py`` writes the table and fails the session when a ratio shows
the fallback pathologically slow.
"""

from __future__ import annotations

import pytest
import torch

import cage
from cage import CAGEAdamW, QuantConfig, naive

from . import common
from .bench_optimizer import CAGE_LAMBDA, make_param_set
from .shapes import shapes_for

CFG = QuantConfig(bits=4, hadamard=True, block_size=128, grad_mask="trust")
ACT = {"act-fp32": (2048, 1024, torch.float32), "act-bf16": (2048, 1024, torch.bfloat16)}


@pytest.fixture(params=sorted(ACT))
def act(request):
    rows, cols, dtype = ACT[request.param]
    gen = torch.Generator().manual_seed(0)
    return request.param, torch.randn(rows, cols, generator=gen).to(dtype)


def _fwd_bytes(x):
    return common.fake_quant_forward_bytes(x.shape[0], x.shape[1], x.element_size(), x.element_size())


def test_rotation_matmul(benchmark, record, act):
    """Baseline: one block-Hadamard rotation of x in fp32 (what the reference does twice)."""
    name, x = act
    h = naive.hadamard_matrix(128)

    def rotate():
        xf = x.float()
        return (xf.view(-1, 128) @ h).view(x.shape)

    benchmark(rotate)
    record(benchmark, "fake quant", case=name)


def test_quantize_torch(benchmark, record, act):
    name, x = act
    benchmark(lambda: cage.quantize_dequantize(x, CFG, backend="torch"))
    record(benchmark, "fake quant", case=name, bytes=_fwd_bytes(x), baseline=f"test_rotation_matmul[{name}]")


def test_fake_quant_fwd_bwd_torch(benchmark, record, act):
    name, x = act
    x = x.clone().requires_grad_(True)
    g = torch.randn_like(x)

    def fwd_bwd():
        x.grad = None
        cage.fake_quantize(x, CFG, backend="torch").backward(g)

    benchmark(fwd_bwd)
    bytes_ = _fwd_bytes(x) + common.fake_quant_backward_bytes(x.shape[0], x.shape[1], x.element_size())
    record(benchmark, "fake quant", case=name, bytes=bytes_, baseline=f"test_rotation_matmul[{name}]")


# ---- optimizer: the "small" Llama parameter set (4.5M parameters, real layer structure) ----

SHAPES = shapes_for("small")
QUANT = QuantConfig(bits=4, hadamard=True, block_size=SHAPES.quant_block_size(), grad_mask="trust")
OPT_BYTES = 28 * SHAPES.numel()


@pytest.fixture(scope="module")
def params():
    return make_param_set(SHAPES, torch.float32, torch.device("cpu"))


def _groups(params, quant=None):
    return [
        {"params": params["quant"], "weight_decay": 0.1, **({"quant": quant} if quant else {})},
        {"params": params["decay"], "weight_decay": 0.1},
        {"params": params["no_decay"], "weight_decay": 0.0},
    ]


def _run(benchmark, opt):
    opt.step()  # create the state outside the timed rounds
    benchmark(opt.step)


def test_torch_adamw_single_tensor(benchmark, record, params):
    _run(benchmark, torch.optim.AdamW(_groups(params), lr=1e-5, foreach=False))
    record(benchmark, "optimizer", bytes=OPT_BYTES)


def test_torch_adamw_foreach(benchmark, record, params):
    _run(benchmark, torch.optim.AdamW(_groups(params), lr=1e-5, foreach=True))
    record(benchmark, "optimizer", bytes=OPT_BYTES, baseline="test_torch_adamw_single_tensor")


def test_torch_adamw_fused(benchmark, record, params):
    _run(benchmark, torch.optim.AdamW(_groups(params), lr=1e-5, fused=True))
    record(benchmark, "optimizer", bytes=OPT_BYTES, baseline="test_torch_adamw_single_tensor")


def _cage(params, silence_ratio, check_finite=None):
    return CAGEAdamW(_groups(params, QUANT), lr=1e-5, total_steps=10**9, cage_lambda=CAGE_LAMBDA,
                     silence_ratio=silence_ratio, schedule="constant", backend="torch",
                     check_finite=check_finite)


def test_cage_adamw_torch_silent(benchmark, record, params):
    opt = _cage(params, silence_ratio=0.99)  # lambda_t = 0: exactly AdamW
    assert opt.lambda_at(1) == 0
    _run(benchmark, opt)
    record(benchmark, "optimizer", bytes=OPT_BYTES, baseline="test_torch_adamw_single_tensor", lambda_t=0.0)


def test_cage_adamw_torch_silent_nocheck(benchmark, record, params):
    """The same without the default NaN/Inf check of CPU gradients (an extra pass per gradient)."""
    opt = _cage(params, silence_ratio=0.99, check_finite=False)
    _run(benchmark, opt)
    record(benchmark, "optimizer", bytes=OPT_BYTES, baseline="test_torch_adamw_single_tensor", lambda_t=0.0)


def test_cage_adamw_torch_active(benchmark, record, params):
    opt = _cage(params, silence_ratio=0.0)
    assert opt.lambda_at(1) == CAGE_LAMBDA
    _run(benchmark, opt)
    record(benchmark, "optimizer", bytes=OPT_BYTES, baseline="test_torch_adamw_single_tensor", lambda_t=CAGE_LAMBDA)

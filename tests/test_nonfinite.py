"""Non-finite gradients: the device-side skip (``check_finite="skip"``, the GPU default)
leaves every parameter and moment of the step unchanged without a host sync, counts the
skip on the device, and advances the step count; the CPU default raises before anything
changes. The triton backend runs under Triton's interpreter on CPU (compiled on a GPU)."""

import copy

import pytest
import torch

import triton  # noqa: F401  (a missing triton fails here, loudly)

from cage import CAGEAdamW, QuantConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Q4 = QuantConfig(4, block_size=32)


def make_setup(backend, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    quantized = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in [(5, 64), (3, 96)]]
    plain = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in [(48,), (7,)]]
    opt = CAGEAdamW(
        [{"params": quantized, "quant": Q4}, {"params": plain, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, total_steps=6, silence_ratio=0.3,
        backend=backend, check_finite="skip",
    )
    return quantized + plain, opt


def set_grads(params, step, poison=None):
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
        if poison is not None and i == poison[0]:
            p.grad.view(-1)[3] = poison[1]


def snapshot(params, opt):
    return [p.detach().clone() for p in params] + [
        opt.state[p][k].clone() for p in params for k in ("exp_avg", "exp_avg_sq")
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, 3], ids=["quantized", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_nonfinite_gradient_skips_the_whole_step(backend, bad, where, dtype):
    params, opt = make_setup(backend, dtype)
    for step in range(2):  # moments exist, and lambda_t > 0 from step 2 of 6 on
        set_grads(params, step)
        opt.step()
    assert opt.lambda_at(3) > 0
    before = snapshot(params, opt)
    set_grads(params, 2, poison=(where, bad))
    opt.step()
    after = snapshot(params, opt)
    for a, b in zip(after, before):
        assert torch.equal(a, b), "a skipped step changed a parameter or a moment"
    assert opt.last_found_inf.device.type == DEVICE.split(":")[0] and float(opt.last_found_inf) == 1.0
    assert int(opt.skipped_steps) == 1
    assert all(int(opt.state[p]["step"]) == 3 for p in params)  # the skipped step counts

    set_grads(params, 3)
    opt.step()  # finite again: the step is taken
    assert float(opt.last_found_inf) == 0.0 and int(opt.skipped_steps) == 1
    assert not torch.equal(params[0].detach(), before[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_finite_steps_are_unchanged_by_the_skip_mode(backend):
    # "skip" costs a flag, never a different update
    params, opt = make_setup(backend)
    params_off = copy.deepcopy(params)
    opt_off = CAGEAdamW(
        [{"params": params_off[:2], "quant": Q4}, {"params": params_off[2:], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, total_steps=6, silence_ratio=0.3,
        backend=backend, check_finite=False,
    )
    for step in range(4):
        set_grads(params, step)
        set_grads(params_off, step)
        opt.step()
        opt_off.step()
    for a, b in zip(params, params_off):
        assert torch.equal(a, b)
    assert int(opt.skipped_steps) == 0 and opt_off.skipped_steps is None


def test_cpu_default_raises_before_changing_anything():
    params, _ = make_setup("torch")
    opt = CAGEAdamW([{"params": params[:2], "quant": Q4}, {"params": params[2:]}], total_steps=6)
    set_grads(params, 0, poison=(1, float("nan")))
    before = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not opt.state


def test_fp16_gradients_that_sum_past_fp16_range_are_not_flagged():
    # the flag is an fp32 L1 norm: a large but finite fp16 gradient must not skip a step
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float16, device=DEVICE))
    opt = CAGEAdamW([p], total_steps=3, cage_lambda=0.0, backend="torch", check_finite="skip")
    p.grad = torch.full_like(p, 60000.0)  # sum 2.5e8 > fp16 max 65504
    opt.step()
    assert float(opt.last_found_inf) == 0.0 and not torch.equal(p.detach(), torch.zeros_like(p))

"""torch's fused-AdamW protocol: a ``grad_scale`` the gradients are divided by and a
``found_inf`` that skips the step, passed to ``step()`` or set as attributes by
``torch.amp.GradScaler``, which then runs no host check of its own. Both backends (the
Triton one under the interpreter) against ``torch.optim.AdamW`` driven by the same scaler."""

import copy

import pytest
import torch

from cage import CAGEAdamW, QuantConfig
from cage.testing import assert_close_except_rare

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Q4 = QuantConfig(4, block_size=32)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(DEVICE)


def loss_of(model, step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 64, generator=gen).to(DEVICE)
    return model(x).square().mean()


def linear_loss_of(model, step):
    """A loss whose gradient does not depend on the parameters: the two optimizers then see the
    same gradients at every step, so what is compared is the update alone (a model's loss feeds
    each step's rounding back through the next gradients)."""
    gen = torch.Generator().manual_seed(step)
    return sum((p * torch.randn(p.shape, generator=gen).to(DEVICE)).sum() for p in model.parameters())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradscaler_steps_match_torch_adamw(backend):
    # lambda 0 (silence to the end): CAGEAdamW is AdamW, and the scale 2**16 divides exactly
    model, ref = make_model(), make_model()
    opt = CAGEAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, total_steps=10, cage_lambda=0.0,
                    backend=backend, check_finite=False)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    scaler, scaler_ref = torch.amp.GradScaler(DEVICE), torch.amp.GradScaler(DEVICE)
    seen = []
    real_step = opt.step

    def spy(*args, **kwargs):
        seen.append((getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)))
        return real_step(*args, **kwargs)

    opt.step = spy
    for step in range(4):
        for m, o, s in ((model, opt, scaler), (ref, opt_ref, scaler_ref)):
            s.scale(linear_loss_of(m, step)).backward()
            s.step(o)
            s.update()
            o.zero_grad(set_to_none=True)
    for p, r in zip(model.parameters(), ref.parameters()):
        if backend == "torch":  # op for op torch's single-tensor AdamW: the same bits
            assert torch.equal(p, r)
        else:  # the kernel matches it to an ulp (as test_kernels_optim.test_silence_is_torch_adamw)
            assert_close_except_rare(p.detach(), r.detach(), ulps=1, compute_ulps=1, max_fraction=0.0)
    assert len(seen) == 4 and all(scale is not None and flag is not None for scale, flag in seen)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")  # the scaler removed them


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradscaler_skips_a_step_with_an_inf_without_touching_anything(backend):
    model = make_model()
    opt = CAGEAdamW(model.parameters(), lr=1e-2, total_steps=10, cage_lambda=0.0, backend=backend,
                    check_finite=False)
    scaler = torch.amp.GradScaler(DEVICE)
    scaler.scale(loss_of(model, 0)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = copy.deepcopy(model.state_dict())
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    scaler.scale(loss_of(model, 1) * float("inf")).backward()
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(state["exp_avg"], opt.state[model[0].weight]["exp_avg"])
    assert scaler.get_scale() == scale / 2  # the scaler saw the inf and backed off
    assert int(opt.skipped_steps) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_scale_divides_the_gradient_of_a_cage_step(backend, dtype):
    # with CAGE on: a step on grads * 3 with grad_scale 3 equals the step on the grads
    # (3 is not a power of two: the division rounds, as in torch's fused AdamW, and the two
    # sides then see the same rounded gradient only where g * 3 / 3 == g; compare closely)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in [(4, 64), (2, 96)]]
    grads = [torch.randn(w.shape, generator=gen).to(dtype).to(DEVICE) for w in weights]
    results = []
    for scale in (None, 3.0):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = CAGEAdamW([{"params": params, "quant": Q4}], lr=1e-2, total_steps=2, silence_ratio=0.0,
                        backend=backend, check_finite=False)
        for p, g in zip(params, grads):
            p.grad = g.clone() if scale is None else (g.float() * scale).to(dtype)
        opt.step(grad_scale=None if scale is None else torch.tensor([scale], device=DEVICE))
        results.append([p.detach().float() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)

"""CAGEAdamW against torch.optim.AdamW and the CAGE formulas of SPEC 2."""

import copy
import io

import pytest
import torch
from torch import nn

from cage import CAGEAdamW, QuantConfig, cage_lambda_at, prepare_qat, qat_param_groups, quantize_dequantize

Q4 = QuantConfig(4, block_size=32)


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.LayerNorm(64), nn.Linear(64, 10))
    prepare_qat(model, weight=Q4, activation=None, skip=("4",))
    return model.to(dtype)


def train_steps(model, opt, steps, seed=123, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


def assert_models_equal(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("cage_lambda,silence", [(0.0, 0.8), (25.0, 0.999)])
def test_zero_lambda_is_exactly_torch_adamw_over_many_steps(cage_lambda, silence):
    # lambda 0, or a silence period that covers the whole run: bit-identical to AdamW
    ref, ours = small_model(), small_model()
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    groups_ref = qat_param_groups(ref, 0.1)
    for g in groups_ref:
        g.pop("quant")
    opt_ref = torch.optim.AdamW(groups_ref, **kw)
    opt = CAGEAdamW(qat_param_groups(ours, 0.1), **kw, total_steps=1000, cage_lambda=cage_lambda, silence_ratio=silence)
    train_steps(ref, opt_ref, 60)
    train_steps(ours, opt, 60)
    assert_models_equal(ref, ours)
    for p_ref, p in zip(ref.parameters(), ours.parameters()):
        s_ref, s = opt_ref.state[p_ref], opt.state[p]
        assert set(s) == set(s_ref) == {"step", "exp_avg", "exp_avg_sq"}
        for k in s:
            assert torch.equal(s[k], s_ref[k]), k


def one_param_setup(coupling, seed=0):
    torch.manual_seed(seed)
    w = nn.Parameter(torch.randn(8, 64) * 0.05)
    grads = [torch.randn(8, 64) * 0.01 for _ in range(3)]
    return w, grads


@pytest.mark.parametrize("coupling", ["decoupled", "coupled"])
def test_cage_step_equals_formula(coupling):
    lam, lr, wd = 7.0, 1e-2, 0.1
    w, grads = one_param_setup(coupling)
    w_ref = nn.Parameter(w.detach().clone())
    opt = CAGEAdamW([{"params": [w], "quant": Q4}], lr=lr, weight_decay=wd, total_steps=3,
                    cage_lambda=lam, silence_ratio=0.0, schedule="constant", coupling=coupling)
    opt_ref = torch.optim.AdamW([w_ref], lr=lr, weight_decay=wd)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        if coupling == "coupled":
            w_ref.grad = g + lam * (w_ref.detach() - quantize_dequantize(w_ref.detach(), Q4)[0])
            opt_ref.step()
        else:
            w_ref.grad = g.clone()
            opt_ref.step()
            with torch.no_grad():
                w_ref -= lr * lam * (w_ref - quantize_dequantize(w_ref, Q4)[0])
        torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-7)
    w_plain, _ = one_param_setup(coupling)
    opt_plain = torch.optim.AdamW([w_plain], lr=lr, weight_decay=wd)
    for g in grads:
        w_plain.grad = g.clone()
        opt_plain.step()
    assert (w - w_plain).abs().max() > 1e-4  # the correction really moved the weights


def test_cage_pulls_weights_toward_the_grid():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 64))
    opt = CAGEAdamW([{"params": [w], "quant": Q4}], lr=1e-2, weight_decay=0.0, total_steps=50,
                    cage_lambda=20.0, silence_ratio=0.0, schedule="constant")

    def quant_error():
        return (w - quantize_dequantize(w.detach(), Q4)[0]).norm().item()

    before = quant_error()
    for _ in range(50):
        w.grad = torch.zeros_like(w)
        opt.step()
    assert quant_error() < 0.5 * before


@pytest.mark.parametrize("schedule", ["linear_ramp", "constant"])
def test_lambda_schedule_boundaries(schedule):
    lam, T, s = 10.0, 100, 0.8
    assert cage_lambda_at(1, T, lam, s, schedule) == 0.0
    assert cage_lambda_at(80, T, lam, s, schedule) == 0.0  # r = s_r is still silent
    at_81 = cage_lambda_at(81, T, lam, s, schedule)
    assert at_81 == pytest.approx(lam * 0.05 if schedule == "linear_ramp" else lam)
    assert cage_lambda_at(90, T, lam, s, schedule) == pytest.approx(lam * 0.5 if schedule == "linear_ramp" else lam)
    assert cage_lambda_at(100, T, lam, s, schedule) == pytest.approx(lam)
    assert cage_lambda_at(150, T, lam, s, schedule) == pytest.approx(lam)  # past the end: capped
    assert cage_lambda_at(1, T, lam, 0.0, schedule) > 0.0


def test_unquantized_params_get_plain_adamw_in_a_mixed_optimizer():
    ref, ours = small_model(), small_model()
    opt = CAGEAdamW(qat_param_groups(ours, 0.1), lr=3e-3, total_steps=40, cage_lambda=50.0,
                    silence_ratio=0.0, schedule="constant")
    groups_ref = qat_param_groups(ref, 0.1)
    for g in groups_ref:
        g.pop("quant")
    opt_ref = torch.optim.AdamW(groups_ref, lr=3e-3)
    # feed both the same gradients so only the update rule differs
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for p_ref, p in zip(ref.parameters(), ours.parameters()):
            g = torch.randn(p.shape, generator=gen)
            p_ref.grad, p.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
    quantized = {id(ours[0].weight), id(ours[2].weight)}
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        if id(p) in quantized:
            assert not torch.equal(p_ref, p), name
        else:
            assert torch.equal(p_ref, p), name


def test_bf16_params_keep_fp32_moments_and_track_fp32_run():
    m32, m16 = small_model(), small_model(dtype=torch.bfloat16)
    kw = dict(lr=3e-3, total_steps=30, cage_lambda=10.0, silence_ratio=0.5)
    o32 = CAGEAdamW(qat_param_groups(m32, 0.1), **kw)
    o16 = CAGEAdamW(qat_param_groups(m16, 0.1), **kw)
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):  # identical gradients: only the bf16 storage of the weights differs
        for p32, p16 in zip(m32.parameters(), m16.parameters()):
            g = torch.randn(p32.shape, generator=gen) * 1e-2
            p32.grad, p16.grad = g, g.to(torch.bfloat16)
        o32.step()
        o16.step()
    for p in m16.parameters():
        assert p.dtype == torch.bfloat16
        assert o16.state[p]["exp_avg"].dtype == torch.float32
        assert o16.state[p]["exp_avg_sq"].dtype == torch.float32
    for p32, p16 in zip(m32.parameters(), m16.parameters()):
        assert ((p16.float() - p32).norm() / p32.norm()) < 2e-2


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("coupling", ["decoupled", "coupled"])
def test_resume_from_state_dict_is_bit_identical(dtype, coupling):
    kw = dict(lr=3e-3, total_steps=40, cage_lambda=10.0, silence_ratio=0.5, coupling=coupling)
    full = small_model(dtype=dtype)
    opt_full = CAGEAdamW(qat_param_groups(full, 0.1), **kw)
    train_steps(full, opt_full, 20, seed=1, dtype=dtype)
    train_steps(full, opt_full, 20, seed=2, dtype=dtype)  # crosses the silence point (step 20)

    first = small_model(dtype=dtype)
    opt_first = CAGEAdamW(qat_param_groups(first, 0.1), **kw)
    train_steps(first, opt_first, 20, seed=1, dtype=dtype)
    model_sd, opt_sd = roundtrip(first.state_dict()), roundtrip(opt_first.state_dict())
    assert opt_sd["param_groups"][0]["quant"] == Q4.to_dict()

    resumed = small_model(seed=99, dtype=dtype)
    resumed.load_state_dict(model_sd)
    opt_resumed = CAGEAdamW(qat_param_groups(resumed, 0.1), **kw)
    opt_resumed.load_state_dict(opt_sd)
    assert opt_resumed.param_groups[0]["quant"] == Q4
    for p in resumed.parameters():
        assert opt_resumed.state[p]["exp_avg_sq"].dtype == torch.float32
    train_steps(resumed, opt_resumed, 20, seed=2, dtype=dtype)
    assert_models_equal(full, resumed)


def test_state_dict_round_trip_is_lossless_for_bf16_params():
    model = small_model(dtype=torch.bfloat16)
    opt = CAGEAdamW(qat_param_groups(model, 0.1), lr=1e-3, total_steps=10)
    train_steps(model, opt, 3, dtype=torch.bfloat16)
    sd = roundtrip(opt.state_dict())
    opt2 = CAGEAdamW(qat_param_groups(model, 0.1), lr=1e-3, total_steps=10)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert opt2.state[p][k].dtype == opt.state[p][k].dtype
            assert torch.equal(opt2.state[p][k], opt.state[p][k])
    sd2 = opt2.state_dict()
    assert sd2["param_groups"] == sd["param_groups"]


def test_load_state_dict_into_torch_adamw_shaped_state():
    # our state dict is torch.optim.AdamW's layout plus group fields: AdamW can load it
    model = small_model()
    opt = CAGEAdamW(qat_param_groups(model, 0.1), lr=1e-3, total_steps=10)
    train_steps(model, opt, 2)
    sd = opt.state_dict()
    groups = qat_param_groups(model, 0.1)
    for g in groups:
        g.pop("quant")
    plain = torch.optim.AdamW(groups, lr=1e-3)
    plain.load_state_dict(copy.deepcopy(sd))
    p = next(model.parameters())
    assert torch.equal(plain.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_closure_and_no_grad_params():
    model = small_model()
    opt = CAGEAdamW(model.parameters(), total_steps=5, cage_lambda=0.0)
    x = torch.randn(4, 64)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    frozen = model[3].weight
    frozen.requires_grad_(False)
    before = frozen.clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert torch.equal(frozen, before) and frozen not in opt.state

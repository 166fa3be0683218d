"""This runtime's CAGE step against the official code's form of it (issue 11, part 4).

The official implementation applies CAGE as a pass after the optimizer: ``torch.optim.AdamW``
steps, the LR scheduler steps, then every quantized weight moves by
``-group["lr"] * lambda_t * (w - Q(w))`` with ``Q`` the weight's own quantizer. This runtime
fuses that pass into ``CAGEAdamW.step`` with the learning rate of the same step (SPEC 2).

Configured alike (the pass reads the lr that the AdamW step used), the two give the same
trajectory. As the official loop is ordered, the pass reads the lr the scheduler just set for
the *next* step; that one-step shift is measured here and bounded, so a change that makes it
larger (or a runtime that stops matching the aligned form) fails.
"""

import copy
import math

import pytest
import torch

from cage import CAGEAdamW, QuantConfig, prepare_qat, qat_param_groups, quantize_dequantize
from cage.linear import QATLinear
from cage.llama.model import Llama, config_from_preset

STEPS = 50
PEAK_LR = 3e-3
LAMBDA, SILENCE = 10.0, 0.5  # silence 0.5: the correction is active for 25 of the 50 steps
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1


def lr_factor(k: int) -> float:
    """Warm-up over 5 steps, then a cosine to a tenth: LambdaLR's factor for 0-based step k."""
    if k < 5:
        return (k + 1) / 5
    progress = min(1.0, (k - 5) / (STEPS - 6))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def lambda_t(t: int) -> float:
    """SPEC 2's linear ramp for the step numbered t (from 1)."""
    r = t / STEPS
    return 0.0 if r <= SILENCE else LAMBDA * min(1.0, (r - SILENCE) / (1 - SILENCE))


def make_model(bits: int) -> Llama:
    torch.manual_seed(0)
    model = Llama(config_from_preset("tiny", max_seq_len=32))
    quant = QuantConfig(bits, block_size=64)  # the tiny preset's rows are 64 wide
    prepare_qat(model, weight=quant, activation=quant, backend="torch")
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (4, 33), generator=gen) for _ in range(STEPS)]


def train_runtime(model, data) -> list[float]:
    opt = CAGEAdamW(qat_param_groups(model, WEIGHT_DECAY), lr=PEAK_LR, betas=BETAS, eps=EPS,
                    weight_decay=WEIGHT_DECAY, total_steps=STEPS, cage_lambda=LAMBDA, silence_ratio=SILENCE,
                    backend="torch", check_finite=False)
    losses = []
    for k, seq in enumerate(data):
        for g in opt.param_groups:
            g["lr"] = PEAK_LR * lr_factor(k)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train_official_form(model, data, read_lr: str, cage: bool = True) -> list[float]:
    """torch AdamW + LambdaLR + the post-optimizer CAGE pass. ``read_lr``: "after_scheduler" is
    the official order; "before_scheduler" reads the lr this step used (configured alike).
    ``cage=False``: plain AdamW (the pass is left out)."""
    groups = [{k: v for k, v in g.items() if k != "quant"} for g in qat_param_groups(model, WEIGHT_DECAY)]
    opt = torch.optim.AdamW(groups, lr=PEAK_LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    quantized = [m for m in model.modules() if isinstance(m, QATLinear) and m.weight_quant is not None]
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    losses = []
    for k, seq in enumerate(data):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        lr_used = {id(g): g["lr"] for g in opt.param_groups}
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        lam = lambda_t(k + 1) if cage else 0.0
        if lam:
            with torch.no_grad():
                for m in quantized:
                    g = group_of[id(m.weight)]
                    lr = g["lr"] if read_lr == "after_scheduler" else lr_used[id(g)]
                    q, _ = quantize_dequantize(m.weight, m.weight_quant, backend="torch")
                    m.weight.sub_(m.weight - q, alpha=lr * lam)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def max_rel_weight_diff(a, b) -> float:
    return max(float((pa - pb).norm() / pb.norm()) for pa, pb in zip(a.parameters(), b.parameters()))


@torch.no_grad()
def grid_distance(model) -> float:
    """Relative RMS distance of the quantized weights to their grid, ||w - Q(w)|| / ||w||."""
    err = ref = 0.0
    for m in model.modules():
        if isinstance(m, QATLinear) and m.weight_quant is not None:
            q, _ = quantize_dequantize(m.weight, m.weight_quant, backend="torch")
            err += float((m.weight - q).pow(2).sum())
            ref += float(m.weight.pow(2).sum())
    return math.sqrt(err / ref)


@pytest.mark.parametrize("bits", [4, 3])
def test_fused_step_follows_the_official_post_optimizer_pass(bits):
    data = batches()
    base = make_model(bits)
    runtime, aligned, official = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    loss_runtime = train_runtime(runtime, data)
    loss_aligned = train_official_form(aligned, data, read_lr="before_scheduler")
    loss_official = train_official_form(official, data, read_lr="after_scheduler")

    # Configured alike: the same trajectory (both are fp32 torch ops in the same order).
    assert loss_runtime == pytest.approx(loss_aligned, rel=1e-6, abs=0)
    assert max_rel_weight_diff(runtime, aligned) < 1e-6

    # The correction did act: without it the weights end elsewhere.
    silent = copy.deepcopy(base)
    train_official_form(silent, data, read_lr="before_scheduler", cage=False)
    d_runtime, d_official, d_silent = grid_distance(runtime), grid_distance(official), grid_distance(silent)
    # CAGE pulled the weights toward the grid ...
    assert d_runtime < 0.97 * d_silent  # measured 5-6% closer after 25 active steps
    # ... and the official order gives nearly the same pull: its pass reads the next step's lr,
    # 3-7% lower while the cosine decays, so it pulls slightly less (measured: 7% of CAGE's
    # pull at W4 and W3 here) and ends at the same loss.
    assert d_runtime < d_official < d_runtime + 0.15 * (d_silent - d_runtime), (d_runtime, d_official, d_silent)
    assert loss_official[-1] == pytest.approx(loss_runtime[-1], rel=2e-3)

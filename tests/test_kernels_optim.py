"""Fused AdamW+CAGE kernel: CAGEAdamW(backend="triton") against backend="torch" on clones,
over many steps crossing the silence point, under Triton's interpreter on CPU.

Kernel and reference may round a weight that sits exactly on a grid boundary to different
levels (bf16 weights make exact ties common: a Hadamard block of them can cancel to
x_h = 0, which the kernel's exact +-1 sums round half to even and the reference's inexact
H/sqrt(B) products push either way). The lockstep comparison therefore checks every step,
lets a rotation block differ only where the tensor Q was taken of has an element at a
decision boundary, bounds how often that happens, and resyncs the kernel's copy.
"""

import collections
import copy
import io

import pytest
import torch

import triton  # noqa: F401  (a missing triton fails here, loudly)

import cage_kernels.adamw_cage as adamw_cage
from cage import CAGEAdamW, QuantConfig, naive
from cage_kernels import tiling
from cage_kernels.launch import Launch
from cage.testing import MAX_FLIP_FRACTION, assert_close_except_rare, near_boundary_blocks, outliers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
STEPS = 20  # silence ratio 0.5: 10 plain AdamW steps, then CAGE
Q4 = QuantConfig(4, block_size=32)
QUANTIZED_SHAPES = [(7, 64), (33, 96)]  # odd rows; 2 and 3 blocks of 32
PLAIN_SHAPES = [(37,), (3, 4, 5)]


def make_params(dtype, seed=0, quantized_shapes=QUANTIZED_SHAPES, plain_shapes=PLAIN_SHAPES):
    gen = torch.Generator().manual_seed(seed)

    def param(shape):
        return torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype).to(DEVICE))

    return [param(s) for s in quantized_shapes], [param(s) for s in plain_shapes]


def make_optimizer(quantized, plain, backend, *, quant=Q4, **kw):
    options = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, total_steps=STEPS, cage_lambda=10.0,
                   silence_ratio=0.5, schedule="linear_ramp", coupling="decoupled")
    options.update(kw)
    groups = [{"params": quantized, "quant": quant}, {"params": plain, "weight_decay": 0.0}]
    return CAGEAdamW(groups, backend=backend, **options)


def set_grads(params, step, seed=100):
    gen = torch.Generator().manual_seed(seed + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)


def quantized_operand(opt, p, step, coupling):
    """What the reference takes Q of this step: x before it (coupled) or after AdamW (decoupled)."""
    x = p.detach().to(torch.float32).clone()
    if coupling == "coupled":
        return x
    group = opt.param_groups[0]
    state = opt.state[p]
    exp_avg, exp_avg_sq = (state[k].clone() if k in state else torch.zeros_like(x) for k in ("exp_avg", "exp_avg_sq"))
    beta1, beta2 = group["betas"]
    naive.adamw_cage_step(
        x, p.grad, exp_avg, exp_avg_sq, step, lr=group["lr"],
        beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], quant=None,
        cage_lambda=0.0, coupling=coupling,
    )
    return x


def lockstep(dtype, steps=STEPS, quant=Q4, params=None, **kw):
    """Step the torch and triton backends side by side; assert every step agrees up to
    boundary flips (then resync). Returns (flipped blocks, block-steps compared)."""
    ref_q, ref_p = params if params is not None else make_params(dtype)
    ours_q, ours_p = copy.deepcopy((ref_q, ref_p))
    opt_ref = make_optimizer(ref_q, ref_p, "torch", quant=quant, **kw)
    opt_ours = make_optimizer(ours_q, ours_p, "triton", quant=quant, **kw)
    coupling = opt_ref.defaults["coupling"]
    block = quant.block_size if quant.hadamard else 1
    flips = block_steps = 0
    for step in range(1, steps + 1):
        set_grads(ref_q + ref_p, step)
        set_grads(ours_q + ours_p, step)
        lam = opt_ref.lambda_at(step)
        cage_on = lam != 0
        # coupled: g += lambda (x - Q(x)) carries Q's rounding times lambda into m and v. The
        # reference's fp32 Q (rotating rounded q_h) is off the exact one by up to ~8 ulps of s
        # on 11008-wide rows (the kernel's by ~2: it rotates exact levels), and v is quadratic
        # in g, so its error grows with |g| / rms(g) (up to ~4 here)
        compute_ulps = 128 * max(1.0, lam) if coupling == "coupled" else 32
        near = [near_boundary_blocks(quantized_operand(opt_ref, p, step, coupling), quant) for p in ref_q] if cage_on else []
        opt_ref.step()
        opt_ours.step()
        for i, (ours, ref) in enumerate(zip(ours_q + ours_p, ref_q + ref_p)):
            pairs = [(ours.data, ref.data)] + [(opt_ours.state[ours][k], opt_ref.state[ref][k]) for k in ("exp_avg", "exp_avg_sq")]
            bad = [outliers(a, b, compute_ulps=compute_ulps) for a, b in pairs]
            if i < len(ref_q):
                block_steps += ref.numel() // block
            if not any(b.any() for b in bad):
                continue
            assert i < len(ref_q) and cage_on, f"step {step}: tensor {i} differs without a quantizer"
            bad_blocks = torch.stack([b.reshape(-1, ref.shape[-1] // block, block).any(-1) for b in bad]).any(0)
            assert bool((near[i] | ~bad_blocks).all()), f"step {step}: tensor {i} differs away from any grid boundary"
            flips += int(bad_blocks.sum())
            for a, b in pairs:  # resync, so that each step is compared on its own
                a.copy_(b)
    assert flips <= max(2, MAX_FLIP_FRACTION * block_steps), f"{flips} boundary flips in {block_steps} block-steps"
    return flips, block_steps


@pytest.mark.parametrize(
    "dtype,coupling,schedule",
    [(torch.float32, "decoupled", "linear_ramp"), (torch.float32, "coupled", "constant"),
     (torch.bfloat16, "decoupled", "constant"), (torch.bfloat16, "coupled", "linear_ramp")],
    ids=lambda v: DTYPE_NAMES.get(v, v),
)
def test_many_steps_match_torch_backend(dtype, coupling, schedule):
    # silence until step 10 (plain AdamW), then CAGE at full strength or ramping in
    assert make_optimizer(*make_params(dtype), "torch").lambda_at(STEPS // 2) == 0
    lockstep(dtype, coupling=coupling, schedule=schedule)


def test_silence_is_torch_adamw():
    # lambda_t = 0 throughout: the kernel is torch.optim.AdamW (single tensor), op for op
    quantized, plain = make_params(torch.float32)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in quantized + plain]
    opt = make_optimizer(quantized, plain, "triton", silence_ratio=0.99, total_steps=2 * STEPS)
    opt_ref = torch.optim.AdamW(
        [{"params": ref[:2]}, {"params": ref[2:], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False,
    )
    for step in range(STEPS):
        set_grads(quantized + plain, step)
        set_grads(ref, step)
        opt.step()
        opt_ref.step()
    for a, b in zip(quantized + plain, ref):
        assert_close_except_rare(a.detach(), b.detach(), ulps=1, compute_ulps=1, max_fraction=0.0)


@pytest.mark.parametrize("coupling", ["decoupled", "coupled"])
def test_rows_longer_than_a_chunk_take_two_sweeps(monkeypatch, coupling):
    # rows of 2 and 3 blocks of 32 held 32 columns at a time: two sweeps over the row
    monkeypatch.setattr(tiling, "ROW_CHUNK_MAX", 32)
    lockstep(torch.bfloat16, steps=8, total_steps=8, silence_ratio=0.25, coupling=coupling)


@pytest.mark.parametrize(
    "quant",
    [QuantConfig(3, hadamard=False), QuantConfig(2, block_size=8), QuantConfig(1, block_size=16),
     QuantConfig(8, block_size=128), QuantConfig(4, block_size=32, grid="integer"),
     QuantConfig(8, block_size=128, grid="integer"), QuantConfig(2, hadamard=False, grid="integer")],
    ids=str,
)
def test_quantizer_variants(quant):
    params = make_params(torch.float32, 1, [(9, 128)], [])
    lockstep(torch.float32, steps=4, total_steps=4, silence_ratio=0.0, quant=quant, params=params)


def test_fp16_params_and_the_other_lerp_branch():
    # fp16 params (fp32 moments); beta1 <= 0.5 takes the other branch of torch's lerp
    lockstep(torch.float16, steps=6, total_steps=6, betas=(0.3, 0.9), eps=1e-6, coupling="coupled")


def test_reference_fallbacks_inside_the_triton_backend():
    # fp64 and non-contiguous params take the torch reference step: identical results
    for make in (lambda: make_params(torch.float64, 2),
                 lambda: ([torch.nn.Parameter(torch.randn(64, 7, generator=torch.Generator().manual_seed(5)).to(DEVICE).t())], [])):
        results = []
        for backend in ("torch", "triton"):
            quantized, plain = make()
            opt = make_optimizer(quantized, plain, backend, silence_ratio=0.0, total_steps=3)
            for step in range(3):
                set_grads(quantized + plain, step)
                opt.step()
            results.append(quantized + plain)
        for a, b in zip(*results):
            assert torch.equal(a, b)


def test_non_contiguous_grads():
    quantized, plain = make_params(torch.float32, 3)
    results = []
    for backend in ("torch", "triton"):
        q, p = copy.deepcopy((quantized, plain))
        opt = make_optimizer(q, p, backend, silence_ratio=0.0, total_steps=3)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for t in q + p:  # a transposed copy seen through a permutation: same values, other strides
                t.grad = torch.randn(tuple(reversed(t.shape)), generator=gen).to(DEVICE).permute(*reversed(range(t.dim())))
            opt.step()
        results.append(q + p)
    for a, b in zip(*results):
        assert_close_except_rare(a.detach(), b.detach(), max_fraction=0.0)


@pytest.mark.parametrize("direction", ["triton_to_torch", "torch_to_triton"])
def test_state_dicts_are_interchangeable(direction):
    # fp32 weights with CAGE on across the switch (bf16's exact ties are the lockstep test's job)
    first, second = direction.split("_to_")
    half = STEPS // 2 + 2

    def run(backend, params, start, stop, state=None):
        opt = make_optimizer(*params, backend)
        if state is not None:
            opt.load_state_dict(state)
        for step in range(start, stop):
            set_grads(params[0] + params[1], step)
            opt.step()
        return opt

    full_params = make_params(torch.float32)
    run("torch", full_params, 0, STEPS)
    params = make_params(torch.float32)
    opt = run(first, params, 0, half)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = run(second, params, half, STEPS, torch.load(buffer, weights_only=True))
    assert resumed.lambda_at(half + 1) > 0
    for a, b in zip(params[0] + params[1], full_params[0] + full_params[1]):
        assert_close_except_rare(a.detach(), b.detach(), max_fraction=0.0)


def test_bf16_state_layout_is_the_torch_backends():
    states = []
    for backend in ("torch", "triton"):
        quantized, plain = make_params(torch.bfloat16)
        opt = make_optimizer(quantized, plain, backend)
        set_grads(quantized + plain, 0)
        opt.step()
        states.append(opt.state_dict()["state"])
    for ref, ours in zip(states[0].values(), states[1].values()):
        assert ref.keys() == ours.keys()
        for key in ref:
            assert (ref[key].dtype, ref[key].shape, ref[key].device) == (ours[key].dtype, ours[key].shape, ours[key].device)
        assert ours["exp_avg"].dtype == torch.float32 and ours["step"].device.type == "cpu"


def test_one_launch_per_bucket(monkeypatch):
    # quantized tensors share a launch when their rows plan alike (64 | 96 and 128 columns
    # take different blockings); all plain tensors of one alignment share one
    launches = []
    real_call = Launch.__call__

    def counting_call(self, *args):
        launches.append(args[0].numel() // adamw_cage.RECORD.value)  # records in the tensor table
        return real_call(self, *args)

    monkeypatch.setattr(Launch, "__call__", counting_call)
    # plain tensors whose sizes are multiples of 16 elements (odd sizes launch apart, unvectorized)
    quantized, plain = make_params(torch.float32, 4, [(7, 64), (9, 64), (5, 128), (3, 96), (4, 96)], [(48,), (4, 4, 8)])
    opt = make_optimizer(quantized, plain, "triton", silence_ratio=0.0)
    set_grads(quantized + plain, 0)
    opt.step()
    tensors_per_blocking = collections.Counter(
        adamw_cage.step_blocking(n_cols, hadamard=True, block_size=32, interpreted=True)
        for n_cols in (64, 64, 128, 96, 96)
    )
    assert len(tensors_per_blocking) >= 2  # the widths do not all plan alike
    assert sorted(launches) == sorted([len(plain), *tensors_per_blocking.values()])


@pytest.mark.parametrize(
    "dtype,coupling", [(torch.float32, "decoupled"), (torch.bfloat16, "decoupled"), (torch.float32, "coupled")],
    ids=lambda v: DTYPE_NAMES.get(v, v),
)
def test_llama_mlp_row_lengths(dtype, coupling):
    # rows of 11008 and 14336 columns (86 and 112 blocks of 128), a few rows each
    params = make_params(dtype, 7, [(3, 11008), (2, 14336)], [(11008,)])
    lockstep(dtype, steps=4, total_steps=4, silence_ratio=0.0, quant=QuantConfig(4), params=params, coupling=coupling)


def test_the_integer_grid_coupled_and_bf16_match_the_torch_backend():
    quant = QuantConfig(4, block_size=32, grid="integer")
    lockstep(torch.bfloat16, steps=6, total_steps=6, silence_ratio=0.0, quant=quant, coupling="coupled")
    lockstep(torch.float32, steps=6, total_steps=6, silence_ratio=0.0, quant=quant)

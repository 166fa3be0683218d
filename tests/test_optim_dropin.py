"""CAGEAdamW as a drop-in for torch.optim.AdamW: its state dicts, its keywords, a model as
``params``, tied weights, checks before any change, torch.compile(opt.step); and
prepare_qat validating every layer before it converts any."""

import copy
import math
import warnings

import pytest
import torch

from torch import nn

from cage import CAGEAdamW, QATLinear, QuantConfig, cage_lambda_at, prepare_qat, qat_param_groups
from cage.optim import group_backend

Q4 = QuantConfig(4, block_size=32)
Q3 = QuantConfig(3, block_size=32)


def small_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.LayerNorm(64), nn.Linear(64, 10))
    return prepare_qat(model, weight=Q4, activation=None, skip=("4",))


def train_steps(model, opt, steps, seed=123):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def plain_groups(model):
    groups = qat_param_groups(model, 0.1)
    for g in groups:
        g.pop("quant")
    return groups


def assert_models_equal(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def snapshot(opt):
    sd = opt.state_dict()
    return copy.deepcopy(sd["param_groups"]), {k: {n: t.clone() for n, t in v.items()} for k, v in sd["state"].items()}


def assert_unchanged(opt, before):
    groups, state = snapshot(opt)
    assert groups == before[0]
    assert state.keys() == before[1].keys()
    for k in state:
        for n in state[k]:
            assert torch.equal(state[k][n], before[1][k][n]), (k, n)


# ---- torch.optim.AdamW state dicts -------------------------------------------------------


def test_a_torch_adamw_state_dict_loads_and_continues_exactly():
    # lambda_t stays 0 over the continued steps, so CAGEAdamW must continue AdamW bit for bit
    ref, ours = small_model(), small_model()
    opt_ref = torch.optim.AdamW(plain_groups(ref), lr=3e-3, betas=(0.9, 0.95))
    train_steps(ref, opt_ref, 3)
    ours.load_state_dict(ref.state_dict())
    opt = CAGEAdamW(ours, lr=1.0, weight_decay=0.1, total_steps=100, silence_ratio=0.5)
    opt.load_state_dict(copy.deepcopy(opt_ref.state_dict()))
    # AdamW's hyperparameters come from the state dict, CAGE's from the constructor
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert [g["quant"] for g in opt.param_groups] == [Q4, None, None]
    assert all(g["total_steps"] == 100 and g["silence_ratio"] == 0.5 for g in opt.param_groups)
    train_steps(ref, opt_ref, 4, seed=7)
    train_steps(ours, opt, 4, seed=7)
    assert_models_equal(ref, ours)
    for p_ref, p in zip(ref.parameters(), ours.parameters()):
        assert opt.state[p]["step"].device.type == "cpu"
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt_ref.state[p_ref][key]), key


def test_a_cage_state_dict_loads_into_torch_adamw_and_continues_exactly():
    ref, ours = small_model(), small_model()
    opt = CAGEAdamW(ours, lr=3e-3, total_steps=100, silence_ratio=0.5)
    train_steps(ours, opt, 3)
    ref.load_state_dict(ours.state_dict())
    opt_ref = torch.optim.AdamW(plain_groups(ref), lr=1.0)
    opt_ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    train_steps(ref, opt_ref, 3, seed=7)
    train_steps(ours, opt, 3, seed=7)
    assert_models_equal(ref, ours)


@pytest.mark.parametrize(
    "make_saved,match",
    [
        (lambda m: torch.optim.AdamW(plain_groups(m), amsgrad=True), "amsgrad=True"),
        (lambda m: torch.optim.AdamW(plain_groups(m), maximize=True), "maximize=True"),
        (lambda m: torch.optim.Adam(plain_groups(m), weight_decay=0.1), "torch.optim.Adam with weight_decay"),
    ],
)
def test_a_state_dict_cagadamw_cannot_continue_is_refused_before_any_change(make_saved, match):
    model = small_model()
    saved_opt = make_saved(model)
    train_steps(model, saved_opt, 2)
    opt = CAGEAdamW(model, total_steps=10)
    train_steps(model, opt, 1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved_opt.state_dict())
    assert_unchanged(opt, before)
    train_steps(model, opt, 1)  # still usable (it used to lose 'quant' and fail with KeyError)


def test_an_invalid_or_mismatched_state_dict_is_refused_before_any_change():
    model = small_model()
    opt = CAGEAdamW(model, total_steps=10)
    train_steps(model, opt, 2)
    before = snapshot(opt)
    bad_lr = copy.deepcopy(opt.state_dict())
    bad_lr["param_groups"][1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"load_state_dict: param group 1: .*lr must be >= 0"):
        opt.load_state_dict(bad_lr)
    fewer = copy.deepcopy(opt.state_dict())
    fewer["param_groups"] = fewer["param_groups"][:2]
    with pytest.raises(ValueError, match=r"parameter groups of sizes \[2, 1\], this optimizer \[2, 1, 5\]"):
        opt.load_state_dict(fewer)
    assert_unchanged(opt, before)


def _corrupted(opt, how):
    sd = copy.deepcopy(opt.state_dict())
    last = max(sd["state"])  # the last parameter: the others would be loaded first
    if how == "shape":
        sd["state"][last]["exp_avg"] = sd["state"][last]["exp_avg"][:-1]
    elif how == "negative":
        sd["state"][last]["exp_avg_sq"][0] = -1.0
    elif how == "nan":
        sd["state"][last]["exp_avg"].view(-1)[0] = float("nan")
    elif how == "unknown id":
        sd["state"][999] = sd["state"][last]
    elif how == "step":
        sd["state"][last]["step"] = torch.tensor(-2.0)
    elif how == "not a tensor":
        sd["state"][last]["exp_avg_sq"] = [0.0]
    return sd


@pytest.mark.parametrize("how,match", [
    ("shape", r"exp_avg of parameter \d+ has shape"), ("negative", r"exp_avg_sq of parameter \d+ holds negative"),
    ("nan", r"exp_avg of parameter \d+ holds NaN"), ("unknown id", r"parameter id 999"),
    ("step", r"step of parameter \d+ must be a whole number"), ("not a tensor", r"exp_avg_sq of parameter \d+ must be"),
])
def test_a_corrupted_state_is_refused_before_any_change(how, match):
    model = small_model()
    opt = CAGEAdamW(model, total_steps=10)
    train_steps(model, opt, 2)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(_corrupted(opt, how))
    assert_unchanged(opt, before)
    train_steps(model, opt, 1)  # and the optimizer still steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_not_a_state_dict_is_refused_naming_the_keys():
    opt = CAGEAdamW(small_model(), total_steps=10)
    with pytest.raises(ValueError, match=r"keys 'state' and 'param_groups'.*\['param_groups'\]"):
        opt.load_state_dict({"param_groups": []})


def test_a_cage_state_dict_from_before_the_torch_keywords_loads():
    model = small_model()
    opt = CAGEAdamW(model, total_steps=10)
    train_steps(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        for key in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"):
            del g[key]
    resumed = CAGEAdamW(model, total_steps=10, fused=False)
    resumed.load_state_dict(sd)
    assert [g["fused"] for g in resumed.param_groups] == [False] * 3  # this optimizer's choice
    assert resumed.param_groups[0]["quant"] == Q4
    train_steps(model, resumed, 1)


# ---- a model as params, and the warning when nothing is quantized ------------------------


def test_a_model_as_params_gets_the_quantized_groups():
    a, b, c = small_model(), small_model(), small_model()
    kw = dict(lr=3e-3, weight_decay=0.1, total_steps=10, silence_ratio=0.0)
    opt_a = CAGEAdamW(a, **kw)
    opt_b = CAGEAdamW.from_model(b, **kw)
    opt_c = CAGEAdamW(qat_param_groups(c, 0.1), **kw)
    assert [g["quant"] for g in opt_a.param_groups] == [Q4, None, None]
    for opt, model in ((opt_a, a), (opt_b, b), (opt_c, c)):
        train_steps(model, opt, 3)
    assert_models_equal(a, c)
    assert_models_equal(b, c)


def test_transformers_trainer_form_gets_the_quantized_groups():
    # Trainer(optimizer_cls_and_kwargs=(CAGEAdamW, {"model": model, ...})) pops "model"
    # and passes it where the parameter groups go
    model = small_model()
    optimizer_cls, optimizer_kwargs = CAGEAdamW, {"model": model, "lr": 1e-3, "total_steps": 10}
    params = optimizer_kwargs.pop("model")
    opt = optimizer_cls(params, **optimizer_kwargs)
    assert any(g["quant"] == Q4 for g in opt.param_groups)


def test_from_model_needs_a_model():
    with pytest.raises(TypeError, match="from_model: model must be a torch.nn.Module"):
        CAGEAdamW.from_model([nn.Parameter(torch.randn(2, 2))], total_steps=10)


def test_no_quantized_group_warns_once():
    model = small_model()
    with pytest.warns(UserWarning, match="no parameter group has 'quant'.*CAGEAdamW\\(model") as record:
        opt = CAGEAdamW(model.parameters(), total_steps=10)
        train_steps(model, opt, 2)
    assert len([w for w in record if "no parameter group has 'quant'" in str(w.message)]) == 1


@pytest.mark.parametrize("how", ["model", "lambda0"])
def test_no_warning_when_something_is_quantized_or_lambda_is_zero(how):
    model = small_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if how == "model":
            opt = CAGEAdamW(model, total_steps=10)
        else:  # what the job's bf16 method builds: no quantized group and lambda 0
            opt = CAGEAdamW(qat_param_groups(nn.Linear(64, 64), 0.1), total_steps=10, cage_lambda=0.0)
        opt.step()


# ---- torch.optim.AdamW's keywords --------------------------------------------------------


def test_torch_keywords_with_a_meaning_are_accepted_and_recorded():
    p = nn.Parameter(torch.randn(4, 64))
    # AdamW's positional order: params, lr, betas, eps, weight_decay, amsgrad
    opt = CAGEAdamW([{"params": [p], "quant": Q4}], 1e-3, (0.9, 0.999), 1e-8, 0.01, False, total_steps=10,
                    maximize=False, foreach=False, capturable=False, differentiable=False, fused=None)
    for key, value in dict(amsgrad=False, maximize=False, foreach=False, capturable=False,
                           differentiable=False, fused=None).items():
        assert opt.param_groups[0][key] is value, key
        assert opt.defaults[key] is value, key
    assert group_backend(opt.param_groups[0], opt.backend) == "auto"
    assert group_backend(CAGEAdamW([p], fused=True, total_steps=10, cage_lambda=0).param_groups[0], "auto") == "triton"
    plain = CAGEAdamW([p], fused=False, total_steps=10, cage_lambda=0)
    assert group_backend(plain.param_groups[0], plain.backend) == "torch"
    p.grad = torch.ones_like(p)
    plain.step()  # fused=False is the torch step, on any device


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(amsgrad=True), "amsgrad=True is not supported: CAGE's update uses Adam's second moment"),
        (dict(maximize=True), "maximize=True is not supported: .*negate the loss"),
        (dict(foreach=True), "foreach=True is not supported: there is no multi-tensor torch path"),
        (dict(capturable=True), "capturable=True is not supported: .*CUDA graph"),
        (dict(differentiable=True), "differentiable=True is not supported: .*no_grad"),
        (dict(fused="yes"), r"fused must be one of \(None, True, False\), got 'yes'"),
        (dict(fused=True, backend="torch"), "fused=True means backend='triton' but backend='torch'"),
        (dict(fused=False, backend="triton"), "fused=False means backend='torch' but backend='triton'"),
    ],
)
def test_torch_keywords_without_a_meaning_are_refused_saying_why(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CAGEAdamW([nn.Parameter(torch.randn(4, 64))], total_steps=10, **kwargs)


def test_a_group_cannot_override_a_refused_keyword():
    opt = CAGEAdamW([nn.Parameter(torch.randn(4, 64))], total_steps=10, cage_lambda=0)
    with pytest.raises(ValueError, match="maximize=True is not supported"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "maximize": True})
    assert len(opt.param_groups) == 1


# ---- tied weights, duplicates, add_param_group ---------------------------------------------


class Tied(nn.Module):
    def __init__(self, quant_a=Q4, quant_b=Q4):
        super().__init__()
        self.a = QATLinear(64, 64, bias=False, weight_quant=quant_a)
        self.b = QATLinear(64, 64, bias=False, weight_quant=quant_b)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_tied_quantized_weight_is_listed_and_stepped_once():
    torch.manual_seed(0)
    model = Tied()
    groups = qat_param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1]
    opt = CAGEAdamW(model, lr=1e-2, weight_decay=0.1, total_steps=4, silence_ratio=0.0)
    # the same step for the weight on its own, with the summed gradient autograd gives it
    w = nn.Parameter(model.a.weight.detach().clone())
    ref = CAGEAdamW([{"params": [w], "quant": Q4, "weight_decay": 0.1}], lr=1e-2, total_steps=4, silence_ratio=0.0)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 64)).pow(2).mean().backward()
        w.grad = model.a.weight.grad.clone()
        opt.step()
        ref.step()
    assert opt.state[model.a.weight]["step"].item() == 2
    assert torch.equal(model.a.weight, w)


def test_a_weight_tied_across_two_quant_configs_is_an_error():
    with pytest.raises(ValueError, match=r"weight of 'b' is tied to the weight of 'a' but their weight_quant differ"):
        qat_param_groups(Tied(Q4, Q3), 0.1)


def test_a_parameter_twice_in_a_group_or_in_two_groups_is_an_error():
    w = nn.Parameter(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"parameters 0 and 1 of a group are the same tensor .*stepped twice"):
        CAGEAdamW([{"params": [w, w], "quant": Q4}], total_steps=10)
    with pytest.raises(ValueError, match="more than one parameter group"):
        CAGEAdamW([{"params": [w], "quant": Q4}, {"params": [w]}], total_steps=10)


def test_an_invalid_added_group_is_not_kept():
    p = nn.Parameter(torch.randn(4, 64))
    opt = CAGEAdamW([{"params": [p], "quant": Q4}], total_steps=10)
    q = nn.Parameter(torch.randn(4, 64))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.add_param_group({"params": [q], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": (t for t in [q]), "lr": 1e-3})  # an iterator is fine
    assert opt.param_groups[1]["params"] == [q]


# ---- hyperparameters ------------------------------------------------------------------------


@pytest.mark.parametrize("betas", [0.9, (0.9,), (0.9, 1.0), (-0.1, 0.9), (0.9, float("nan")), ("a", 0.9), (0.9, 0.99, 0.999)])
def test_bad_betas_name_betas_and_the_accepted_form(betas):
    with pytest.raises(ValueError, match=r"betas must be a pair in \[0, 1\) such as \(0.9, 0.999\)"):
        CAGEAdamW([nn.Parameter(torch.randn(4, 64))], betas=betas, total_steps=10)


@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay", "cage_lambda", "silence_ratio"])
@pytest.mark.parametrize("value", [math.inf, math.nan, torch.tensor(1e-3)])
def test_non_finite_or_non_number_hyperparameters_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"CAGEAdamW: {name} must be .*a finite Python number"):
        CAGEAdamW([nn.Parameter(torch.randn(4, 64))], total_steps=10, **{name: value})


# ---- torch.compile(opt.step) ----------------------------------------------------------------


def compile_setup(coupling, schedule, check_finite):
    gen = torch.Generator().manual_seed(0)
    quantized = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s, dtype in
                 [((8, 64), torch.float32), ((4, 96), torch.float32), ((4, 64), torch.bfloat16)]]
    plain = [nn.Parameter(torch.randn(16, generator=gen))]
    opt = CAGEAdamW([{"params": quantized, "quant": Q4}, {"params": plain, "weight_decay": 0.0}],
                    lr=1e-2, weight_decay=0.1, total_steps=6, silence_ratio=0.3, coupling=coupling,
                    schedule=schedule, backend="auto", check_finite=check_finite)
    return quantized + plain, opt


@pytest.mark.parametrize("coupling,schedule,check_finite", [
    ("decoupled", "linear_ramp", "skip"), ("coupled", "constant", False),
])
def test_compiled_step_is_one_graph_compiled_once_and_matches_the_eager_step(coupling, schedule, check_finite):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params, opt = compile_setup(coupling, schedule, check_finite)
    ref_params, ref = compile_setup(coupling, schedule, check_finite)
    step = torch.compile(opt.step, backend="eager", fullgraph=True)  # fullgraph: a break is an error
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):  # silence, then the ramp: lambda_t changes without a recompile
        for p, r in zip(params, ref_params):
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            r.grad = p.grad.clone()
        step()
        ref.step()
    # the first step creates the state, every later one reuses the second graph
    assert counters["stats"]["unique_graphs"] == 2
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, **({} if p.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)))
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[r]["exp_avg_sq"])
        assert opt.state[p]["step"].item() == 6


def test_compiled_step_traces_the_torch_formulation_for_the_triton_backend_too():
    # the eager kernel takes host scalars; traced, the same update comes from the torch formulation
    def setup():
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(8, 64, generator=gen))]
        opt = CAGEAdamW([{"params": params, "quant": Q4}], lr=1e-2, total_steps=4, silence_ratio=0.0,
                        backend="triton", check_finite=False)
        return params[0], opt

    (p, opt), (ref_p, ref) = setup(), setup()
    step = torch.compile(opt.step, backend="eager", fullgraph=True)
    for _ in range(2):
        p.grad = torch.randn(8, 64)
        ref_p.grad = p.grad.clone()
        step()
        ref.step()  # the Triton kernel (under the interpreter on a CPU)
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear_ramp", "constant"])
def test_lambda_of_a_tensor_step_is_the_float_schedule(schedule):
    for step in range(0, 41):
        expected = cage_lambda_at(step, 40, 7.0, 0.25, schedule)
        traced = cage_lambda_at(torch.tensor(float(step)), 40, 7.0, 0.25, schedule)
        assert traced.dtype == torch.float64
        assert traced.item() == pytest.approx(expected, rel=1e-12, abs=0), step


# ---- prepare_qat validates every layer first -------------------------------------------------


def test_prepare_qat_failing_on_a_later_layer_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 8))  # 100 is not a multiple of 32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"prepare_qat: layer '2': .*\(100\).*block_size \(32\)"):
        prepare_qat(model, weight=Q4, skip=())
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_prepare_qat_checks_the_backend_name_before_converting():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'fast'"):
        prepare_qat(model, weight=Q4, skip=(), backend="fast")
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("name,value,match", [
    ("total_steps", 0, "total_steps must be a positive integer"), ("lr", float("nan"), "lr must be >= 0"),
    ("silence_ratio", 1.5, r"silence_ratio must be in \[0, 1\)"),
])
def test_an_option_edited_mid_run_is_checked_at_the_next_step(name, value, match):
    model = small_model()
    opt = CAGEAdamW(model, total_steps=10)
    train_steps(model, opt, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=match + r".*param group 0, as edited"):
        train_steps(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_an_lr_schedule_edits_lr_every_step_and_steps_as_usual():
    model = small_model()
    opt = CAGEAdamW(model, total_steps=10)
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * (step + 1)
        train_steps(model, opt, 1, seed=step)
    assert all(int(opt.state[p]["step"]) == 3 for p in model.parameters())


def test_a_frozen_quantized_weight_is_not_in_the_groups_nor_stepped():
    model = small_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    frozen.grad = torch.ones_like(frozen)  # a stale gradient
    before = frozen.detach().clone()
    groups = qat_param_groups(model, 0.1)
    assert all(p is not frozen for g in groups for p in g["params"])
    opt = CAGEAdamW(model, total_steps=10)
    train_steps(model, opt, 2)
    assert torch.equal(frozen, before)

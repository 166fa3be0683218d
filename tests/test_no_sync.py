"""No host reads in CAGEAdamW.step with the GPU defaults, checked on a CPU two ways: (a) a
TorchDispatchMode counts ``aten._local_scalar_dense`` (what ``.item()``, ``bool()`` and
``float()`` of a tensor dispatch to), and (b) the whole step runs on the ``meta`` device,
where every host read raises. Also: the traced step reads the Hadamard matrix as a constant
of its graph instead of building it there.

The Triton backend's launches are stubbed here (a kernel runs on the device and reads nothing
back; under the interpreter it would run in Python on the host): what is checked is the host
code around them, which is what runs on a GPU.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cage_kernels.launch as launch
from cage import CAGEAdamW, QuantConfig, naive

Q4 = QuantConfig(4, block_size=32)


class ScalarReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def stubbed_launches(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.Launch, "__call__", lambda self, *args: calls.append(self.name))
    return calls


def make_optimizer(device, backend, **options):
    gen = torch.Generator().manual_seed(0)
    quantized = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in [(6, 64), (3, 96)]]
    plain = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in [(40,), (5, 7)]]
    opt = CAGEAdamW([{"params": quantized, "quant": Q4}, {"params": plain, "weight_decay": 0.0}], lr=1e-2,
                    betas=(0.9, 0.95), weight_decay=0.1, total_steps=4, silence_ratio=0.5, backend=backend, **options)
    return quantized + plain, opt


def set_grads(params, step):
    gen = torch.Generator().manual_seed(10 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def test_the_counter_sees_what_a_host_read_dispatches():
    # the checks below must be able to fail (.tolist() of a CPU tensor dispatches nothing:
    # the meta test covers it)
    t = torch.ones(2)
    for read in (lambda: t[0].item(), lambda: bool(t[0]), lambda: float(t.sum()), lambda: int(t[1])):
        with ScalarReads() as mode:
            read()
        assert mode.reads, read


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("flag", ["own", "passed"], ids=["check_finite-skip", "found_inf-passed"])
def test_step_reads_nothing_back_to_the_host(backend, flag, stubbed_launches):
    params, opt = make_optimizer("cpu", backend, check_finite="skip" if flag == "own" else False)
    with ScalarReads() as mode:
        for step in range(4):  # the plan is built at step 1; lambda_t turns on at step 3
            set_grads(params, step)
            found_inf = torch.zeros(1) if flag == "passed" else None
            opt.step(found_inf=found_inf)
            opt.zero_grad(set_to_none=True)
    assert mode.reads == []
    assert all(int(opt.state[p]["step"]) == 4 for p in params)  # (read after the mode)
    if backend == "triton":  # the fused path ran: plain AdamW, then the CAGE variant, per group
        assert len(stubbed_launches) >= 8 and set(stubbed_launches) == {"_adamw_cage_kernel"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("flag", ["own", "passed"], ids=["check_finite-skip", "found_inf-passed"])
def test_step_runs_on_meta_tensors(backend, flag, stubbed_launches):
    # on meta every .item(), .tolist(), .cpu() or bool() raises: a step that finishes read nothing
    params, opt = make_optimizer("meta", backend, check_finite="skip" if flag == "own" else False)
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(params[0].sum())  # the premise
    for step in range(4):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step(found_inf=torch.zeros(1, device="meta") if flag == "passed" else None)
    assert opt.skipped_steps.device.type == "meta"
    assert all(int(opt.state[p]["step"]) == 4 for p in params)  # the CPU step counters moved


def test_a_found_inf_passed_skips_the_step_and_is_counted():
    params, opt = make_optimizer("cpu", "torch", check_finite=False)
    set_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    set_grads(params, 1)
    opt.step(found_inf=torch.ones(1))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert int(opt.skipped_steps) == 1 and float(opt.last_found_inf) == 1.0
    assert all(int(opt.state[p]["step"]) == 2 for p in params)  # a skipped step still counts


def test_the_traced_step_reads_the_hadamard_matrix_as_a_graph_constant():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    params, opt = make_optimizer("cpu", "torch", check_finite=False)
    naive._HADAMARD.clear()  # what the optimizer builds, it builds again
    opt = CAGEAdamW(opt.param_groups, total_steps=4, silence_ratio=0.0, check_finite=False)
    assert (32, torch.float32, torch.device("cpu")) in naive._HADAMARD  # built by the constructor
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for i in range(2):
        set_grads(params, i)
        step()
    assert graphs
    for gm in graphs:
        targets = {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"}
        assert not targets & {"cat", "ones", "hadamard_matrix", "sylvester_hadamard"}, targets
        inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        assert any("HADAMARD" in name.upper() for name in inputs), inputs


def test_the_checker_sees_a_matrix_built_inside_the_graph():
    # the assertion above must be able to fail: a traced function that builds the matrix
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    naive._HADAMARD.clear()

    @torch.compile(backend=backend, fullgraph=True)
    def rotate(x):
        return naive.block_rotate(x, 32)

    rotate(torch.randn(2, 64))
    targets = {getattr(n.target, "__name__", str(n.target)) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert "cat" in targets

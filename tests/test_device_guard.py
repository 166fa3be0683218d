"""Launches go to the device of their tensors, not to whichever CUDA device is current, and
a non-finite flag or loss scale on another device is moved to each launch's device. The GPU
machine has one GPU and CI none: CUDA's device calls are mocked."""

import contextlib

import pytest
import torch

import cage_kernels
from cage_kernels.launch import Launch


class FakeCuda:
    """torch.cuda.current_device / torch.cuda.device over a recorded 'current' index."""

    def __init__(self, current=0):
        self.current, self.switches = current, []

    def current_device(self):
        return self.current

    @contextlib.contextmanager
    def device(self, index):
        self.switches.append(index)
        before, self.current = self.current, index
        try:
            yield
        finally:
            self.current = before


class FakeKernel:
    """Records the current device at each launch."""

    def __init__(self, cuda):
        self.cuda, self.launched_on = cuda, []

    def __getitem__(self, grid):
        return lambda *args, **options: self.launched_on.append(self.cuda.current)


class OnDevice:
    def __init__(self, device):
        self.device = torch.device(device)


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeCuda(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    return fake


def launch_of(kernel):
    return Launch(kernel, (1,), (), 4, 1)


@pytest.mark.parametrize("device,switched", [("cuda:1", [1]), ("cuda:0", []), ("cpu", [])])
def test_a_launch_runs_on_the_device_of_its_first_tensor(cuda, device, switched):
    kernel = FakeKernel(cuda)
    launch_of(kernel)(OnDevice(device), 3)
    assert cuda.switches == switched
    assert kernel.launched_on == [int(device[-1]) if device.startswith("cuda") else 0]
    assert cuda.current == 0  # restored after the launch


def test_the_guard_would_see_a_launch_on_the_wrong_device(cuda):
    # without the guard the kernel runs on the current device: the check above can fail
    kernel = FakeKernel(cuda)
    kernel[(1,)](OnDevice("cuda:1"))
    assert kernel.launched_on == [0]


class Elsewhere:
    """A one-element flag that says it is on another device; ``to`` records the move."""

    def __init__(self, value):
        self.device, self.moved_to, self.value = torch.device("cuda", 1), [], value

    def to(self, device):
        self.moved_to.append(torch.device(device))
        return torch.tensor([self.value], device=device)


def test_found_inf_and_grad_scale_are_moved_to_each_launchs_device(monkeypatch):
    launched = []
    monkeypatch.setattr(Launch, "__call__", lambda self, *args: launched.append(args))
    params = [torch.zeros(4, 32), torch.zeros(7)]
    plan = cage_kernels.StepPlan(params, [torch.ones_like(p) for p in params], [torch.zeros_like(p) for p in params],
                                 [torch.zeros_like(p) for p in params])
    flag, scale = Elsewhere(0.0), Elsewhere(2.0)
    plan(step=1, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, found_inf=flag, grad_scale=scale)
    assert launched and flag.moved_to == scale.moved_to == [torch.device("cpu")] * len(launched)
    for args in launched:  # (tensor table, tile table, rotation, found_inf, grad_scale, ...)
        assert args[3].device.type == "cpu" and float(args[3]) == 0.0
        assert args[4].device.type == "cpu" and float(args[4]) == 2.0

"""The CAGE-AdamW step of a parameter group (SPEC 2), laid out as ``torch.optim.adamw`` lays
out its implementations: plain functions of tensors and numbers below the optimizer class.

- :func:`reference_step`: one tensor in the torch formulation of ``cage.naive`` (the CPU
  path, the fallback for what the kernel does not take, and the tests' oracle);
- :func:`traced_adamw_cage_step`: the same with the step count and lambda_t as tensors, what
  ``torch.compile(opt.step)`` traces;
- :class:`GroupPlan`: the eager step of one group, planned when its tensors change and
  replayed otherwise. Planning once is what keeps the host out of the way on a GPU: the
  fused kernel's tables (``cage_kernels.StepPlan``), the buckets of parameters at one step
  count, and the host copies of those counts (read without ``.item()``) are built at the
  first step and reused while every param, grad and moment keeps its storage.

Step counters: every parameter's ``state["step"]`` is its own CPU scalar tensor, as in
``torch.optim.AdamW``; a plan makes those of one bucket views of one small CPU tensor, so
one ``add_`` advances them all (an ``add_`` per tensor costs ~3 us of host time each, 0.7 ms
for the 201 tensors of a 1.1B Llama). Each view still holds its own parameter's count, so a
state dict loads anywhere (``torch.optim.AdamW`` included) and steps correctly there.
"""

from __future__ import annotations

import collections
import operator

import torch

from .. import backend as _backend
from .. import naive
from ..config import RMS_EPS, QuantConfig

_DTENSOR: list = []  # [DTensor class or None], looked up once


def dtensor_type():
    """torch's DTensor class (FSDP2's parameters), or None without torch.distributed."""
    if not _DTENSOR:
        dtensor = None
        if torch.distributed.is_available():
            try:
                from torch.distributed.tensor import DTensor as dtensor
            except ImportError:  # torch < 2.5
                from torch.distributed._tensor import DTensor as dtensor
        _DTENSOR.append(dtensor)
    return _DTENSOR[0]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The process-local shard of a DTensor (FSDP2), sharing its storage; ``t`` otherwise."""
    dtensor = dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return t
    local = getattr(t, "_local_tensor", None)  # what to_local() returns, without its autograd wrapper
    return local if local is not None else t.to_local()


def check_whole_rows(p: torch.Tensor, index: int) -> None:
    """CAGE quantizes whole rows: a sharded parameter must be split between rows."""
    for placement in getattr(p, "placements", ()):
        dim = getattr(placement, "dim", None)
        if placement.is_shard() and dim is not None and dim % p.dim() == p.dim() - 1:
            raise ValueError(
                f"CAGEAdamW: quantized parameter {index} (shape {tuple(p.shape)}) is sharded along its "
                "last dimension, which splits the rows CAGE quantizes; shard along dim 0 "
                "(FSDP2's default) or keep it replicated"
            )


def all_finite(g: torch.Tensor) -> bool:
    # A NaN or Inf anywhere makes the sum non-finite, and a sum is ~40x cheaper on a CPU
    # than isfinite().all(); only a non-finite sum (possibly an overflow) takes the exact test.
    return bool(torch.isfinite(g.sum(dtype=torch.float32))) or bool(torch.isfinite(g).all())


def moment_dtype(param: torch.Tensor) -> torch.dtype:
    """Moments stay fp32 for half-precision parameters."""
    return torch.promote_types(param.dtype, torch.float32)


def nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """A one-element fp32 device flag, 1.0 when any gradient holds a NaN or Inf: one
    multi-tensor pass, no host read. An L1 norm is NaN or Inf exactly when an element is
    (barring a finite sum above 3e38), and fp32 accumulation keeps fp16 sums finite."""
    norms = torch._foreach_norm(grads, 1, dtype=torch.float32)
    device = grads[0].device
    return (~torch.isfinite(torch.stack([n.to(device) for n in norms])).all()).to(torch.float32).reshape(1)


def traced_adamw_cage_step(param, grad, exp_avg, exp_avg_sq, step: torch.Tensor, *, lr: float, beta1: float,
                           beta2: float, eps: float, weight_decay: float, quant: QuantConfig | None,
                           cage_lambda: torch.Tensor, coupling: str) -> None:
    """``naive.adamw_cage_step`` with the step count and lambda_t as tensors: no host value
    and no branch on one, so ``torch.compile`` traces it whole. The AdamW part is
    ``torch.optim.AdamW``'s capturable formulation (``addcdiv_`` takes no tensor scale);
    the correction is computed even while lambda_t is 0 (it then adds exactly 0).
    """
    work = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
    g = grad if grad.dtype == exp_avg.dtype else grad.to(exp_avg.dtype)
    if quant is not None and coupling == "coupled":
        g = g + cage_lambda * naive.quantization_error(work, quant)
    naive.decay_and_update_moments(work, g, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2,
                                   weight_decay=weight_decay)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size_neg = (lr / bias_correction1).neg()
    denom = (exp_avg_sq.sqrt() / (bias_correction2.sqrt() * step_size_neg)).add_(eps / step_size_neg)
    work.addcdiv_(exp_avg, denom)
    if quant is not None and coupling == "decoupled":
        work.sub_(naive.quantization_error(work, quant) * (lr * cage_lambda))
    if work is not param:
        param.copy_(work)


def reference_step(p, grad, state: dict, step, group: dict, cage_lambda, found_inf: torch.Tensor | None = None,
                   grad_scale: torch.Tensor | None = None) -> None:
    """The torch reference step of one (local) tensor, in place. ``step`` and
    ``cage_lambda`` are numbers (eager: bit-identical to torch.optim.AdamW at lambda 0) or
    tensors (traced). With a device flag ``found_inf``, the update is computed aside and
    kept only where the flag is 0; ``grad_scale`` divides the gradient first (a GradScaler's
    scale, in the moments' precision)."""
    beta1, beta2 = group["betas"]
    targets = (p, state["exp_avg"], state["exp_avg_sq"])
    work = [t.clone() for t in targets] if found_inf is not None else targets
    if grad_scale is not None:
        grad = grad.to(state["exp_avg"].dtype) / grad_scale.to(grad.device)
    update = traced_adamw_cage_step if isinstance(step, torch.Tensor) else naive.adamw_cage_step
    update(
        work[0], grad, work[1], work[2], step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
        weight_decay=group["weight_decay"], quant=group["quant"], cage_lambda=cage_lambda,
        coupling=group["coupling"],
    )
    if found_inf is not None:
        skip = found_inf.to(device=p.device) != 0
        for target, new in zip(targets, work):
            target.copy_(torch.where(skip, target, new))


def group_grads(group: dict, dtensors: bool) -> list:
    """The gradients of a group's parameters (None where there is none), local shards for
    DTensor parameters."""
    grads = [p.grad for p in group["params"]]
    if dtensors:
        grads = [None if g is None else local_tensor(g) for g in grads]
    return grads


def _addresses(tensors) -> list[int]:
    return [-1 if t is None else t.data_ptr() for t in tensors]


class _Bucket:
    """Parameters of a group at one step count: one counter, one host step, one launch per kernel bucket."""

    __slots__ = ("counter", "step", "indices", "kernel", "kernel_plans", "reference")

    def __init__(self, counter, step, indices):
        self.counter, self.step, self.indices = counter, step, indices
        self.kernel: list[int] = []  # indices the fused kernel steps, in its plans' order
        self.kernel_plans: dict[bool, object] = {}  # CAGE on/off -> cage_kernels.StepPlan
        self.reference: list[int] = []  # indices the torch formulation steps


class GroupPlan:
    """The eager step of one parameter group over the parameters that have a gradient.

    Valid while the group lists the same parameters, the same ones have gradients, and every
    param and grad keeps its storage (the fused kernel reads them by address); the optimizer
    rebuilds it otherwise, and after anything that replaces state (``load_state_dict``). It
    holds no gradient: the next step's gradients can then reuse the same blocks, and the plan
    with them.
    """

    def __init__(self, group: dict, grads: list, states: list, host_steps: list[int], *, use_kernel: bool,
                 check_modes: list[str], state_version: int):
        self.group = group
        self.quant, self.fused = group["quant"], group["fused"]  # what its kernel plans were made for
        self.group_params = tuple(group["params"])
        self.dtensors = dtensor_type() is not None and any(isinstance(p, dtensor_type()) for p in self.group_params)
        self.grad_addresses = _addresses(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        self.present = present
        self.local_params = [local_tensor(self.group_params[i]) for i in present]
        self.param_addresses = [p.data_ptr() for p in self.local_params]
        self.local_states = [{k: local_tensor(v) for k, v in s.items() if k != "step"} for s in states]
        self.check_modes = check_modes  # per present parameter: "raise", "skip" or "off"
        self.raise_checked = [j for j, mode in enumerate(check_modes) if mode == "raise"]
        self.state_version = state_version
        self.buckets: list[_Bucket] = []
        by_step: dict[int, list[int]] = collections.defaultdict(list)
        for j, step in enumerate(host_steps):
            by_step[step].append(j)
        for step, indices in by_step.items():
            counter = torch.full((len(indices),), float(step), dtype=torch.float32)
            for k, j in enumerate(indices):
                states[j]["step"] = counter[k]
            self.buckets.append(_Bucket(counter, step, indices))
        quant = group["quant"]
        for bucket in self.buckets:
            for j in bucket.indices:
                p, g, st = self.local_params[j], grads[present[j]], self.local_states[j]
                if use_kernel and _backend.kernels().kernel_can_step(p, g, st["exp_avg"], st["exp_avg_sq"]):
                    bucket.kernel.append(j)
                else:
                    bucket.reference.append(j)
            if bucket.kernel:
                self._plan_kernels(bucket, grads, quant)

    def _plan_kernels(self, bucket: _Bucket, grads: list, quant: QuantConfig | None) -> None:
        kernels = _backend.kernels()
        streams = [(self.local_params[j], grads[self.present[j]], self.local_states[j]["exp_avg"],
                    self.local_states[j]["exp_avg_sq"]) for j in bucket.kernel]
        bucket.kernel_plans[False] = kernels.StepPlan(*zip(*streams))
        if quant is None:
            return
        if all(kernels.supports(s[0].dtype, quant.hadamard, quant.block_size) for s in streams):
            bucket.kernel_plans[True] = kernels.StepPlan(
                *zip(*streams), cage=True, levels=quant.levels, alpha=quant.alpha, hadamard=quant.hadamard,
                block_size=quant.block_size, integer_grid=quant.grid == "integer",
            )
        else:  # a quantizer the kernel does not take (blocks above 128): the reference corrects them
            bucket.kernel_plans[True] = None

    def holds(self, group: dict, grads: list, state_version: int) -> bool:
        """Whether this plan still describes ``group`` with these gradients; a plan whose
        gradients only moved (the same ones present, other addresses) is pointed at them."""
        params = group["params"]
        if not (
            group is self.group and state_version == self.state_version and group["quant"] == self.quant
            and group["fused"] is self.fused
            and len(params) == len(self.group_params) and all(map(operator.is_, params, self.group_params))
            and [p.data_ptr() for p in self.local_params] == self.param_addresses
        ):
            return False
        addresses = _addresses(grads)
        same = addresses == self.grad_addresses
        if not same and [a == -1 for a in addresses] != [a == -1 for a in self.grad_addresses]:
            return False  # other parameters have gradients now
        if not all([grads[i].is_contiguous() for i in self.present]):
            return False
        return same or self._retarget(addresses)

    def _retarget(self, addresses: list[int]) -> bool:
        moved = [addresses[self.present[j]] for j in range(len(self.present))]
        for bucket in self.buckets:
            order = [moved[j] for j in bucket.kernel]
            for plan in bucket.kernel_plans.values():
                if plan is not None and not plan.retarget(order):
                    return False  # (a bucket retargeted before this one is planned again with the rest)
        self.grad_addresses = addresses
        return True

    def host_steps(self) -> dict[int, int]:
        """Group index -> the step count this plan holds for it."""
        return {self.present[j]: bucket.step for bucket in self.buckets for j in bucket.indices}

    def check_raise(self, grads: list, group_index: int) -> None:
        """Raise FloatingPointError for a non-finite gradient checked on the host ("raise")."""
        for j in self.raise_checked:
            if not all_finite(grads[self.present[j]]):
                p = self.group_params[self.present[j]]
                raise FloatingPointError(
                    f"CAGEAdamW: the gradient of parameter {self.present[j]} (shape {tuple(p.shape)}) in param "
                    f"group {group_index} contains NaN or Inf; the step was not taken"
                )

    def flagged_grads(self, grads: list) -> list[torch.Tensor]:
        """The gradients the device flag covers ("skip")."""
        return [grads[self.present[j]] for j, mode in enumerate(self.check_modes) if mode == "skip"]

    def step(self, grads: list, lambda_at, found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None) -> None:
        """One step of every planned parameter, in place; the step counts advance by one."""
        group = self.group
        quant = group["quant"]
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        coupled = group["coupling"] == "coupled"
        for bucket in self.buckets:
            # a skipped step counts too: the count, the bias corrections and lambda_t advance
            # exactly as if it had been taken (knowing better would need a sync)
            bucket.counter.add_(1)
            bucket.step += 1
            step = bucket.step
            lam = float(lambda_at(step, group))
            cage = quant is not None and lam != 0
            plan = bucket.kernel_plans.get(cage) if bucket.kernel_plans else None
            if plan is not None:
                plan(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                     cage_lambda=lam if cage else 0.0, coupled=coupled, rms_eps=RMS_EPS, found_inf=found_inf,
                     grad_scale=grad_scale)
                reference = bucket.reference
            else:  # no kernel plan for this variant: the whole bucket takes the torch formulation
                reference = bucket.indices
            for j in reference:
                reference_step(self.local_params[j], grads[self.present[j]], self.local_states[j], step, group, lam,
                               found_inf, grad_scale)

"""CAGE-AdamW: AdamW plus the curvature-aware quantization correction (SPEC 2)."""

from __future__ import annotations

import copy
import math
import numbers
import operator
import warnings
from itertools import chain

import torch
from torch import nn
from torch.optim import Optimizer

from . import backend as _backend
from . import naive
from .config import QuantConfig
from .linear import qat_param_groups
from .ops import adamw_cage as ops

SCHEDULES = ("linear_ramp", "constant")
COUPLINGS = ("decoupled", "coupled")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
# check_finite values: None = "auto" (raise for CPU gradients, skip on a GPU), True = "raise"
# (a host check: a sync on a GPU), "skip" (a device flag, no sync), False = "off".
CHECK_MODES = {None: "auto", True: "raise", "raise": "raise", "skip": "skip", False: "off"}
# The group options CAGE adds to AdamW's: a torch.optim.AdamW state dict lacks them.
CAGE_KEYS = ("total_steps", "cage_lambda", "silence_ratio", "schedule", "coupling", "quant")
# torch.optim.AdamW's implementation switches, recorded in every group as torch does. They
# choose how a step runs, not what it computes: a loaded state dict keeps this optimizer's.
IMPLEMENTATION_KEYS = ("foreach", "capturable", "differentiable", "fused")
# torch.optim.AdamW options -> (the values CAGEAdamW accepts, why the others are refused).
TORCH_OPTIONS = {
    "amsgrad": ((False,), "CAGE's update uses Adam's second moment v; AMSGrad's running max of v "
                          "is not implemented"),
    "maximize": ((False,), "CAGE minimizes the loss plus its pull towards the quantization grid; "
                           "negate the loss to maximize it"),
    "foreach": ((None, False), "there is no multi-tensor torch path; the multi-tensor step is the "
                               "fused Triton kernel (fused=True, i.e. backend='triton')"),
    "capturable": ((False,), "the step count and lambda_t are host values (the fused kernel takes "
                             "them as scalars), so the step cannot be captured in a CUDA graph"),
    "differentiable": ((False,), "the step runs under torch.no_grad; differentiating through it is "
                                 "not supported"),
    "fused": ((None, True, False), ""),
}
# fused -> the backend it means; None leaves the choice to ``backend``.
FUSED_BACKEND = {True: "triton", False: "torch"}


def cage_lambda_at(step, total_steps: int, cage_lambda: float, silence_ratio: float, schedule: str):
    """lambda_t for the step numbered ``step`` (counted from 1) of ``total_steps``.

    With a tensor ``step`` the result is a float64 tensor computed without a host value or
    a branch on it, so that a traced ``step()`` needs neither a sync nor a recompile.
    """
    if isinstance(step, torch.Tensor):
        r = step.to(torch.float64) / total_steps
        if schedule == "constant":
            return cage_lambda * (r > silence_ratio).to(torch.float64)
        return cage_lambda * ((r - silence_ratio) / (1.0 - silence_ratio)).clamp(0.0, 1.0)
    r = step / total_steps
    if r <= silence_ratio:
        return 0.0
    if schedule == "constant":
        return float(cage_lambda)
    return cage_lambda * min(1.0, (r - silence_ratio) / (1.0 - silence_ratio))


def _is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def group_backend(group: dict, backend: str) -> str:
    """The backend name a group steps with: its ``fused`` option, else the optimizer's."""
    return FUSED_BACKEND.get(group["fused"], backend)


def _check_torch_options(options: dict, backend: str) -> None:
    for name, (accepted, why) in TORCH_OPTIONS.items():
        value = options[name]
        if not any(value is ok for ok in accepted):
            if isinstance(value, bool) and why:
                raise ValueError(f"CAGEAdamW: {name}={value} is not supported: {why}")
            raise ValueError(f"CAGEAdamW: {name} must be one of {accepted}, got {value!r}")
    fused = options["fused"]
    if fused is not None and backend != "auto" and FUSED_BACKEND[fused] != backend:
        raise ValueError(
            f"CAGEAdamW: fused={fused} means backend={FUSED_BACKEND[fused]!r} but backend={backend!r} "
            "was given; pass one of them (fused=True is the fused Triton step, fused=False the torch one)"
        )


OPTION_KEYS = ("lr", "eps", "weight_decay", "cage_lambda", "silence_ratio", "betas", "total_steps", "schedule",
               "coupling", "quant", "fused")


def group_options(group: dict) -> tuple:
    """The values of a group's options, to tell that one was edited since it was checked."""
    return tuple(group[key] for key in OPTION_KEYS)


def _check_group(group: dict, backend: str, params: bool = True) -> None:
    """Raise for an invalid option of ``group`` (and, with ``params``, an invalid parameter)."""
    def bad(name, accepted):
        return ValueError(f"CAGEAdamW: {name} must be {accepted}, got {group[name]!r}")

    for name, accepted, ok in (
        ("lr", ">= 0", lambda v: v >= 0),
        ("eps", ">= 0", lambda v: v >= 0),
        ("weight_decay", ">= 0", lambda v: v >= 0),
        ("cage_lambda", ">= 0", lambda v: v >= 0),
        ("silence_ratio", "in [0, 1)", lambda v: 0 <= v < 1),
    ):
        if not (_is_finite_number(group[name]) and ok(group[name])):
            raise bad(name, f"{accepted} (a finite Python number)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_is_finite_number(b) and 0 <= b < 1 for b in betas)):
        raise bad("betas", "a pair in [0, 1) such as (0.9, 0.999)")
    group["betas"] = tuple(betas)
    t = group["total_steps"]
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise bad("total_steps", "a positive integer (the number of optimizer steps of the run)")
    if group["schedule"] not in SCHEDULES:
        raise bad("schedule", f"one of {SCHEDULES}")
    if group["coupling"] not in COUPLINGS:
        raise bad("coupling", f"one of {COUPLINGS}")
    _check_torch_options(group, backend)
    quant = group["quant"]
    if isinstance(quant, dict):
        group["quant"] = quant = QuantConfig.from_dict(quant)
    if quant is not None and not isinstance(quant, QuantConfig):
        raise bad("quant", "a cage.QuantConfig or None")
    for i, p in enumerate(group["params"] if params else ()):
        if not p.is_floating_point():
            raise TypeError(f"CAGEAdamW: parameter {i} of a group is {p.dtype}; only floating-point parameters are optimized")
        if quant is not None:
            if p.dim() < 2:
                raise ValueError(
                    f"CAGEAdamW: parameter {i} of a quantized group has shape {tuple(p.shape)}; "
                    "quantized parameters are matrices quantized per row"
                )
            ops.check_whole_rows(p, i)
            try:
                quant.check_row_length(p.shape[-1])
            except ValueError as err:
                raise ValueError(f"CAGEAdamW: parameter {i} of shape {tuple(p.shape)}: {err}") from None


def _check_no_duplicates(params: list) -> None:
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        tensor = p[1] if isinstance(p, tuple) else p  # (name, tensor) pairs
        if id(tensor) in seen:
            raise ValueError(
                f"CAGEAdamW: parameters {seen[id(tensor)]} and {i} of a group are the same tensor "
                f"(shape {tuple(tensor.shape)}; a tied weight?); it would be stepped twice per step: list it once"
            )
        seen[id(tensor)] = i


class CAGEAdamW(Optimizer):
    """AdamW with the CAGE correction for parameter groups that carry ``"quant"``.

    ``params`` is what ``torch.optim.AdamW`` takes, or the prepared model itself
    (``CAGEAdamW(model, ...)``, or :meth:`from_model`): its groups are then
    :func:`cage.qat_param_groups` ``(model, weight_decay)``, the quantized linear weights
    carrying their ``QuantConfig``. Anonymous parameters (``model.parameters()``) carry
    none: such an optimizer is plain AdamW, and it says so with a ``UserWarning`` when
    ``cage_lambda > 0`` (pass ``cage_lambda=0`` for a deliberate AdamW).

    Every parameter gets ``torch.optim.AdamW``'s update (same state keys ``step``,
    ``exp_avg``, ``exp_avg_sq``). Parameters of a group whose ``"quant"`` is a
    :class:`QuantConfig` also get the correction ``lambda_t * (w - Q(w))``:

    - ``coupling="decoupled"`` (default): after the AdamW step,
      ``w <- w - lr * lambda_t * (w - Q(w))`` with ``Q`` of the updated weights;
    - ``coupling="coupled"``: ``g <- g + lambda_t * (w - Q(w))`` before the step.

    ``lambda_t`` follows ``schedule`` over ``total_steps`` steps: zero while
    ``t / total_steps <= silence_ratio``, then a linear ramp to ``cage_lambda``
    (``"linear_ramp"``) or ``cage_lambda`` at once (``"constant"``). With
    ``lambda_t = 0`` the update is exactly AdamW's. bf16/fp16 parameters keep fp32
    moments. Non-finite gradients (``check_finite``): by default a CPU gradient with
    NaN/Inf raises ``FloatingPointError`` before anything changes, and on a GPU the whole
    step is skipped on the device without a host sync (``found_inf``, ``skipped_steps``);
    ``"raise"``/``True`` raises everywhere (a sync on a GPU), ``"skip"`` skips everywhere,
    ``False`` checks nothing. A skipped step still advances the step count and with it
    the bias corrections and the lambda schedule.

    torch.optim.AdamW's options are accepted where they mean something here and recorded
    in every group: ``amsgrad=False``, ``maximize=False``, ``foreach=None/False``,
    ``capturable=False``, ``differentiable=False``, and ``fused``: ``True`` is the fused
    Triton step (``backend="triton"``), ``False`` the torch one, ``None`` leaves it to
    ``backend``. Their other values raise ``ValueError`` saying why.

    ``torch.compile(opt.step)``: the traced step is the torch formulation with the step
    count and lambda_t as tensors, whatever ``backend``/``fused`` say (they choose the eager
    implementation; the hand-written kernel takes host scalars). It is one graph without
    a break (``fullgraph=True`` works), compiled once for the first step and once for the
    others, as long as nothing is checked on the host: use ``check_finite="skip"`` or
    ``False`` on a CPU (the GPU default is already "skip"). It computes ``Q(w)`` every
    step, also while lambda_t is 0. A Python-float ``lr`` changed by a scheduler
    recompiles the step, as for torch's own optimizers.

    A state dict of ``torch.optim.AdamW`` loads (the CAGE options then come from the
    constructor); one it cannot continue (AMSGrad, maximize) is refused before anything
    changes.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        total_steps: int,
        cage_lambda: float = 10.0,
        silence_ratio: float = 0.8,
        schedule: str = "linear_ramp",
        coupling: str = "decoupled",
        backend: str = "auto",
        check_finite: bool | str | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ):
        _backend.check_backend_name(backend, "CAGEAdamW")
        if not any(check_finite is mode or (isinstance(check_finite, str) and check_finite == mode)
                   for mode in CHECK_MODES):
            raise ValueError(
                f"CAGEAdamW: check_finite must be None, True, False, 'raise' or 'skip', got {check_finite!r}"
            )
        torch_options = dict(amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                             differentiable=differentiable, fused=fused)
        _check_torch_options(torch_options, backend)
        self.backend = backend
        self.check_finite = check_finite
        self._reset_plans()
        if isinstance(params, nn.Module):
            params = qat_param_groups(params, weight_decay)
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
            weight_decay=weight_decay, total_steps=total_steps, cage_lambda=cage_lambda,
            silence_ratio=silence_ratio, schedule=schedule, coupling=coupling, quant=None, **torch_options,
        )
        super().__init__(params, defaults)
        if not any(g["quant"] is not None for g in self.param_groups) and any(
            g["cage_lambda"] > 0 for g in self.param_groups
        ):
            warnings.warn(
                "CAGEAdamW: no parameter group has 'quant', so CAGE corrects nothing and this is plain "
                "AdamW. Pass the prepared model itself: CAGEAdamW(model, ...) or CAGEAdamW.from_model(model, "
                "...) (with transformers' Trainer: optimizer_cls_and_kwargs=(CAGEAdamW, {'model': model, "
                "...})), or groups from cage.qat_param_groups(model, weight_decay); pass cage_lambda=0 "
                "for a deliberate AdamW",
                UserWarning, stacklevel=2,
            )

    # GradScaler hands the loss scale and the non-finite flag over as attributes
    # (``optimizer.grad_scale`` / ``optimizer.found_inf``) instead of checking on the host.
    _step_supports_amp_scaling = True

    def _reset_plans(self) -> None:
        """Forget every cached plan and host step count (they are rebuilt at the next step)."""
        self._plans: list = []  # per param group: ops.GroupPlan or None
        self._host_steps: dict = {}  # param -> step count, for params no plan holds
        self._host_steps_valid = True
        self._state_version = 0
        self._checked_groups: dict = {}  # group index -> (options, params) as last checked
        self._last_found_inf: torch.Tensor | None = None
        self._skipped_steps: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles defaults, state and param_groups only: keep the
        # options too; the plans hold addresses and are rebuilt.
        return {**super().__getstate__(), "backend": self.backend, "check_finite": self.check_finite}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._reset_plans()

    @classmethod
    def from_model(cls, model: nn.Module, **options) -> "CAGEAdamW":
        """``CAGEAdamW(model, **options)``: the groups of ``cage.qat_param_groups(model,
        weight_decay)``, so every quantized linear weight gets the CAGE correction."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"CAGEAdamW.from_model: model must be a torch.nn.Module, got {type(model).__name__}")
        return cls(model, **options)

    def add_param_group(self, param_group: dict) -> None:
        # Validated before it is kept: a group that fails leaves the optimizer unchanged.
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), (torch.Tensor, set, type(None))):
            param_group["params"] = list(param_group["params"])  # an iterator is read once
            _check_no_duplicates(param_group["params"])
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1], self.backend)
        except Exception:
            self.param_groups.pop()
            raise
        group = self.param_groups[-1]
        self._checked_groups[len(self.param_groups) - 1] = (group_options(group), tuple(group["params"]))
        quant = group["quant"]
        if quant is not None and quant.hadamard:
            # the matrices the torch formulation rotates with, built now: a traced step then
            # reads them as constants instead of building them inside its graph
            for p in group["params"]:
                naive.hadamard_matrix(quant.block_size, naive.compute_dtype(ops.moment_dtype(p)), p.device)

    def lambda_at(self, step, group: dict | None = None):
        g = group if group is not None else self.param_groups[0]
        return cage_lambda_at(step, g["total_steps"], g["cage_lambda"], g["silence_ratio"], g["schedule"])

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # step lives on the CPU like torch.optim.AdamW's: reading it never syncs a GPU
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in MOMENT_KEYS:
                state[key] = torch.zeros_like(p, dtype=ops.moment_dtype(p), memory_format=torch.preserve_format)
            self._host_steps[p] = 0
        return state

    def _check_mode(self, device: torch.device) -> str:
        """"raise", "skip" or "off" for gradients on ``device``."""
        mode = CHECK_MODES[self.check_finite]
        if mode == "auto":  # a host check is free on CPU; on a GPU it would sync
            return "raise" if device.type == "cpu" else "skip"
        return mode

    def _device_flag(self, grads: list, dtensors: bool) -> torch.Tensor | None:
        """The device flag over ``grads`` (None when there are none), the same on every
        process when they are FSDP2 shards, counted in ``skipped_steps``."""
        if not grads:
            return None
        flag = ops.nonfinite_flag(grads)
        if dtensors and torch.distributed.is_initialized():
            # each process sees only its shards: all of them skip, or none (queued, no sync)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag

    def _count_skip(self, flag: torch.Tensor) -> None:
        if self._skipped_steps is None or self._skipped_steps.device != flag.device:
            self._skipped_steps = torch.zeros((), dtype=torch.int64, device=flag.device)
        self._skipped_steps += (flag.reshape(-1)[0] != 0).to(torch.int64)

    @property
    def last_found_inf(self) -> torch.Tensor | None:
        """The non-finite flag the last step used (a one-element device tensor, nonzero: the
        step was skipped): the one passed in, or the one ``check_finite="skip"`` computed; None
        when the step checked nothing on the device. Read it when a sync does not matter."""
        return self._last_found_inf

    @property
    def skipped_steps(self) -> torch.Tensor | None:
        """Device counter of the steps skipped for a non-finite gradient (a ``found_inf``
        passed in, or ``check_finite="skip"``, the GPU default); read it when a sync does not
        matter. None before any."""
        return self._skipped_steps

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None):
        """One optimizer step.

        ``found_inf``: a one-element device tensor, nonzero when the step must be skipped
        (every parameter and moment then keeps its value; the step count still advances),
        for instance ``~torch.isfinite(clip_grad_norm_(...))``: then the gradients are not
        read again for a check. ``grad_scale``: a one-element device tensor the gradients are
        divided by. Both follow torch's fused-AdamW protocol, so ``torch.amp.GradScaler`` sets
        them as attributes (``optimizer.found_inf`` / ``optimizer.grad_scale``) and skips its
        own host check; neither is read on the host.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if torch.compiler.is_compiling():
            self._traced_step(found_inf, grad_scale)
        else:
            self._eager_step(found_inf, grad_scale)
        return loss

    def _valid_plan(self, index: int, group: dict):
        """``(plan, grads)``: the group's cached plan if it still holds (else None), and its
        gradients. Changes nothing."""
        plan = self._plans[index] if index < len(self._plans) else None
        if plan is not None:
            grads = ops.group_grads(group, plan.dtensors)
            try:
                if plan.holds(group, grads, self._state_version):
                    return plan, grads
            except RuntimeError:  # a gradient without storage (sparse): the rebuild says so
                pass
        dtensor = ops.dtensor_type()
        return None, ops.group_grads(group, dtensor is not None and any(isinstance(p, dtensor) for p in group["params"]))

    def _check_edited(self, index: int, group: dict) -> None:
        """A group edited in ``param_groups`` since it was checked is checked again: its
        options (a scheduler's lr every step: a few comparisons), and its parameters when
        they or the quantizer changed."""
        options = group_options(group)
        checked = self._checked_groups.get(index)
        same_params = checked is not None and len(checked[1]) == len(group["params"]) and all(
            map(operator.is_, checked[1], group["params"]))
        if same_params and options == checked[0]:
            return
        structural = not same_params or options[-2:] != checked[0][-2:]  # quant, fused
        try:
            _check_group(group, self.backend, params=structural)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (param group {index}, as edited since the last step)") from None
        self._checked_groups[index] = (group_options(group), tuple(group["params"]))

    def _check_host(self, index: int, group: dict, plan, grads: list) -> None:
        """The checks that raise, before anything changes: sparse and (check_finite "raise")
        non-finite gradients."""
        if plan is not None:
            plan.check_raise(grads, index)
            return
        for i, g in enumerate(grads):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("CAGEAdamW does not support sparse gradients")
            if self._check_mode(g.device) == "raise" and not ops.all_finite(g):
                raise FloatingPointError(
                    f"CAGEAdamW: the gradient of parameter {i} (shape {tuple(g.shape)}) in param "
                    f"group {index} contains NaN or Inf; the step was not taken"
                )

    def _build_plan(self, index: int, group: dict, grads: list):
        """A new plan of the group (None when no parameter has a gradient), kept for the next steps."""
        while len(self._plans) <= index:
            self._plans.append(None)
        old = self._plans[index]
        if old is not None:  # its step counts outlive it
            for i, step in old.host_steps().items():
                self._host_steps[old.group_params[i]] = step
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            self._plans[index] = None
            return None
        params = [group["params"][i] for i in present]
        states = [self._init_state(p) for p in params]
        # a CPU tensor read only when a traced step moved the counts (never in eager-only use)
        host_steps = [self._host_steps.get(p) for p in params]
        host_steps = [int(s["step"]) if h is None else h for h, s in zip(host_steps, states)]
        device = grads[present[0]].device
        plan = ops.GroupPlan(
            group, grads, states, host_steps,
            use_kernel=_backend.resolve(group_backend(group, self.backend), device, "CAGEAdamW") == "triton",
            check_modes=[self._check_mode(grads[i].device) for i in present], state_version=self._state_version,
        )
        for p in params:
            self._host_steps.pop(p, None)  # the plan holds them now
        self._plans[index] = plan
        return plan

    def _eager_step(self, found_inf, grad_scale) -> None:
        if not self._host_steps_valid:  # a traced step advanced the counts on its own
            self._host_steps.clear()
            self._plans.clear()
            self._host_steps_valid = True
        entries = [(index, group, *self._valid_plan(index, group)) for index, group in enumerate(self.param_groups)]
        for index, group, plan, grads in entries:  # an error here leaves everything unchanged
            self._check_edited(index, group)
            self._check_host(index, group, plan, grads)
        work = []
        for index, group, plan, grads in entries:
            if plan is None:
                plan = self._build_plan(index, group, grads)
            if plan is not None:
                work.append((plan, grads))
        if found_inf is None:
            found_inf = self._device_flag([g for plan, grads in work for g in plan.flagged_grads(grads)],
                                          any(plan.dtensors for plan, _ in work))
        if found_inf is not None:
            self._count_skip(found_inf)
        self._last_found_inf = found_inf
        for plan, grads in work:
            plan.step(grads, self.lambda_at, found_inf, grad_scale)

    def _traced_step(self, found_inf, grad_scale) -> None:
        # The torch formulation whatever the backend: the kernel launch takes the step count
        # and lambda_t as host scalars (a break and a recompile per step), while the compiler
        # fuses the torch formulation itself.
        checked = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("CAGEAdamW does not support sparse gradients")
                mode = self._check_mode(g.device)
                if mode == "raise" and not ops.all_finite(ops.local_tensor(g)):
                    raise FloatingPointError(
                        f"CAGEAdamW: the gradient of parameter {pi} (shape {tuple(p.shape)}) in param "
                        f"group {gi} contains NaN or Inf; the step was not taken"
                    )
                if mode == "skip" and found_inf is None:
                    checked.append(g)
        if found_inf is None:
            dtensor = ops.dtensor_type()
            found_inf = self._device_flag([ops.local_tensor(g) for g in checked],
                                          dtensor is not None and any(isinstance(g, dtensor) for g in checked))
        if found_inf is not None:
            self._count_skip(found_inf)
        self._last_found_inf = found_inf
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                state["step"] += 1  # a skipped step counts too (see _eager_step)
                # Rows are whole on every process (checked at construction), so FSDP2's sharded
                # parameters are updated shard by shard, in place, through local views.
                local_state = {k: ops.local_tensor(v) for k, v in state.items()}
                ops.reference_step(ops.local_tensor(p), ops.local_tensor(p.grad), local_state, local_state["step"],
                                   group, self.lambda_at(local_state["step"], group), found_inf, grad_scale)
        self._state_version += 1
        self._host_steps_valid = False

    # ---- state dicts: QuantConfig travels as a plain dict (loads with weights_only=True),
    # and fp32 moments of half-precision parameters are never cast down on load.

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for g in sd["param_groups"]:
            if isinstance(g.get("quant"), QuantConfig):
                g["quant"] = g["quant"].to_dict()
        return sd

    def _loadable_groups(self, saved_groups: list) -> list:
        """The saved groups as they will be loaded, every one validated against this
        optimizer's parameters; raises before anything of this optimizer changes."""
        sizes = [len(g["params"]) for g in self.param_groups]
        saved_sizes = [len(g["params"]) for g in saved_groups]
        if saved_sizes != sizes:
            raise ValueError(
                f"CAGEAdamW.load_state_dict: the state dict has parameter groups of sizes {saved_sizes}, "
                f"this optimizer {sizes}; build it with the same groups"
            )
        groups = copy.deepcopy(saved_groups)
        for index, (saved, current) in enumerate(zip(groups, self.param_groups)):
            for name in ("amsgrad", "maximize"):
                if saved.get(name, False):
                    raise ValueError(
                        f"CAGEAdamW.load_state_dict: param group {index} was saved with {name}=True, which "
                        f"CAGEAdamW cannot continue: {TORCH_OPTIONS[name][1]}"
                    )
            # torch.optim.Adam's L2 penalty is not AdamW's decoupled decay
            if saved.pop("decoupled_weight_decay", True) is False and saved.get("weight_decay", 0) != 0:
                raise ValueError(
                    f"CAGEAdamW.load_state_dict: param group {index} comes from torch.optim.Adam with "
                    "weight_decay (an L2 penalty in the gradient); CAGEAdamW decays decoupled, as AdamW"
                )
            for key in CAGE_KEYS:  # absent from a torch.optim.AdamW state dict
                saved.setdefault(key, current[key])
            for key in (*IMPLEMENTATION_KEYS, "amsgrad", "maximize"):
                saved[key] = current[key]
            candidate = {**saved, "params": current["params"]}
            try:
                _check_group(candidate, self.backend)
            except (TypeError, ValueError) as err:
                raise type(err)(f"CAGEAdamW.load_state_dict: param group {index}: {err}") from None
            saved["quant"], saved["betas"] = candidate["quant"], candidate["betas"]
        return groups

    def _check_saved_state(self, state_dict) -> None:
        """Every saved parameter state is one this optimizer can continue: raises, naming the
        parameter and the field, before anything changes."""
        def bad(message):
            return ValueError(f"CAGEAdamW.load_state_dict: {message}")

        groups, saved_state = state_dict["param_groups"], state_dict["state"]
        saved_ids = [pid for g in groups for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for pid, saved in saved_state.items():
            if pid not in by_id:
                raise bad(f"the state holds parameter id {pid!r}, which no saved param group lists "
                          f"(ids {saved_ids[:8]}{'...' if len(saved_ids) > 8 else ''})")
            if not isinstance(saved, dict):
                raise bad(f"the state of parameter {pid} must be a dict, got {type(saved).__name__}")
            if "max_exp_avg_sq" in saved:
                raise ValueError(
                    f"CAGEAdamW.load_state_dict: the state of parameter {pid} has max_exp_avg_sq (saved "
                    f"with amsgrad=True), which CAGEAdamW cannot continue: {TORCH_OPTIONS['amsgrad'][1]}"
                )
            p = by_id[pid]
            for key in MOMENT_KEYS:
                if key not in saved:
                    continue
                m = saved[key]
                if not isinstance(m, torch.Tensor) or not m.is_floating_point():
                    raise bad(f"{key} of parameter {pid} must be a floating-point tensor, got "
                              f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
                if tuple(m.shape) != tuple(p.shape):
                    raise bad(f"{key} of parameter {pid} has shape {tuple(m.shape)}, the parameter "
                              f"{tuple(p.shape)}; the state dict belongs to another model")
                local = ops.local_tensor(m)
                if local.numel() and not bool(torch.isfinite(local).all()):
                    raise bad(f"{key} of parameter {pid} holds NaN or Inf")
                if key == "exp_avg_sq" and local.numel() and bool((local < 0).any()):
                    raise bad(f"exp_avg_sq of parameter {pid} holds negative values (a second moment is >= 0)")
            if "step" in saved:
                step = saved["step"]
                value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                        math.isfinite(value) and value >= 0 and float(value).is_integer()):
                    raise bad(f"step of parameter {pid} must be a whole number >= 0, got {step!r}")

    def load_state_dict(self, state_dict: dict) -> None:
        def bad(message):
            return ValueError(f"CAGEAdamW.load_state_dict: {message}")

        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise bad("a state dict has the keys 'state' and 'param_groups' (from CAGEAdamW.state_dict() or "
                      f"torch.optim.AdamW.state_dict()), got {type(state_dict).__name__}"
                      + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else ""))
        groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) and "params" in g for g in groups):
            raise bad("'param_groups' must be a list of dicts with 'params'")
        if not isinstance(saved_state, dict):
            raise bad(f"'state' must be a dict of parameter id -> state, got {type(saved_state).__name__}")
        loadable = self._loadable_groups(groups)
        self._check_saved_state(state_dict)
        state_dict = {**state_dict, "param_groups": loadable}
        super().load_state_dict(state_dict)
        id_to_param = dict(
            zip(
                chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        for pid, saved in saved_state.items():
            p = id_to_param[pid]
            for key in MOMENT_KEYS:
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=ops.moment_dtype(p), copy=True)
            if "step" in saved:  # on the CPU whatever torch's rules for fused/capturable say
                self.state[p]["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).to("cpu", copy=True)
        # the plans point at the replaced tensors; the counts are read here, once, not in step()
        skipped = self._skipped_steps
        self._reset_plans()
        self._skipped_steps = skipped
        self._host_steps = {p: int(st["step"]) for p, st in self.state.items() if "step" in st}

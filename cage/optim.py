"""CAGE-AdamW: AdamW plus the curvature-aware quantization correction (SPEC 2)."""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from itertools import chain

import torch
from torch import nn
from torch.optim import Optimizer

from . import backend as _backend
from . import naive
from .config import QuantConfig
from .linear import qat_param_groups

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


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The process-local shard of a DTensor (FSDP2), sharing its storage; ``t`` otherwise."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def _check_whole_rows(p: torch.Tensor, index: int) -> None:
    """CAGE quantizes whole rows: a sharded parameter must be split between rows."""
    for placement in getattr(p, "placements", ()):
        dim = getattr(placement, "dim", None)
        if placement.is_shard() and dim is not None and dim % p.dim() == p.dim() - 1:
            raise ValueError(
                f"CAGEAdamW: quantized parameter {index} (shape {tuple(p.shape)}) is sharded along its "
                "last dimension, which splits the rows CAGE quantizes; shard along dim 0 "
                "(FSDP2's default) or keep it replicated"
            )


def _all_finite(g: torch.Tensor) -> bool:
    # A NaN or Inf anywhere makes the sum non-finite, and a sum is ~40x cheaper on a CPU
    # than isfinite().all(); only a non-finite sum (possibly an overflow) takes the exact test.
    return bool(torch.isfinite(g.sum(dtype=torch.float32))) or bool(torch.isfinite(g).all())


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


def reference_step(p, grad, state: dict, step, group: dict, cage_lambda, found_inf: torch.Tensor | None = None) -> None:
    """The torch reference step of one (local) tensor, in place. ``step`` and
    ``cage_lambda`` are numbers (eager: bit-identical to torch.optim.AdamW at lambda 0) or
    tensors (traced). With a device flag ``found_inf``, the update is computed aside and
    kept only where the flag is 0."""
    beta1, beta2 = group["betas"]
    targets = (p, state["exp_avg"], state["exp_avg_sq"])
    work = [t.clone() for t in targets] if found_inf is not None else targets
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


def moment_dtype(param: torch.Tensor) -> torch.dtype:
    """Moments stay fp32 for half-precision parameters."""
    return torch.promote_types(param.dtype, torch.float32)


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


def _check_group(group: dict, backend: str) -> None:
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
    for i, p in enumerate(group["params"]):
        if not p.is_floating_point():
            raise TypeError(f"CAGEAdamW: parameter {i} of a group is {p.dtype}; only floating-point parameters are optimized")
        if quant is not None:
            if p.dim() < 2:
                raise ValueError(
                    f"CAGEAdamW: parameter {i} of a quantized group has shape {tuple(p.shape)}; "
                    "quantized parameters are matrices quantized per row"
                )
            _check_whole_rows(p, i)
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
        self.found_inf: torch.Tensor | None = None  # the last step's device flag ("skip" mode)
        self._skipped_steps: torch.Tensor | None = None
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

    def lambda_at(self, step, group: dict | None = None):
        g = group if group is not None else self.param_groups[0]
        return cage_lambda_at(step, g["total_steps"], g["cage_lambda"], g["silence_ratio"], g["schedule"])

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # step lives on the CPU like torch.optim.AdamW's: reading it never syncs a GPU
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in MOMENT_KEYS:
                state[key] = torch.zeros_like(p, dtype=moment_dtype(p), memory_format=torch.preserve_format)
        return state

    def _check_mode(self, device: torch.device) -> str:
        """"raise", "skip" or "off" for gradients on ``device``."""
        mode = CHECK_MODES[self.check_finite]
        if mode == "auto":  # a host check is free on CPU; on a GPU it would sync
            return "raise" if device.type == "cpu" else "skip"
        return mode

    def _check_grads(self) -> None:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("CAGEAdamW does not support sparse gradients")
                if self._check_mode(g.device) == "raise" and not _all_finite(local_tensor(g)):
                    raise FloatingPointError(
                        f"CAGEAdamW: the gradient of parameter {pi} (shape {tuple(p.shape)}) in param "
                        f"group {gi} contains NaN or Inf; the step was not taken"
                    )

    def _found_inf(self) -> torch.Tensor | None:
        """A one-element fp32 device flag, 1.0 when any gradient checked in "skip" mode
        is non-finite (computed on the device: no host sync), or None when none is."""
        checked = [p.grad for g in self.param_groups for p in g["params"]
                   if p.grad is not None and self._check_mode(local_tensor(p.grad).device) == "skip"]
        if not checked:
            return None
        grads = [local_tensor(g) for g in checked]
        # one multi-tensor pass: an L1 norm is NaN or Inf exactly when an element is
        # (barring a finite sum above 3e38), and fp32 accumulation keeps fp16 sums finite
        norms = torch._foreach_norm(grads, 1, dtype=torch.float32)
        device = grads[0].device
        flag = (~torch.isfinite(torch.stack([n.to(device) for n in norms])).all()).to(torch.float32).reshape(1)
        dtensor = _dtensor_type()
        if dtensor is not None and any(isinstance(g, dtensor) for g in checked) and torch.distributed.is_initialized():
            # each process sees only its shards: all of them skip, or none (queued, no sync)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if self._skipped_steps is None or self._skipped_steps.device != device:
            self._skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped_steps += flag[0].to(torch.int64)
        self.found_inf = flag
        return flag

    @property
    def skipped_steps(self) -> torch.Tensor | None:
        """Device counter of the steps skipped for a non-finite gradient (``check_finite``
        "skip", the GPU default); read it when a sync does not matter. None before any."""
        return self._skipped_steps

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        found_inf = self._found_inf()
        traced = torch.compiler.is_compiling()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._init_state(p) for p in params]
            for s in states:
                # a skipped step counts too: the count, the bias corrections and lambda_t
                # advance exactly as if it had been taken (knowing better would need a sync)
                s["step"] += 1
            backend = group_backend(group, self.backend)
            # A traced step takes the torch formulation whatever the backend: the kernel launch
            # takes the step count and lambda_t as host scalars (a break and a recompile per
            # step), while the compiler fuses the torch formulation itself.
            if not traced and _backend.resolve(backend, local_tensor(params[0]).device, "CAGEAdamW") == "triton":
                from . import kernel_ops  # deferred: Triton is optional

                kernel_ops.adamw_cage_step_group(group, params, states, self.lambda_at, found_inf)
            else:
                # Rows are whole on every process (checked at construction), so FSDP2's
                # sharded parameters are updated shard by shard, in place, through local views.
                for p, state in zip(params, states):
                    local_state = {k: local_tensor(v) for k, v in state.items()}
                    # eager: a CPU tensor read on the host (no device sync); traced: kept a tensor
                    step = local_state["step"] if traced else int(local_state["step"].item())
                    reference_step(local_tensor(p), local_tensor(p.grad), local_state, step, group,
                                   self.lambda_at(step, group), found_inf)
        return loss

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

    def load_state_dict(self, state_dict: dict) -> None:
        saved_state = state_dict["state"]
        for pid, saved in saved_state.items():
            if "max_exp_avg_sq" in saved:
                raise ValueError(
                    f"CAGEAdamW.load_state_dict: the state of parameter {pid} has max_exp_avg_sq (saved "
                    f"with amsgrad=True), which CAGEAdamW cannot continue: {TORCH_OPTIONS['amsgrad'][1]}"
                )
        state_dict = {**state_dict, "param_groups": self._loadable_groups(state_dict["param_groups"])}
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
                    self.state[p][key] = saved[key].to(device=p.device, dtype=moment_dtype(p), copy=True)
            if "step" in saved:  # on the CPU whatever torch's rules for fused/capturable say
                self.state[p]["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).to("cpu", copy=True)

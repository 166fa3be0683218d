"""CAGE-AdamW: AdamW plus the curvature-aware quantization correction (SPEC 2)."""

from __future__ import annotations

import copy
from itertools import chain

import torch
from torch.optim import Optimizer

from . import backend as _backend
from . import naive
from .config import QuantConfig

SCHEDULES = ("linear_ramp", "constant")
COUPLINGS = ("decoupled", "coupled")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
# check_finite values: None = "auto" (raise for CPU gradients, skip on a GPU), True = "raise"
# (a host check: a sync on a GPU), "skip" (a device flag, no sync), False = "off".
CHECK_MODES = {None: "auto", True: "raise", "raise": "raise", "skip": "skip", False: "off"}


def cage_lambda_at(step: int, total_steps: int, cage_lambda: float, silence_ratio: float, schedule: str) -> float:
    """lambda_t for the step numbered ``step`` (counted from 1) of ``total_steps``."""
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


def reference_step(p, grad, state: dict, step: int, group: dict, cage_lambda: float,
                   found_inf: torch.Tensor | None = None) -> None:
    """The torch reference step of one (local) tensor, in place. With a device flag
    ``found_inf``, the update is computed aside and kept only where the flag is 0."""
    beta1, beta2 = group["betas"]
    targets = (p, state["exp_avg"], state["exp_avg_sq"])
    work = [t.clone() for t in targets] if found_inf is not None else targets
    naive.adamw_cage_step(
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


def _check_group(group: dict) -> None:
    def bad(name, accepted):
        return ValueError(f"CAGEAdamW: {name} must be {accepted}, got {group[name]!r}")

    if not 0.0 <= group["lr"]:
        raise bad("lr", ">= 0")
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise bad("betas", "a pair in [0, 1)")
    if not 0.0 <= group["eps"]:
        raise bad("eps", ">= 0")
    if not 0.0 <= group["weight_decay"]:
        raise bad("weight_decay", ">= 0")
    t = group["total_steps"]
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise bad("total_steps", "a positive integer (the number of optimizer steps of the run)")
    if not 0.0 <= group["cage_lambda"]:
        raise bad("cage_lambda", ">= 0")
    if not 0.0 <= group["silence_ratio"] < 1.0:
        raise bad("silence_ratio", "in [0, 1)")
    if group["schedule"] not in SCHEDULES:
        raise bad("schedule", f"one of {SCHEDULES}")
    if group["coupling"] not in COUPLINGS:
        raise bad("coupling", f"one of {COUPLINGS}")
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


class CAGEAdamW(Optimizer):
    """AdamW with the CAGE correction for parameter groups that carry ``"quant"``.

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
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        total_steps: int,
        cage_lambda: float = 10.0,
        silence_ratio: float = 0.8,
        schedule: str = "linear_ramp",
        coupling: str = "decoupled",
        backend: str = "auto",
        check_finite: bool | str | None = None,
    ):
        _backend.check_backend_name(backend, "CAGEAdamW")
        if not any(check_finite is mode or (isinstance(check_finite, str) and check_finite == mode)
                   for mode in CHECK_MODES):
            raise ValueError(
                f"CAGEAdamW: check_finite must be None, True, False, 'raise' or 'skip', got {check_finite!r}"
            )
        self.backend = backend
        self.check_finite = check_finite
        self.found_inf: torch.Tensor | None = None  # the last step's device flag ("skip" mode)
        self._skipped_steps: torch.Tensor | None = None
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, total_steps=total_steps,
            cage_lambda=cage_lambda, silence_ratio=silence_ratio, schedule=schedule,
            coupling=coupling, quant=None,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def lambda_at(self, step: int, group: dict | None = None) -> float:
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
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._init_state(p) for p in params]
            for s in states:
                # a skipped step counts too: the count, the bias corrections and lambda_t
                # advance exactly as if it had been taken (knowing better would need a sync)
                s["step"] += 1
            if _backend.resolve(self.backend, local_tensor(params[0]).device, "CAGEAdamW") == "triton":
                from . import kernel_ops  # deferred: Triton is optional

                kernel_ops.adamw_cage_step_group(group, params, states, self.lambda_at, found_inf)
            else:
                # Rows are whole on every process (checked at construction), so FSDP2's
                # sharded parameters are updated shard by shard, in place, through local views.
                for p, state in zip(params, states):
                    local_state = {k: local_tensor(v) for k, v in state.items()}
                    step = int(local_state["step"].item())  # a CPU tensor: no device sync
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

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        state_dict["param_groups"] = copy.deepcopy(state_dict["param_groups"])
        for g in state_dict["param_groups"]:
            if isinstance(g.get("quant"), dict):
                g["quant"] = QuantConfig.from_dict(g["quant"])
        saved_state = state_dict["state"]
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
        for group in self.param_groups:
            _check_group(group)

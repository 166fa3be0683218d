"""The QuEST fake quantizer (SPEC 1): its two backends, its custom ops and its autograd function.

Both backends keep one contract (``TORCH`` and ``TRITON``, chosen by :func:`get_ops`):

- ``quantize(x, config, rotate_back) -> (q, mask_state)``
- ``quantize_codes(x, config) -> (codes, half_step, mask_state)`` (int8 rotated-domain codes)
- ``masked_grad(grad, mask_state, config, grad_is_rotated) -> grad_x``
- ``mask_to_bool(mask_state, shape) -> bool tensor``

Only the mask's storage differs: bool in the torch reference (``cage.naive``), bit-packed
uint8 in the kernels (``cage_kernels.fake_quant``; empty for ``grad_mask="none"``).

The Triton backend calls the launchers directly in eager mode: a ``torch.library`` custom-op
call costs more host time (~10-40 us) than the kernel of a mid-sized activation. Under
``torch.compile`` it goes through the custom ops ``cage::fake_quant_fwd`` /
``cage::fake_quant_bwd``, opaque nodes with shape-only fake implementations.
"""

from __future__ import annotations

import math
import types

import torch

from .. import backend as _backend
from .. import naive
from ..config import RMS_EPS, QuantConfig


def mask_mode_and_radius(config: QuantConfig) -> tuple[int, float]:
    """The kernels' (mask mode, radius in units of s) for a config, as naive.quantize_rotated."""
    kernels = _backend.kernels()
    if config.grad_mask == "none":
        return kernels.MASK_NONE, 0.0
    if config.grad_mask == "clip":
        return kernels.MASK_CLIP, 1.0
    if config.bits == 1:  # QuEST's 1-bit trust region is a widened clip
        return kernels.MASK_CLIP, config.one_bit_widening
    return kernels.MASK_TRUST, config.trust_halfwidth


class _ReferenceForward:
    """The forward of what the kernels do not take (fp64, Hadamard blocks above 128): the
    reference, its mask packed as the kernels pack it."""

    def __init__(self, config: QuantConfig, rotate_back: bool):
        self.config, self.rotate_back = config, rotate_back

    def __call__(self, x):
        q, mask = naive.quantize(x, self.config, self.rotate_back)
        if self.config.grad_mask == "none":
            return q.contiguous(), x.new_empty((0,), dtype=torch.uint8)
        return q.contiguous(), _backend.kernels().pack_mask(mask)


class _ReferenceBackward:
    def __init__(self, config: QuantConfig, grad_is_rotated: bool):
        self.config, self.grad_is_rotated = config, grad_is_rotated

    def __call__(self, grad, mask_state):
        mask = _backend.kernels().mask_to_bool(mask_state, grad.shape)
        return naive.masked_grad(grad, mask, self.config, self.grad_is_rotated).contiguous()


# Launch plans by (shape, dtype, device, config, rotation flag, the tiling's chunk cap): a
# training step quantizes the same few shapes every step, and a plan lookup is what the host
# pays for each then (the kernels' own validation and planning run once per key).
_FORWARD_PLANS: dict = {}
_BACKWARD_PLANS: dict = {}
_PLANS_LIMIT = 4096


def _remember(plans: dict, key, plan):
    if len(plans) >= _PLANS_LIMIT:
        plans.clear()
    plans[key] = plan
    return plan


def _kernel_forward(x: torch.Tensor, config: QuantConfig, rotate_back: bool):
    kernels = _backend.kernels()
    key = (x.shape, x.dtype, x.device, config, rotate_back, kernels.tiling.ROW_CHUNK_MAX)
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        if kernels.supports(x.dtype, config.hadamard, config.block_size):
            mode, radius = mask_mode_and_radius(config)
            plan = kernels.plan_forward(
                x.shape, x.dtype, x.device, levels=config.levels, alpha=config.alpha, hadamard=config.hadamard,
                block_size=config.block_size, mask_mode=mode, mask_radius=radius, rotate_back=rotate_back,
                rms_eps=RMS_EPS, integer_grid=config.grid == "integer",
            )
        else:
            plan = _ReferenceForward(config, rotate_back)
        _remember(_FORWARD_PLANS, key, plan)
    return plan(x)


_CODE_PLANS: dict = {}


def _kernel_codes(x: torch.Tensor, config: QuantConfig):
    kernels = _backend.kernels()
    key = (x.shape, x.dtype, x.device, config, kernels.tiling.ROW_CHUNK_MAX)
    plan = _CODE_PLANS.get(key)
    if plan is None:
        mode, radius = mask_mode_and_radius(config)
        plan = _remember(_CODE_PLANS, key, kernels.plan_forward(
            x.shape, x.dtype, x.device, levels=config.levels, alpha=config.alpha, hadamard=config.hadamard,
            block_size=config.block_size, mask_mode=mode, mask_radius=radius, rotate_back=False, rms_eps=RMS_EPS,
            emit_codes=True, integer_grid=config.grid == "integer",
        ))
    return plan(x)


def _kernel_backward(grad: torch.Tensor, mask_state: torch.Tensor, config: QuantConfig, grad_is_rotated: bool):
    kernels = _backend.kernels()
    key = (grad.shape, grad.dtype, grad.device, config, grad_is_rotated, kernels.tiling.ROW_CHUNK_MAX)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        if kernels.supports(grad.dtype, config.hadamard, config.block_size):
            plan = kernels.plan_backward(
                grad.shape, grad.dtype, grad.device, hadamard=config.hadamard, block_size=config.block_size,
                apply_mask=config.grad_mask != "none", grad_is_rotated=grad_is_rotated,
            )
        else:
            plan = _ReferenceBackward(config, grad_is_rotated)
        _remember(_BACKWARD_PLANS, key, plan)
    return plan(grad, mask_state)


@torch.library.custom_op("cage::fake_quant_fwd", mutates_args=())
def fake_quant_fwd_op(
    x: torch.Tensor, bits: int, hadamard: bool, block_size: int, grad_mask: str, rotate_back: bool,
    grid: str = "centered",
) -> tuple[torch.Tensor, torch.Tensor]:
    config = QuantConfig(bits=bits, hadamard=hadamard, block_size=block_size, grad_mask=grad_mask, grid=grid)
    return _kernel_forward(x, config, rotate_back)


@fake_quant_fwd_op.register_fake
def _(x, bits, hadamard, block_size, grad_mask, rotate_back, grid="centered"):
    q = x.new_empty(x.shape)
    if grad_mask == "none":
        return q, x.new_empty(0, dtype=torch.uint8)
    n_cols = x.shape[-1] if x.dim() else 1
    n_rows = math.prod(x.shape[:-1]) if x.dim() else 1
    return q, x.new_empty((n_rows, (n_cols + 7) // 8), dtype=torch.uint8)


@torch.library.custom_op("cage::fake_quant_bwd", mutates_args=())
def fake_quant_bwd_op(
    grad: torch.Tensor, mask_state: torch.Tensor, hadamard: bool, block_size: int, grad_mask: str,
    grad_is_rotated: bool,
) -> torch.Tensor:
    # bits do not enter the backward; any valid value rebuilds the config
    config = QuantConfig(bits=4, hadamard=hadamard, block_size=block_size, grad_mask=grad_mask)
    return _kernel_backward(grad, mask_state, config, grad_is_rotated)


@fake_quant_bwd_op.register_fake
def _(grad, mask_state, hadamard, block_size, grad_mask, grad_is_rotated):
    return grad.new_empty(grad.shape)


@torch.library.custom_op("cage::fake_quant_codes", mutates_args=())
def fake_quant_codes_op(
    x: torch.Tensor, bits: int, hadamard: bool, block_size: int, grad_mask: str, grid: str = "centered"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = QuantConfig(bits=bits, hadamard=hadamard, block_size=block_size, grad_mask=grad_mask, grid=grid)
    return _kernel_codes(x, config)


@fake_quant_codes_op.register_fake
def _(x, bits, hadamard, block_size, grad_mask, grid="centered"):
    n_cols = x.shape[-1]
    n_rows = math.prod(x.shape[:-1])
    mask_shape = (0,) if grad_mask == "none" else (n_rows, (n_cols + 7) // 8)
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((n_rows,), dtype=torch.float32),
            x.new_empty(mask_shape, dtype=torch.uint8))


def _triton_quantize_codes(x: torch.Tensor, config: QuantConfig):
    if torch.compiler.is_compiling():
        return fake_quant_codes_op(x, config.bits, config.hadamard, config.block_size, config.grad_mask, config.grid)
    return _kernel_codes(x, config)


def _torch_quantize_codes(x: torch.Tensor, config: QuantConfig):
    codes, half_step, mask = naive.quantize_codes(x, config)
    return codes, half_step.reshape(-1), mask


def _triton_quantize(x: torch.Tensor, config: QuantConfig, rotate_back: bool = True):
    if torch.compiler.is_compiling():
        return fake_quant_fwd_op(x, config.bits, config.hadamard, config.block_size, config.grad_mask, rotate_back,
                                 config.grid)
    return _kernel_forward(x, config, rotate_back)


def _triton_masked_grad(grad: torch.Tensor, mask_state: torch.Tensor, config: QuantConfig,
                        grad_is_rotated: bool = False):
    if torch.compiler.is_compiling():
        return fake_quant_bwd_op(grad, mask_state, config.hadamard, config.block_size, config.grad_mask,
                                 grad_is_rotated)
    return _kernel_backward(grad, mask_state, config, grad_is_rotated)


# quantize_codes(x, config) -> (int8 codes, fp32 d/2 per row (flat), mask_state): the
# rotated-domain quantization as integers (2-D x of rows, up to 7 bits; see naive.quantize_codes)
TORCH = types.SimpleNamespace(
    quantize=naive.quantize,
    quantize_codes=_torch_quantize_codes,
    masked_grad=naive.masked_grad,
    mask_to_bool=lambda mask_state, shape: mask_state,
)
TRITON = types.SimpleNamespace(
    quantize=_triton_quantize,
    quantize_codes=_triton_quantize_codes,
    masked_grad=_triton_masked_grad,
    mask_to_bool=lambda mask_state, shape: _backend.kernels().mask_to_bool(mask_state, shape),
)


def get_ops(backend: str, device: torch.device, owner: str = "cage"):
    """The quantize / masked_grad / mask_to_bool trio of the chosen backend."""
    return TRITON if _backend.resolve(backend, device, owner) == "triton" else TORCH


def check_quantizable(x, config, name: str = "x") -> None:
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a cage.QuantConfig, got {type(config).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
            f"got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the row), got a scalar")
    config.check_row_length(x.shape[-1])


class FakeQuantize(torch.autograd.Function):
    """Forward ``Q(x)`` (or the rotated-domain ``q(x_h)``), backward ``H (mask * (H g))``."""

    @staticmethod
    def forward(ctx, x, config, ops, rotate_back):
        q, mask_state = ops.quantize(x, config, rotate_back)
        ctx.save_for_backward(mask_state)
        ctx.config, ctx.ops, ctx.rotate_back = config, ops, rotate_back
        return q

    @staticmethod
    def backward(ctx, grad):
        (mask_state,) = ctx.saved_tensors
        grad_x = ctx.ops.masked_grad(grad.contiguous(), mask_state, ctx.config, not ctx.rotate_back)
        return grad_x, None, None, None


def fake_quantize(x: torch.Tensor, config: QuantConfig, backend: str = "auto", rotate_back: bool = True,
                  owner: str = "fake_quantize") -> torch.Tensor:
    """:func:`cage.fake_quantize` after its checks (see there)."""
    ops = get_ops(backend, x.device, owner)
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # The quantizer's math is fp32 by contract; autocast would lower the rotation to bf16.
        with torch.autocast(device_type, enabled=False):
            return FakeQuantize.apply(x, config, ops, rotate_back)
    return FakeQuantize.apply(x, config, ops, rotate_back)

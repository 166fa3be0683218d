"""Public fake-quantization functions: input checks, backend dispatch, autograd."""

from __future__ import annotations

import types

import torch

from . import backend as _backend
from . import naive
from .config import QuantConfig

_TORCH_OPS = types.SimpleNamespace(
    quantize=naive.quantize,
    masked_grad=naive.masked_grad,
    mask_to_bool=lambda mask_state, shape: mask_state,
)


def get_ops(backend: str, device: torch.device, owner: str = "cage"):
    """The quantize / masked_grad / mask_to_bool trio of the chosen backend.

    Both trios share one contract: ``quantize(x, config, rotate_back) -> (q, mask_state)``,
    ``masked_grad(grad, mask_state, config, grad_is_rotated) -> grad_x`` and
    ``mask_to_bool(mask_state, shape)``; only the mask's storage differs (bool here,
    bit-packed in the kernels).
    """
    if _backend.resolve(backend, device, owner) == "torch":
        return _TORCH_OPS
    from . import kernel_ops  # deferred: Triton is optional

    return kernel_ops


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


@torch.no_grad()
def quantize_dequantize(x: torch.Tensor, config: QuantConfig, *, backend: str = "auto"):
    """``(Q(x), mask)``: ``Q(x)`` in the input space with ``x``'s shape and dtype, and the
    bool straight-through mask (rotated domain) of ``config.grad_mask``. No autograd."""
    check_quantizable(x, config)
    ops = get_ops(backend, x.device, "quantize_dequantize")
    q, mask_state = ops.quantize(x, config, True)
    return q, ops.mask_to_bool(mask_state, x.shape)


class _FakeQuantize(torch.autograd.Function):
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


def fake_quantize(
    x: torch.Tensor, config: QuantConfig, *, backend: str = "auto", rotate_back: bool = True
) -> torch.Tensor:
    """Differentiable fake quantization: forward ``Q(x)``, backward the masked
    straight-through gradient ``H (mask * (H g))`` of SPEC 1.

    ``rotate_back=False`` returns the rotated-domain ``q(x_h)`` instead (and expects the
    gradient in that domain): two such outputs multiply to exactly ``Q(x) Q(W)^T``.
    """
    check_quantizable(x, config)
    ops = get_ops(backend, x.device, "fake_quantize")
    # The quantizer's math is fp32 by contract; autocast would lower the rotation to bf16.
    with torch.autocast(x.device.type, enabled=False):
        return _FakeQuantize.apply(x, config, ops, rotate_back)

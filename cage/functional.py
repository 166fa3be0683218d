"""Public fake-quantization functions: input checks, then the op (``cage.ops.fake_quant``)."""

from __future__ import annotations

import torch

from .config import QuantConfig
from .ops import fake_quant as _op


@torch.no_grad()
def quantize_dequantize(x: torch.Tensor, config: QuantConfig, *, backend: str = "auto"):
    """``(Q(x), mask)``: ``Q(x)`` in the input space with ``x``'s shape and dtype, and the
    bool straight-through mask (rotated domain) of ``config.grad_mask``. No autograd."""
    _op.check_quantizable(x, config)
    ops = _op.get_ops(backend, x.device, "quantize_dequantize")
    q, mask_state = ops.quantize(x, config, True)
    return q, ops.mask_to_bool(mask_state, x.shape)


def fake_quantize(
    x: torch.Tensor, config: QuantConfig, *, backend: str = "auto", rotate_back: bool = True
) -> torch.Tensor:
    """Differentiable fake quantization: forward ``Q(x)``, backward the masked
    straight-through gradient ``H (mask * (H g))`` of SPEC 1.

    ``rotate_back=False`` returns the rotated-domain ``q(x_h)`` instead (and expects the
    gradient in that domain): two such outputs multiply to exactly ``Q(x) Q(W)^T``.
    """
    _op.check_quantizable(x, config)
    return _op.fake_quantize(x, config, backend, rotate_back)

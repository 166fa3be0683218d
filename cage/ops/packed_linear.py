"""The converted layer's matmul: ``x @ W^T`` with the weight read as packed grid codes
(``cage_kernels.packed_matmul``), for :class:`cage.convert.QuantizedLinear`."""

from __future__ import annotations

import torch

from .. import backend as _backend
from .. import naive
from ..config import QuantConfig


def packed_linear_takes(x_dtype: torch.dtype, scale_dtype: torch.dtype) -> bool:
    """Whether :func:`packed_linear` runs for these dtypes (fp64 layers keep the reference)."""
    return _backend.kernels().packed_matmul_supports(x_dtype) and scale_dtype == torch.float32


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, step: torch.Tensor, code_offset: int, config: QuantConfig,
    bias: torch.Tensor | None, rotate_back: bool,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a weight stored as packed rotated-domain codes (``packed``,
    ``step`` [N] and ``code_offset`` as ``cage.convert.dequantize_codes`` reads them).

    ``rotate_back=False``: x is already in the weight's rotated domain (it shares the block
    Hadamard), so ``x q^T`` is the product. ``rotate_back=True`` with a rotation: the weight is
    ``Q(w) = q H`` per block, and ``x (q H)^T = (x H^T) q^T = (x H) q^T`` (H symmetric), so x is
    rotated instead (``naive.block_rotate`` multiplies blocks by H from the right, as the
    quantizer does). That keeps the weight read at its packed size, which falling back to the
    rebuilt weight would not; the rotation costs ``M K B`` flops against the product's ``M K N``.
    Rotated in fp32 and rounded back to x's dtype: one more rounding of x (relative 2**-9 in
    bf16) than the torch path, which instead rounds the rebuilt weight to its dtype.
    """
    n_cols = x.shape[-1]
    x_rows = x.reshape(-1, n_cols)
    if config.hadamard and rotate_back:
        with torch.autocast(x.device.type, enabled=False):  # the rotation is fp32 by contract
            x_rows = naive.block_rotate(x_rows.to(naive.compute_dtype(x.dtype)), config.block_size).to(x.dtype)
    y = _backend.kernels().packed_matmul(x_rows.contiguous(), packed, step, code_offset, config.bits, bias,
                                         level_offset=config.level_offset)
    return y.reshape(*x.shape[:-1], y.shape[-1])

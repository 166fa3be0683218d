"""The "triton" backend: QuantConfig and optimizer groups turned into calls of the
``cage_kernels`` launchers, with the fallbacks to ``cage.naive`` for what the kernels
do not take (fp64, Hadamard blocks above 128, odd layouts) and DTensor handling.

It exposes the backend contract of :func:`cage.functional.get_ops`:

- ``quantize(x, config, rotate_back) -> (q, mask_state)`` (mask_state: bit-packed uint8)
- ``masked_grad(grad, mask_state, config, grad_is_rotated) -> grad_x``
- ``mask_to_bool(mask_state, shape) -> bool tensor``

and ``adamw_cage_step_group`` for :class:`cage.CAGEAdamW`, and ``packed_linear`` for
:class:`cage.convert.QuantizedLinear` (the matmul with the weight read as packed codes). Both quantizer ops are
``torch.library`` custom ops, so ``torch.compile`` sees opaque nodes with shape-only
fake implementations.
"""

from __future__ import annotations

import collections
import math

import torch

import cage_kernels
from cage_kernels import MASK_CLIP, MASK_NONE, MASK_TRUST, mask_to_bool, pack_mask

from . import naive
from .config import RMS_EPS, QuantConfig
from .optim import local_tensor, reference_step

__all__ = ["adamw_cage_step_group", "mask_mode_and_radius", "mask_to_bool", "masked_grad", "quantize"]


def mask_mode_and_radius(config: QuantConfig) -> tuple[int, float]:
    """The kernels' (mask mode, radius in units of s) for a config, as naive.quantize_rotated."""
    if config.grad_mask == "none":
        return MASK_NONE, 0.0
    if config.grad_mask == "clip":
        return MASK_CLIP, 1.0
    if config.bits == 1:  # QuEST's 1-bit trust region is a widened clip
        return MASK_CLIP, config.one_bit_widening
    return MASK_TRUST, config.trust_halfwidth


def _forward(x: torch.Tensor, config: QuantConfig, rotate_back: bool):
    mode, radius = mask_mode_and_radius(config)
    if not cage_kernels.supports(x.dtype, config.hadamard, config.block_size):
        q, mask = naive.quantize(x, config, rotate_back)
        empty = torch.empty(0, dtype=torch.uint8, device=x.device)
        return q.contiguous(), (empty if mode == MASK_NONE else pack_mask(mask))
    return cage_kernels.fake_quant_forward(
        x, levels=config.levels, alpha=config.alpha, hadamard=config.hadamard, block_size=config.block_size,
        mask_mode=mode, mask_radius=radius, rotate_back=rotate_back, rms_eps=RMS_EPS,
    )


@torch.library.custom_op("cage::fake_quant_fwd", mutates_args=())
def fake_quant_fwd_op(
    x: torch.Tensor, bits: int, hadamard: bool, block_size: int, grad_mask: str, rotate_back: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    config = QuantConfig(bits=bits, hadamard=hadamard, block_size=block_size, grad_mask=grad_mask)
    return _forward(x, config, rotate_back)


@fake_quant_fwd_op.register_fake
def _(x, bits, hadamard, block_size, grad_mask, rotate_back):
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
    apply_mask = grad_mask != "none"
    if not cage_kernels.supports(grad.dtype, hadamard, block_size):
        # bits do not enter the backward; any valid value rebuilds the config
        config = QuantConfig(bits=4, hadamard=hadamard, block_size=block_size, grad_mask=grad_mask)
        mask = mask_to_bool(mask_state, grad.shape)
        return naive.masked_grad(grad, mask, config, grad_is_rotated).contiguous()
    return cage_kernels.fake_quant_backward(
        grad, mask_state, hadamard=hadamard, block_size=block_size, apply_mask=apply_mask,
        grad_is_rotated=grad_is_rotated,
    )


@fake_quant_bwd_op.register_fake
def _(grad, mask_state, hadamard, block_size, grad_mask, grad_is_rotated):
    return grad.new_empty(grad.shape)


def quantize(x: torch.Tensor, config: QuantConfig, rotate_back: bool = True):
    """``(Q(x), mask_state)``: the backend contract of cage.functional."""
    return fake_quant_fwd_op(x, config.bits, config.hadamard, config.block_size, config.grad_mask, rotate_back)


def masked_grad(grad: torch.Tensor, mask_state: torch.Tensor, config: QuantConfig, grad_is_rotated: bool = False):
    """The input gradient, in grad's dtype: the backend contract of cage.functional."""
    return fake_quant_bwd_op(grad, mask_state, config.hadamard, config.block_size, config.grad_mask, grad_is_rotated)


# ---- the converted layer's matmul --------------------------------------------------------


def packed_linear_takes(x_dtype: torch.dtype, scale_dtype: torch.dtype) -> bool:
    """Whether :func:`packed_linear` runs for these dtypes (fp64 layers keep the reference)."""
    return cage_kernels.packed_matmul_supports(x_dtype) and scale_dtype == torch.float32


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
    y = cage_kernels.packed_matmul(x_rows.contiguous(), packed, step, code_offset, config.bits, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ---- the optimizer ----------------------------------------------------------------------


def adamw_cage_step_group(group: dict, params, states, lambda_at, found_inf: torch.Tensor | None = None) -> None:
    """One CAGE-AdamW step of every param (with a gradient) of ``group``, in place.

    Same math as ``cage.naive.adamw_cage_step`` per parameter. ``states[i]["step"]`` is
    the CPU step counter, already incremented; ``lambda_at(step, group)`` gives lambda_t.
    ``found_inf``: a device flag; nonzero leaves every parameter and moment unchanged.
    """
    beta1, beta2 = group["betas"]
    quant = group["quant"]
    buckets: dict[tuple, list] = collections.defaultdict(list)
    for param, full_state in zip(params, states):
        # FSDP2 shards (DTensor) are stepped through their local views; rows are whole
        # on every process (CAGEAdamW checks the sharding)
        p, grad = local_tensor(param), local_tensor(param.grad)
        state = {key: local_tensor(value) for key, value in full_state.items()}
        step = int(state["step"].item())  # a CPU tensor: no device sync
        lam = float(lambda_at(step, group))
        cage = quant is not None and lam != 0
        kernel_ok = cage_kernels.kernel_can_step(p, grad, state["exp_avg"], state["exp_avg_sq"]) and (
            not cage or cage_kernels.supports(p.dtype, quant.hadamard, quant.block_size)
        )
        if not kernel_ok:
            reference_step(p, grad, state, step, group, lam, found_inf)
            continue
        buckets[(step, lam if cage else 0.0)].append((p, grad, state["exp_avg"], state["exp_avg_sq"]))
    for (step, lam), items in buckets.items():
        cage = quant is not None and lam != 0
        p, g, m, v = zip(*items)
        cage_kernels.adamw_cage_step(
            p, g, m, v, step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), cage_lambda=lam, coupled=group["coupling"] == "coupled",
            levels=quant.levels if cage else None, alpha=quant.alpha if cage else None,
            hadamard=quant.hadamard if cage else False, block_size=quant.block_size if cage else 128,
            rms_eps=RMS_EPS, found_inf=found_inf,
        )

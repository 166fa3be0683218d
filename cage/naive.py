"""Readable pure-torch reference of every kernel.

This is the CPU fallback and the oracle the Triton kernels are tested against. It
follows SPEC sections 1 and 2 line by line; speed is not its job.
"""

from __future__ import annotations

import math

import torch

from .config import RMS_EPS, QuantConfig


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The orthonormal ``n x n`` Sylvester Hadamard matrix in float64 on the CPU."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:  # Sylvester: H_2k = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


# One copy per (size, dtype, device): a host-to-device copy on every rotation would be a
# synchronizing transfer per call on CUDA. A plain dict, not functools.lru_cache: Dynamo
# traces through lru_cache (building the matrix inside every compiled graph), while an entry
# of a module dict is a constant input of the graph. CAGEAdamW fills the entries its traced
# step needs before any trace.
_HADAMARD: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal, symmetric Sylvester Hadamard matrix of size ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: n must be a power of two, got {n}")
    key = (n, dtype, torch.device(device) if device is not None else torch.device("cpu"))
    h = _HADAMARD.get(key)
    if h is None:
        h = sylvester_hadamard(n).to(dtype=dtype, device=key[2])
        _HADAMARD[key] = h
    return h


def block_rotate(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Multiply every ``block_size`` chunk of the last dimension by ``H``.

    ``H`` is orthonormal and symmetric, so this map is its own inverse.
    """
    h = hadamard_matrix(block_size, x.dtype, x.device)
    n = x.shape[-1]
    return (x.reshape(*x.shape[:-1], n // block_size, block_size) @ h).reshape(x.shape)


def power_of_two_scale(x_h: torch.Tensor) -> torch.Tensor:
    """``2**-e`` per row ``[..., 1]`` with ``2**(e-1) <= max|x| < 2**e`` (``torch.frexp``), and 1 for
    a row whose largest magnitude is zero, subnormal, inf or NaN. Multiplying by it is exact."""
    amax = x_h.abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(amax)
    normal = torch.isfinite(amax) & (amax >= torch.finfo(x_h.dtype).tiny)
    return torch.where(normal, torch.ldexp(torch.ones_like(amax), -exponent), torch.ones_like(amax))


def row_scale(x_h: torch.Tensor, config: QuantConfig, cap: float | None = None) -> torch.Tensor:
    """``s = alpha(b) * rms(row)``, shape ``[..., 1]``.

    The mean square is taken of the row scaled by a power of two (:func:`power_of_two_scale`),
    so squares neither overflow (a 1.85e19 element in a 128-wide fp32 row did) nor underflow,
    and the result is scaled back exactly: for every row whose largest element is in the
    dtype's normal range this is bit for bit ``alpha * sqrt(mean(x**2))``, and ``s(c x) = c s(x)``
    exactly for powers of two ``c`` (to rounding for others). ``RMS_EPS`` is added in the
    scaled domain, where the mean square is at least ``1 / (4 n)`` for any nonzero row: it
    only keeps an all-zero row off a zero scale. ``cap`` (the largest finite value of an
    output dtype, fp16's 65504) bounds s so that the outermost levels stay finite there."""
    f = power_of_two_scale(x_h)
    s = config.alpha * torch.sqrt((x_h * f).square().mean(dim=-1, keepdim=True) + RMS_EPS) / f
    return s if cap is None else torch.clamp(s, max=cap)


def scale_cap(dtype: torch.dtype) -> float | None:
    """The largest clip point whose levels an output of ``dtype`` holds: fp16's range is the one
    a row's ``alpha * rms`` can leave while its elements are finite."""
    return torch.finfo(dtype).max if dtype == torch.float16 else None


def grid_level(x_h: torch.Tensor, s: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(level, step)``: the grid level of each element (ties to even) and the step ``d``;
    the quantized value is ``level * step``.

    Centered grid: ``d = 2 s / (L - 1)``, ``level = k - 1/2`` for ``x_h`` clipped to ``[-s, s]``.
    Integer grid: ``d = 2 s / L``, ``level = k`` in ``-L/2 .. L/2 - 1`` (rounded, then clamped)."""
    step = 2 * s / config.step_divisor
    if config.grid == "integer":
        half = config.levels // 2
        return torch.clamp(torch.round(x_h / step), -half, half - 1), step
    return torch.round(torch.minimum(torch.maximum(x_h, -s), s) / step + 0.5) - 0.5, step


def round_to_grid(x_h: torch.Tensor, s: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """The nearest level of ``config``'s grid (SPEC 1), ties to even."""
    level, step = grid_level(x_h, s, config)
    return level * step


def quantize_rotated(x_h: torch.Tensor, config: QuantConfig, cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``x_h`` (already rotated, full precision) to the grid; return ``(q_h, mask)``.

    The mask is the straight-through mask of ``config.grad_mask``, in the rotated domain.
    """
    s = row_scale(x_h, config, cap)
    q_h = round_to_grid(x_h, s, config)
    if config.grad_mask == "none":
        mask = torch.ones_like(x_h, dtype=torch.bool)
    elif config.grad_mask == "clip":
        mask = x_h.abs() <= s
    elif config.bits == 1:
        # half a step at b=1 is the whole range s; QuEST widens the clip range instead
        mask = x_h.abs() <= config.one_bit_widening * s
    else:
        mask = (q_h - x_h).abs() <= s * config.trust_halfwidth
    return q_h, mask


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math runs in fp32 (fp64 inputs keep fp64)."""
    return torch.promote_types(dtype, torch.float32)


def quantize(x: torch.Tensor, config: QuantConfig, rotate_back: bool = True):
    """Fake-quantize ``x`` along its last dimension; return ``(q, mask)``.

    ``q`` has ``x``'s dtype; it is ``Q(x)`` in the input space, or the rotated-domain
    ``q(x_h)`` when ``rotate_back`` is False (for the identity ``Q(x) Q(W)^T = q(x_h) q(W_h)^T``).
    """
    x_h = x.to(compute_dtype(x.dtype)).contiguous()  # layout must not change the rounding
    if config.hadamard:
        x_h = block_rotate(x_h, config.block_size)
    q, mask = quantize_rotated(x_h, config, scale_cap(x.dtype))
    if config.hadamard and rotate_back:
        q = block_rotate(q, config.block_size)
    return q.to(x.dtype), mask


def quantize_codes(x: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rotated-domain quantization of ``x`` as integers (SPEC 1, "Integer codes"):
    ``(codes, code_scale, mask)`` with int8 codes (centered grid: odd ``C = 2c - (L - 1)`` and
    ``code_scale = d / 2``; integer grid: ``C = k`` and ``code_scale = d``), ``code_scale`` fp32
    of shape ``x.shape[:-1]``, and the bool mask; ``codes * code_scale[..., None]`` is exactly
    ``quantize(x, config, rotate_back=False)[0]`` in fp32 (one rounding of the same product).
    The codes fit int8 up to 7 bits (centered) or 8 (integer)."""
    if not config.codes_fit_int8:
        raise ValueError(f"quantize_codes: {config.bits}-bit codes of the {config.grid} grid "
                         f"(|C| <= {config.max_code}) do not fit int8")
    x_h = x.to(compute_dtype(x.dtype)).contiguous()
    if config.hadamard:
        x_h = block_rotate(x_h, config.block_size)
    cap = scale_cap(x.dtype)
    _, mask = quantize_rotated(x_h, config, cap)
    level, step = grid_level(x_h, row_scale(x_h, config, cap), config)
    multiple = 1 if config.grid == "integer" else 2  # centered levels are half-integers
    return (multiple * level).to(torch.int8), (step / multiple).squeeze(-1).to(torch.float32), mask


def masked_grad(grad: torch.Tensor, mask: torch.Tensor, config: QuantConfig, grad_is_rotated: bool = False):
    """Straight-through backward: ``H (mask * (H g))`` per block (no rotation without Hadamard).

    With ``grad_is_rotated`` the incoming gradient is already in the rotated domain
    (the forward skipped its rotation back), so only the final rotation is applied.
    """
    g = grad.to(compute_dtype(grad.dtype)).contiguous()
    if config.hadamard and not grad_is_rotated:
        g = block_rotate(g, config.block_size)
    g = g * mask
    if config.hadamard:
        g = block_rotate(g, config.block_size)
    return g.to(grad.dtype)


def quantization_error(w: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """``w - Q(w)`` in ``w``'s dtype (the CAGE correction direction)."""
    return w - quantize(w, config)[0]


def decay_and_update_moments(work, g, exp_avg, exp_avg_sq, *, lr: float, beta1: float, beta2: float,
                             weight_decay: float) -> None:
    """AdamW's decoupled weight decay and moment updates, in place, in torch.optim.AdamW's order."""
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)


def adamw_cage_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    quant: QuantConfig | None,
    cage_lambda: float,
    coupling: str,
) -> None:
    """One AdamW + CAGE update of one tensor, in place (SPEC 2).

    ``step`` is the step number after incrementing (1 on the first step); ``cage_lambda``
    is lambda_t for this step. The AdamW part follows ``torch.optim.AdamW``'s
    single-tensor path operation by operation, so with ``cage_lambda == 0`` an fp32
    parameter ends bit-identical to it. Moments are fp32 for bf16/fp16 parameters; the
    math then runs on an fp32 copy that is rounded back into ``param`` at the end.
    """
    work = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
    g = grad if grad.dtype == exp_avg.dtype else grad.to(exp_avg.dtype)
    cage_on = quant is not None and cage_lambda != 0

    if cage_on and coupling == "coupled":
        g = g + cage_lambda * quantization_error(work, quant)

    decay_and_update_moments(work, g, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2,
                             weight_decay=weight_decay)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    work.addcdiv_(exp_avg, denom, value=-step_size)

    if cage_on and coupling == "decoupled":
        work.sub_(quantization_error(work, quant), alpha=lr * cage_lambda)

    if work is not param:
        param.copy_(work)

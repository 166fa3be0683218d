"""Checks of kernel outputs against the torch reference (cage.naive), for the tests and
for runs on a GPU.

Kernels and reference round differently (summation order, the rotation's +-1 matrix
scaled afterwards, fused multiply-adds), so a value that lies within rounding of a grid
decision boundary may be rounded to the other level. The checks therefore compare
*decisions* (grid indices, mask bits) and allow a flip only where the exact (fp64)
input is genuinely at a boundary, bound the fraction of flips, and compare *values*
tightly given the decisions.
"""

from __future__ import annotations

import math

import torch

from cage import naive
from cage.config import RMS_EPS, QuantConfig

# A flipped decision is accepted only this close to its boundary, in grid steps.
BOUNDARY_STEPS = 1e-4
# ... and only for this fraction of the elements.
MAX_FLIP_FRACTION = 1e-3


def _rotate64(t: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    t = t.to(torch.float64)
    return naive.block_rotate(t, config.block_size) if config.hadamard else t


def grid_geometry(x: torch.Tensor, config: QuantConfig):
    """Exact (fp64) ``x_h``, scale ``s`` ``[..., 1]``, step, and the distance of each
    element to its nearest rounding boundary in steps."""
    x_h = _rotate64(x, config)
    s = config.alpha * torch.sqrt(x_h.square().mean(dim=-1, keepdim=True) + RMS_EPS)
    step = 2 * s / config.step_divisor
    if config.grid == "integer":  # boundaries at half-integers of x_h / step, inside the code range
        half = config.levels // 2
        u = torch.clamp(x_h / step, -half, half - 1) + 0.5
    else:  # boundaries at integers of x_h / step, inside [-s, s]
        u = torch.minimum(torch.maximum(x_h, -s), s) / step
    return x_h, s, step, (u - torch.round(u)).abs()


def grid_index(q: torch.Tensor, config: QuantConfig, step: torch.Tensor, rotated: bool) -> torch.Tensor:
    """The grid index ``k`` of each element of a quantized output (``q_h = (k - offset) step``)."""
    q_h = q.to(torch.float64) if rotated else _rotate64(q, config)
    return torch.round(q_h / step + config.level_offset)


def check_fake_quant(
    x: torch.Tensor, config: QuantConfig, rotate_back: bool, q: torch.Tensor, mask: torch.Tensor
) -> dict:
    """Assert that a kernel's ``(q, bool mask)`` for ``x`` agrees with ``naive.quantize``.

    Returns counts of the flipped decisions (for reporting)."""
    assert q.shape == x.shape and q.dtype == x.dtype, (q.shape, q.dtype)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    q_ref, mask_ref = naive.quantize(x, config, rotate_back)
    x_h, s, step, boundary_distance = grid_geometry(x, config)
    rotated = not (config.hadamard and rotate_back)
    k = grid_index(q, config, step, rotated)
    k_ref = grid_index(q_ref, config, step, rotated)
    n = x.numel()

    # 1. decisions: the grid index differs only at a boundary, by one, rarely
    flips = k != k_ref
    n_flips = int(flips.sum())
    assert n_flips <= MAX_FLIP_FRACTION * n, f"{n_flips} of {n} grid decisions differ from the reference"
    if n_flips:
        assert bool(((k - k_ref).abs()[flips] == 1).all()), "a grid index differs by more than one level"
        far = boundary_distance[flips].max().item()
        assert far < BOUNDARY_STEPS, f"a grid decision differs {far:.3g} steps away from its boundary"

    # 2. values: q is the exact function of its indices, to the output dtype's rounding
    eps = torch.finfo(x.dtype).eps
    q_h_expected = (k - config.level_offset) * step
    expected = q_h_expected if rotated else _rotate64(q_h_expected, config)
    tolerance = eps * expected.abs() + 8 * torch.finfo(torch.float32).eps * s
    err = (q.to(torch.float64) - expected).abs()
    assert bool((err <= tolerance).all()), f"q off its own grid decision by {(err / s).max().item():.3g} s"
    # ... and where nothing flipped in the row, q equals the reference within one rounding
    clean_rows = ~flips.reshape(-1, x.shape[-1]).any(dim=-1)
    ref_err = (q.to(torch.float64) - q_ref.to(torch.float64)).abs().reshape(-1, x.shape[-1])
    ref_tol = (eps * q_ref.to(torch.float64).abs() + 8 * torch.finfo(torch.float32).eps * s).reshape(-1, x.shape[-1])
    assert bool((ref_err <= ref_tol)[clean_rows].all()), "q differs from the reference on a row without flips"

    # 3. masks: a bit differs only where its grid index flipped or it sits on the mask boundary
    mask_diff = mask != mask_ref
    n_mask_diff = int(mask_diff.sum())
    if n_mask_diff:
        assert n_mask_diff <= MAX_FLIP_FRACTION * n, f"{n_mask_diff} of {n} mask bits differ"
        if config.grad_mask == "clip" or config.bits == 1:
            radius = 1.0 if config.grad_mask == "clip" else config.one_bit_widening
            margin = (x_h.abs() - radius * s).abs() / step
        else:
            margin = ((q_h_expected - x_h).abs() - s * config.trust_halfwidth).abs() / step
        explained = flips | (margin < BOUNDARY_STEPS)
        assert bool(explained[mask_diff].all()), "a mask bit differs away from the mask boundary"
    return {"grid_flips": n_flips, "mask_flips": n_mask_diff, "elements": n}


def outliers(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 2, compute_ulps: float = 32):
    """Bool mask of the elements outside ``ulps * eps(dtype) * |expected| + compute_ulps *
    eps(fp32) * rms(expected)``: the output's own rounding plus fp32 arithmetic that summed
    differently (a 128-wide rotation, twice)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.to(torch.float64), expected.to(torch.float64)
    rms = e.square().mean().sqrt() if e.numel() else e.new_zeros(())
    tolerance = ulps * torch.finfo(actual.dtype).eps * e.abs() + compute_ulps * torch.finfo(torch.float32).eps * rms
    return (a - e).abs() > tolerance


def assert_close_except_rare(
    actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 2, compute_ulps: float = 32,
    max_fraction: float = MAX_FLIP_FRACTION, what: str = "tensor",
) -> int:
    """:func:`outliers` is empty, or holds at most ``max_fraction`` of the elements (at
    least one if max_fraction > 0). Returns the number of outliers."""
    bad = outliers(actual, expected, ulps=ulps, compute_ulps=compute_ulps)
    n_bad = int(bad.sum())
    allowed = max(1, math.floor(max_fraction * actual.numel())) if max_fraction > 0 else 0
    assert n_bad <= allowed, (
        f"{what}: {n_bad} of {actual.numel()} elements differ by more than the tolerance (max abs diff "
        f"{(actual.to(torch.float64) - expected.to(torch.float64)).abs().max().item():.3g})"
    )
    return n_bad


def near_boundary_blocks(x: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Bool ``[rows, blocks]``: the rotation blocks of ``x`` (one element per block without
    rotation) that hold an element within BOUNDARY_STEPS of a grid decision boundary. A
    flipped decision changes ``Q(x)`` on its whole block."""
    block = config.block_size if config.hadamard else 1
    distance = grid_geometry(x, config)[3]
    return (distance < BOUNDARY_STEPS).reshape(-1, x.shape[-1] // block, block).any(dim=-1)

"""A planned kernel launch: what the launchers run and what the compile gate compiles.

Launchers build a :class:`Launch` and its argument tuple from shapes and dtypes (an
argument may be a ``torch.dtype`` in place of a tensor), so ``cage_kernels.compile_gate``
compiles exactly what a real call would launch, without allocating anything. Launchers
cache their Launch objects (planning is pure in shapes, dtypes and switches), so a call
pays a dictionary lookup, not the planning.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

MAX_REGISTERS = 255


def dtype_of(t) -> torch.dtype:
    """The dtype of a tensor, or the dtype that stands in for one."""
    return t if isinstance(t, torch.dtype) else t.dtype


@dataclasses.dataclass(frozen=True)
class Launch:
    """The kernel, its grid and its compile-time parameters (``meta``, sorted pairs)."""

    kernel: Any
    grid: tuple[int, ...]
    meta: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int
    # Built once: a launch is replayed every step, and the dict would be rebuilt every call.
    options: dict = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self):
        # No implicit FMA contraction: the kernels write tl.fma where they mean one, so a
        # Triton upgrade (3.10 changes the default) does not change the numbers (SPEC 5).
        # An explicit register cap: left to itself, ptxas sometimes aims at an occupancy
        # (64, 96, 128 or 168 registers) and spills a few words to reach it; 255 at 4 warps
        # still leaves 2 CTAs per SM, and the compile gate holds every kernel to that.
        object.__setattr__(self, "options", dict(
            self.meta, num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=False,
            maxnreg=MAX_REGISTERS,
        ))

    @classmethod
    def of(cls, kernel, grid, blocking, **meta) -> "Launch":
        """The launch of ``kernel`` over ``grid`` with ``blocking``'s warps and stages."""
        return cls(kernel, tuple(grid), tuple(sorted(meta.items())), blocking.num_warps, blocking.num_stages)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def __call__(self, *args) -> None:
        """Launch on the device of the first argument (a tensor for every kernel here).

        Triton launches on the *current* CUDA device and stream; a tensor on ``cuda:1`` while
        ``cuda:0`` is current would be read through the wrong context (flash-linear-attention's
        ``input_guard`` does the same). The check costs one device query when the devices agree.
        """
        device = args[0].device
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device.index):
                self.kernel[self.grid](*args, **self.options)
            return
        self.kernel[self.grid](*args, **self.options)

    def warmup(self, *args):
        """Compile for the current target without running; returns the compiled kernel."""
        return self.kernel.warmup(*args, grid=self.grid, **self.options)


class PlanCache(dict):
    """Plans of launcher calls keyed by what they depend on (shapes, dtypes, device, switches,
    scalars): a repeated call looks its plan up instead of validating and planning again.
    Bounded: a process that sees ever new shapes starts over rather than growing."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self.limit = limit

    def put(self, key, plan):
        if len(self) >= self.limit:
            self.clear()
        self[key] = plan
        return plan

"""Quantizer configuration (SPEC section 1)."""

from __future__ import annotations

import dataclasses

# MSE-optimal clipping point, in units of the row RMS, of a standard normal for a
# symmetric 2**b-level grid without a zero level (SPEC 1; tests re-derive them).
ALPHA: dict[int, float] = {
    1: 0.7978845587,
    2: 1.4935346200,
    3: 2.0510683541,
    4: 2.5139305786,
    5: 2.9160938834,
    6: 3.2765972826,
    7: 3.6010497188,
    8: 3.8849386788,
}

GRAD_MASKS = ("none", "clip", "trust")

# QuEST's 1-bit trust region: a clip mask with the range widened by this factor.
ONE_BIT_TRUST_WIDENING = {True: 1.3, False: 1.25}

# Added to the mean square before the square root, so that an all-zero row gets a
# tiny positive scale instead of a division by zero.
RMS_EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How one tensor is fake-quantized along its last dimension.

    bits:       1..8; the grid has ``2**bits`` symmetric levels and no zero level.
    hadamard:   rotate each ``block_size`` chunk of a row by the orthonormal Hadamard
                matrix before quantizing (QuEST).
    block_size: rotation block, a power of two that must divide the row length.
    grad_mask:  straight-through mask of the backward pass: "none", "clip" or "trust".
    """

    bits: int
    hadamard: bool = True
    block_size: int = 128
    grad_mask: str = "trust"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"QuantConfig: bits must be an integer in 1..8, got {self.bits!r}")
        if not isinstance(self.hadamard, bool):
            raise ValueError(f"QuantConfig: hadamard must be True or False, got {self.hadamard!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1 or bs & (bs - 1):
            raise ValueError(
                f"QuantConfig: block_size must be a power of two (1, 2, 4, ..., 128, ...), got {bs!r}"
            )
        if self.grad_mask not in GRAD_MASKS:
            raise ValueError(
                f"QuantConfig: grad_mask must be one of {GRAD_MASKS}, got {self.grad_mask!r}"
            )

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def alpha(self) -> float:
        return ALPHA[self.bits]

    @property
    def trust_halfwidth(self) -> float:
        """Trust radius in units of the scale s: half a grid step, ``1 / (2**b - 1)``."""
        return 1.0 / (self.levels - 1)

    @property
    def one_bit_widening(self) -> float:
        return ONE_BIT_TRUST_WIDENING[self.hadamard]

    def check_row_length(self, n: int) -> None:
        if self.hadamard and n % self.block_size:
            raise ValueError(
                f"the last dimension ({n}) is not divisible by the Hadamard block_size "
                f"({self.block_size}); pick a block_size that divides {n} or hadamard=False"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(**d)

    def __str__(self) -> str:
        rot = f"H{self.block_size}" if self.hadamard else "noH"
        return f"W{self.bits}/{rot}/{self.grad_mask}"


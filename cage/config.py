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

# MSE-optimal clipping point of a standard normal, in units of the row RMS, for the
# zero-including integer grid: levels k * d, k = -2**(b-1) .. 2**(b-1) - 1, d = s / 2**(b-1)
# (so the lowest level is -s and the highest s - d). Derived like ALPHA (tests re-derive them).
# That code range, not the symmetric -(2**(b-1) - 1) .. 2**(b-1) - 1, has the lower MSE at
# every width (4 bits: 0.01186 against 0.01289) and is what int4 kernels take (uint4b8: q + 8).
ALPHA_INTEGER: dict[int, float] = {
    2: 2.0967705078,
    3: 2.4072969277,
    4: 2.7088635630,
    5: 3.0206754498,
    6: 3.3337422019,
    7: 3.6407905931,
    8: 3.9379945661,
}

GRAD_MASKS = ("none", "clip", "trust")
# "centered": 2**b levels (k - 1/2) * d, no zero level (QuEST's, the default); "integer": k * d,
# zero included, what integer-code serving formats store (SPEC 1, "A zero-including grid").
GRIDS = ("centered", "integer")

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
    grid:       "centered" (levels (k - 1/2) d, no zero level; the default) or "integer"
                (levels k d, k in -2**(b-1) .. 2**(b-1) - 1; 2 to 8 bits).
    """

    bits: int
    hadamard: bool = True
    block_size: int = 128
    grad_mask: str = "trust"
    grid: str = "centered"

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
        if self.grid not in GRIDS:
            raise ValueError(f"QuantConfig: grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid == "integer" and self.bits < 2:
            raise ValueError("QuantConfig: the integer grid needs bits in 2..8 (1 bit would be {-d, 0}); "
                             "use grid='centered' for 1 bit")

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def alpha(self) -> float:
        return ALPHA_INTEGER[self.bits] if self.grid == "integer" else ALPHA[self.bits]

    @property
    def step_divisor(self) -> int:
        """``2 s / d``: the step is ``d = 2 s / (2**b - 1)`` (centered) or ``2 s / 2**b`` (integer)."""
        return self.levels if self.grid == "integer" else self.levels - 1

    @property
    def level_offset(self) -> float:
        """Levels are ``(k - level_offset) * d`` with an integer k: 1/2 (centered) or 0 (integer)."""
        return 0.0 if self.grid == "integer" else 0.5

    @property
    def trust_halfwidth(self) -> float:
        """Trust radius in units of the scale s: half a grid step, ``d / (2 s)``."""
        return 1.0 / self.step_divisor

    @property
    def max_code(self) -> int:
        """The largest ``|C|`` of the integer codes ``q = C * code_scale``: odd ``C = 2c - (L - 1)``
        (centered, ``code_scale = d / 2``) or ``C = k`` (integer, ``code_scale = d``)."""
        return self.levels // 2 if self.grid == "integer" else self.levels - 1

    def codes_fit_int(self, bits: int) -> bool:
        """The codes fit signed ``bits``-bit integers: ``|C| < 2**(bits - 1)``, or ``|C|`` equal to it on
        the integer grid (whose codes run from ``-L/2`` to ``L/2 - 1``)."""
        top = 2 ** (bits - 1)
        return self.max_code < top or (self.grid == "integer" and self.max_code == top)

    @property
    def codes_fit_int8(self) -> bool:
        """The codes fit int8: up to 7 bits on the centered grid, 8 on the integer one."""
        return self.codes_fit_int(8)

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
        return cls(**d)  # files from before the integer grid have no "grid": centered

    def __str__(self) -> str:
        rot = f"H{self.block_size}" if self.hadamard else "noH"
        return f"W{self.bits}/{rot}/{self.grad_mask}" + ("/int" if self.grid == "integer" else "")


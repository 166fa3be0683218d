"""Host-side launch planning shared by the kernels: how rows are cut into chunks and
tiles, which dtype a rotation's ``tl.dot`` may use, and whether we run interpreted."""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .hadamard import MIN_DOT, rotation_width

# Longest row chunk a program holds in registers. A row up to this long (padded to a
# power of two) is read once; a longer one is swept twice (sum of squares, then the rest).
ROW_CHUNK_MAX = 8192
# Elements per program (rows x chunk). The interpreter pays ~1 ms of Python per program,
# so it gets bigger tiles; compiled code gets register-friendly ones.
TILE_ELEMS_COMPILED = 4096
TILE_ELEMS_INTERPRETED = 16384
# Columns of a chunk tile when nothing is rotated (rows of any length, masked at the end).
PLAIN_TILE_WIDTH = 128


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` runs under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class RowTiling:
    """A program handles ``block_rows`` rows, ``tiles`` x ``rot_width`` columns at a time.

    ``n_chunks`` is how many such chunks cover the longest row of the launch; with one
    chunk the kernel keeps the whole (padded) row in registers.
    """

    rot_width: int
    tiles: int
    block_rows: int
    n_chunks: int

    @property
    def chunk_width(self) -> int:
        return self.tiles * self.rot_width

    @property
    def single_chunk(self) -> bool:
        return self.n_chunks == 1

    @property
    def num_warps(self) -> int:
        return 4 if self.block_rows * self.chunk_width <= 2048 else 8


def plain_rot_width(n_cols: int) -> int:
    """Tile width when there is no rotation: cover short rows with one masked tile."""
    return min(PLAIN_TILE_WIDTH, max(MIN_DOT, next_pow2(n_cols)))


def plan_rows(
    n_rows: int,
    n_cols: int,
    rot_width: int,
    *,
    uses_dot: bool,
    interpreted: bool,
    max_chunk: int | None = None,
) -> RowTiling:
    """Blocking for rows of ``n_cols`` columns cut into ``rot_width``-wide tiles.

    ``max_chunk`` (default ROW_CHUNK_MAX, read at call time: tests lower it to exercise
    the two-sweep path on small rows) caps the columns held at once.
    """
    max_chunk = max(max_chunk or ROW_CHUNK_MAX, rot_width)
    n_tiles = triton.cdiv(n_cols, rot_width)
    tiles = next_pow2(n_tiles)
    if tiles * rot_width > max_chunk:
        tiles = prev_pow2(max_chunk // rot_width)
    n_chunks = triton.cdiv(n_tiles, tiles)
    tile_elems = TILE_ELEMS_INTERPRETED if interpreted else TILE_ELEMS_COMPILED
    block_rows = min(prev_pow2(max(1, tile_elems // (tiles * rot_width))), next_pow2(max(n_rows, 1)))
    if uses_dot:  # the rotation multiplies [block_rows * tiles, rot_width] tiles
        block_rows = max(block_rows, next_pow2(triton.cdiv(MIN_DOT, tiles)))
    return RowTiling(rot_width, tiles, block_rows, n_chunks)


def quant_rot_width(hadamard: bool, block_size: int, n_cols: int) -> int:
    return rotation_width(block_size) if hadamard else plain_rot_width(n_cols)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def exact_dot_dtype(dtype: torch.dtype, interpreted: bool):
    """Operand dtype for rotating data stored in ``dtype``: a half type is exact in
    itself (the +-1 matrix too, accumulation is fp32), fp32 stays fp32. The interpreter's
    bf16 dot is wrong (SPEC 5): always fp32 there."""
    if interpreted or dtype not in (torch.bfloat16, torch.float16):
        return tl.float32
    return tl_dtype(dtype)


def level_dot_dtype(interpreted: bool):
    """Operand dtype for rotating grid levels ``k - 0.5``: half-integers of at most 8
    significant bits (bits <= 8) are exact in bf16, so the rotation back runs on tensor
    cores without error."""
    return tl.float32 if interpreted else tl.bfloat16

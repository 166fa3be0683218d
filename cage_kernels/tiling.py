"""Host-side launch planning shared by the kernels: how rows are cut into chunks and
tiles, which dtype a rotation's ``tl.dot`` uses, and whether we run interpreted.

A program owns ``block_rows`` whole rows and walks them one chunk of
``[block_rows, tiles, rot_width]`` elements at a time. The chunk is small and fixed
(CHUNK_ELEMS), so a kernel's registers do not grow with the row: that is what keeps the
compiled kernels free of spills for rows of any length. A row block that fits one chunk
is loaded once; a longer one is swept twice (the row's sum of squares first), and the
row block is sized (ROW_BLOCK_ELEMS) so that the second sweep's reads come from L2.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton.language as tl

from .hadamard import MIN_DOT, rotation_width

# Elements of one chunk, the unit a program holds in registers. Compiled: 2048 fp32 over
# 4 warps is 16 per thread and stream. The interpreter pays ~1 ms of Python per program
# and per op, so it gets more.
CHUNK_ELEMS_COMPILED = 2048
CHUNK_ELEMS_INTERPRETED = 16384
# Elements of a program's row block (block_rows x row length) the planner aims below when
# choosing rows per program: what the second sweep re-reads, per program, from L2.
ROW_BLOCK_ELEMS_COMPILED = 16384
ROW_BLOCK_ELEMS_INTERPRETED = 1 << 20
# Cap on the columns of one chunk, read at call time (tests lower it to reach the
# two-sweep path on small rows).
ROW_CHUNK_MAX = 1 << 16
# Columns of a tile when nothing is rotated (rows of any length, masked at the end).
PLAIN_TILE_WIDTH = 128
# Warps of a program. A chunk read once (no loop) runs 4 warps: several CTAs fit per SM.
# A row walked chunk by chunk runs 8 warps without software pipelining: Triton's default
# (3 stages through shared memory) took 230-253 registers on Triton 3.7 at 4 warps (2 CTAs,
# 8 warps per SM); 8 warps, 1 stage take ~100-130 (2 CTAs, 16 warps per SM, as many loads
# in flight). The compile gate checks every kernel keeps at least 2 CTAs per SM.
NUM_WARPS_SINGLE_CHUNK = 4
NUM_WARPS_SWEEPS = 8
NUM_STAGES = 1


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` runs under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def cdiv(a: int, b: int) -> int:
    """Integer ceiling division on the host (``triton.cdiv`` is a ``constexpr_function``: a
    few microseconds a call, which planning would pay on every launch)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class RowTiling:
    """A program handles ``block_rows`` rows, ``tiles`` x ``rot_width`` columns at a time;
    ``n_chunks`` chunks cover the longest row of the launch."""

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
        return NUM_WARPS_SINGLE_CHUNK if self.single_chunk else NUM_WARPS_SWEEPS

    @property
    def num_stages(self) -> int:
        return NUM_STAGES


def plain_rot_width(n_cols: int) -> int:
    """Tile width when there is no rotation: cover short rows with one masked tile."""
    return min(PLAIN_TILE_WIDTH, max(MIN_DOT, next_pow2(n_cols)))


def plan_rows(n_cols: int, rot_width: int, *, uses_dot: bool, interpreted: bool) -> RowTiling:
    """Blocking for rows of ``n_cols`` columns cut into ``rot_width``-wide tiles (cached: a
    launch plans the same few widths again and again; ROW_CHUNK_MAX is part of the key, as
    tests lower it)."""
    return _plan_rows(n_cols, rot_width, uses_dot, interpreted, ROW_CHUNK_MAX)


@functools.lru_cache(maxsize=4096)
def _plan_rows(n_cols: int, rot_width: int, uses_dot: bool, interpreted: bool, row_chunk_max: int) -> RowTiling:
    """Blocking for rows of ``n_cols`` columns cut into ``rot_width``-wide tiles.

    A row that fits one chunk (padded to a power of two of tiles) is held whole and read
    once; padding costs lanes, not memory traffic. A longer row is walked in full chunks:
    ``block_rows`` as large as ROW_BLOCK_ELEMS allows, and the tiles per chunk (a power of
    two) that fill the chunk and pad the row least. The row count does not enter: a
    tensor of few rows masks the rest of its block, and every tensor of one width shares
    one compiled kernel.
    """
    chunk_elems = CHUNK_ELEMS_INTERPRETED if interpreted else CHUNK_ELEMS_COMPILED
    row_block_elems = ROW_BLOCK_ELEMS_INTERPRETED if interpreted else ROW_BLOCK_ELEMS_COMPILED
    slots = max(1, chunk_elems // rot_width)  # tiles of one chunk, over all its rows
    row_tiles = max(1, cdiv(n_cols, rot_width))
    max_tiles = max(1, min(slots, next_pow2(row_tiles), row_chunk_max // rot_width))
    rows_wanted = prev_pow2(max(1, row_block_elems // max(n_cols, 1)))

    def rows_for(tiles: int) -> int:
        block_rows = max(1, min(slots // tiles, rows_wanted))
        if uses_dot:  # the rotation multiplies [block_rows * tiles * rot_width / 16, 16] by 16 x 16
            block_rows = max(block_rows, cdiv(MIN_DOT * MIN_DOT, tiles * rot_width))
        return block_rows

    if next_pow2(row_tiles) <= max_tiles:
        tiles = next_pow2(row_tiles)
        return RowTiling(rot_width, tiles, rows_for(tiles), 1)
    candidates = []
    tiles = min(max_tiles, max(1, slots // rows_wanted))
    while tiles <= max_tiles:
        candidates.append(((cdiv(row_tiles, tiles) * tiles, -rows_for(tiles)), tiles))
        tiles *= 2
    tiles = min(candidates)[1]
    return RowTiling(rot_width, tiles, rows_for(tiles), cdiv(row_tiles, tiles))


def quant_rot_width(hadamard: bool, block_size: int, n_cols: int) -> int:
    return rotation_width(block_size) if hadamard else plain_rot_width(n_cols)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def split_parts(data_dtype: torch.dtype) -> int:
    """bf16 parts that hold a value stored as ``data_dtype`` exactly: fp32 needs three
    (hi, mid, lo: 24 significant bits), fp16 two (11 bits), bf16 one."""
    return {torch.float32: 3, torch.float16: 2, torch.bfloat16: 1}[data_dtype]

"""The rotation matrix the kernels load as one tile, and the in-register rotation.

Every kernel works on row chunks laid out as ``[BLOCK_ROWS, TILES, ROT_WIDTH]``: a
chunk of ``BLOCK_ROWS`` rows, each cut into ``TILES`` rotation tiles of ``ROT_WIDTH``
columns. A rotation tile is one Hadamard block, or several when the block is smaller
than the 16 columns ``tl.dot`` needs: the tile matrix is then ``kron(I, H_B)``, which
rotates each block on its own exactly like the reference.

The matrix holds the unnormalised +-1 entries (exact in every dtype, so a bf16/fp16
``tl.dot`` with fp32 accumulation multiplies exactly); the ``1/sqrt(B)`` is applied to
the fp32 result.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cage import naive

# tl.dot needs at least 16 along each dimension.
MIN_DOT = 16
# Largest Hadamard block the kernels take: the matrix is one tile in shared memory.
# Larger blocks fall back to the torch reference (see the launchers).
MAX_KERNEL_BLOCK = 128

_ROTATION_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def rotation_width(block_size: int) -> int:
    """Columns of one rotation tile: the block, or 16 for smaller blocks."""
    return max(block_size, MIN_DOT)


def rotation_tile(block_size: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[W, W]`` matrix ``kron(I_{W/B}, sqrt(B) * H_B)`` (entries +-1 and 0), W = rotation_width(B).

    Cached per device: the optimizer and every fake-quant call reuse one copy.
    """
    key = (block_size, str(device))
    tile = _ROTATION_CACHE.get(key)
    if tile is None:
        width = rotation_width(block_size)
        signs = naive.hadamard_matrix(block_size, torch.float64) * math.sqrt(block_size)
        tile = torch.kron(torch.eye(width // block_size, dtype=torch.float64), signs.round())
        tile = tile.to(device=device, dtype=torch.float32).contiguous()
        _ROTATION_CACHE[key] = tile
    return tile


def load_rotation_args(hadamard: bool, block_size: int, device, dummy: torch.Tensor):
    """``(rotation tile or a dummy pointer, 1/sqrt(B))`` for a kernel launch."""
    if not hadamard:
        return dummy, 1.0
    return rotation_tile(block_size, device), 1.0 / math.sqrt(block_size)


@triton.jit
def load_rotation(rot_ptr, ROT_WIDTH: tl.constexpr):
    idx = tl.arange(0, ROT_WIDTH)
    return tl.load(rot_ptr + idx[:, None] * ROT_WIDTH + idx[None, :])


@triton.jit
def rotate_tiles(
    chunk, rot, BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """``chunk @ rot`` per rotation tile, fp32 result (not yet scaled by 1/sqrt(B)).

    ``DOT_DTYPE`` is the operand dtype: bf16/fp16 only where the operand is exact in it
    (then tensor cores multiply exactly); fp32 otherwise, in IEEE precision (no TF32).
    The interpreter always gets fp32 (its bf16 dot is wrong, SPEC 5).
    """
    flat = tl.reshape(chunk, (BLOCK_ROWS * TILES, ROT_WIDTH)).to(DOT_DTYPE)
    rotated = tl.dot(flat, rot.to(DOT_DTYPE), input_precision="ieee")
    return tl.reshape(rotated, (BLOCK_ROWS, TILES, ROT_WIDTH))

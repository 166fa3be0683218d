"""The rotation as two small tensor-core products, and the sign tiles it loads.

Every kernel works on row chunks laid out as ``[BLOCK_ROWS, TILES, ROT_WIDTH]``: a
chunk of ``BLOCK_ROWS`` rows, each cut into ``TILES`` rotation tiles of ``ROT_WIDTH``
columns. A rotation tile is one Hadamard block, or several when the block is smaller
than the 16 columns ``tl.dot`` needs (the tile matrix is then ``kron(I, H_B)``).

A Sylvester matrix factors as ``H_W = H_n (x) H_16`` (``W = 16 n``), so a W-wide tile is
rotated by two 16-wide products: ``H_16`` along the fast index, then, with the tile
viewed transposed as ``[16, n]``, ``kron(I_{16/n}, H_n)`` along the slow one. Both sign
tiles are 16 x 16, so the ``tl.dot`` operands hold a few registers, where one 128 x 128
operand would hold 64 per thread (and spill), and there are 4x fewer flops.

The tiles hold the unnormalised +-1 entries, exact in bf16; the ``1/sqrt(B)`` is applied
to the fp32 result. Operands that are not exact in bf16 are split into bf16 parts that
are (``x = hi + mid + lo`` for fp32), so every product runs on tensor cores and still
gives fp32 accuracy: each stage sums 16 (or n) exact products in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# tl.dot needs at least 16 along each dimension; the sign tiles are this wide.
MIN_DOT = 16
# Largest Hadamard block the kernels take (H_W = H_n (x) H_16 with n <= 16).
MAX_KERNEL_BLOCK = 128

_ROTATION_CACHE: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def rotation_width(block_size: int) -> int:
    """Columns of one rotation tile: the block, or 16 for smaller blocks."""
    return max(block_size, MIN_DOT)


def sylvester_signs(n: int) -> torch.Tensor:
    """The unnormalised ``n x n`` Sylvester Hadamard matrix (+-1), ``H_2k = [[H, H], [H, -H]]``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"sylvester_signs: n must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_tile(block_size: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[2, 16, 16]`` sign tiles of a rotation tile of ``rotation_width(block_size)``
    columns: the fast stage (``H_16``, or ``kron(I_{16/B}, H_B)`` for B < 16) and the slow
    stage (``kron(I_{16/n}, H_n)``, n = B / 16; the identity when there is none).
    Entries +-1 and 0, exact in any float dtype; cached per device and dtype."""
    key = (block_size, device, dtype)  # tensors' devices carry their index: cuda:0, not cuda
    tile = _ROTATION_CACHE.get(key)
    if tile is None:
        fast = sylvester_signs(min(block_size, MIN_DOT))
        fast = torch.kron(torch.eye(MIN_DOT // fast.shape[0]), fast)
        n = max(1, block_size // MIN_DOT)
        slow = torch.kron(torch.eye(MIN_DOT // n), sylvester_signs(n))
        tile = torch.stack([fast, slow]).to(device=device, dtype=dtype).contiguous()
        _ROTATION_CACHE[key] = tile
    return tile


def load_rotation_args(hadamard: bool, block_size: int, device, dummy: torch.Tensor, interpreted: bool):
    """``(sign tiles or a dummy pointer, 1/sqrt(B))`` for a kernel launch. The tiles are
    the dot operands' dtype: bf16 compiled; fp32 under the interpreter, whose bf16 dot
    is wrong (SPEC 5) and whose fp32 dot of bf16-exact parts is exact as well."""
    if not hadamard:
        return dummy, 1.0
    dtype = torch.float32 if interpreted else torch.bfloat16
    return rotation_tile(block_size, device, dtype), 1.0 / math.sqrt(block_size)


@triton.jit
def load_rotation(rot_ptr, ROT_WIDTH: tl.constexpr):
    """The two sign tiles, joined as ``[16, 16, 2]`` (split them with ``tl.split``)."""
    idx = tl.arange(0, 16)
    offsets = idx[:, None] * 16 + idx[None, :]
    return tl.join(tl.load(rot_ptr + offsets), tl.load(rot_ptr + 256 + offsets))


@triton.jit
def _dot_signs(part, signs, acc):
    """``acc + part @ signs`` in fp32, ``part`` rounded to bf16 (a no-op where it is
    bf16-exact, as it must be). The interpreter multiplies the rounded part in IEEE fp32:
    the same products, so its tests see what a lossy part would cost compiled."""
    part = part.to(tl.bfloat16)
    if signs.dtype == tl.float32:
        return tl.dot(part.to(tl.float32), signs, acc, input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(part, signs, acc, out_dtype=tl.float32)


@triton.jit
def _times_signs(flat, signs, SPLIT: tl.constexpr):
    """``flat @ signs`` (``[N, 16] x [16, 16]``) for fp32 ``flat`` exact in SPLIT bf16 parts
    (1: it is bf16-exact; 2: at most 16 significant bits; 3: any fp32 value)."""
    out = tl.zeros(flat.shape, tl.float32)
    if SPLIT == 1:
        out = _dot_signs(flat, signs, out)
    else:
        # largest part first: each part dies as soon as it is multiplied (registers)
        hi = flat.to(tl.bfloat16).to(tl.float32)
        out = _dot_signs(hi, signs, out)
        rest = flat - hi
        if SPLIT == 3:
            mid = rest.to(tl.bfloat16).to(tl.float32)
            out = _dot_signs(mid, signs, out)
            rest = rest - mid
        out = _dot_signs(rest, signs, out)
    return out


@triton.jit
def rotate_tiles(
    chunk, rot, BLOCK_ROWS: tl.constexpr, TILES: tl.constexpr, ROT_WIDTH: tl.constexpr,
    SPLIT: tl.constexpr, SLOW_SPLIT: tl.constexpr,
):
    """``chunk`` times the tile's +-1 Hadamard matrix, per rotation tile; fp32 result, not
    yet scaled by 1/sqrt(B). ``rot``: the joined sign tiles of ``load_rotation``.

    ``SPLIT``: the bf16 parts the chunk is exact in; ``SLOW_SPLIT``: those of the
    fast stage's sums (3 in general; 2 when the chunk holds grid levels, half-integers
    whose sums of 16 have at most 13 significant bits).
    """
    fast, slow = tl.split(rot)
    ROWS: tl.constexpr = BLOCK_ROWS * TILES * (ROT_WIDTH // 16)
    y = _times_signs(tl.reshape(chunk, (ROWS, 16)), fast, SPLIT)
    if ROT_WIDTH > 16:
        N: tl.constexpr = ROT_WIDTH // 16
        # [tile, slow a, fast d] -> [tile, d, a]: 16-element rows of (d // n, a) pairs
        y = tl.reshape(tl.permute(tl.reshape(y, (BLOCK_ROWS * TILES, N, 16)), (0, 2, 1)), (ROWS, 16))
        y = _times_signs(y, slow, SLOW_SPLIT)
        y = tl.reshape(tl.permute(tl.reshape(y, (BLOCK_ROWS * TILES, 16, N)), (0, 2, 1)), (ROWS, 16))
    return tl.reshape(y, (BLOCK_ROWS, TILES, ROT_WIDTH))

"""The kernels' rotation (cage_kernels.hadamard.rotate_tiles): two 16-wide products with
bf16 sign tiles, fp32 operands split into exact bf16 parts. Against the fp64 rotation it
must be fp32-accurate for every block size, and the split must be what makes it so.
Runs under Triton's interpreter on CPU (compiled on a GPU)."""

import math

import pytest
import torch

import triton
import triton.language as tl

from cage import naive
from cage_kernels.hadamard import load_rotation, load_rotation_args, rotate_tiles, rotation_width
from cage_kernels.tiling import is_interpreted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _rotate_kernel(x_ptr, out_ptr, rot_ptr, inv_sqrt_block, ROWS: tl.constexpr, ROT_WIDTH: tl.constexpr,
                   SPLIT: tl.constexpr):
    offsets = tl.arange(0, ROWS)[:, None, None] * ROT_WIDTH + tl.arange(0, ROT_WIDTH)[None, None, :]
    x = tl.load(x_ptr + offsets)
    y = rotate_tiles(x, load_rotation(rot_ptr, ROT_WIDTH), ROWS, 1, ROT_WIDTH, SPLIT, 3) * inv_sqrt_block
    tl.store(out_ptr + offsets, y)


def rotate(x: torch.Tensor, block: int, split: int) -> torch.Tensor:
    rows, width = x.shape
    assert width == rotation_width(block)
    rot, inv = load_rotation_args(True, block, x.device, dummy=x, interpreted=is_interpreted(_rotate_kernel))
    out = torch.empty_like(x)
    _rotate_kernel[(1,)](x, out, rot, inv, ROWS=rows, ROT_WIDTH=width, SPLIT=split)
    return out


def relative_error(x: torch.Tensor, block: int, split: int) -> float:
    exact = naive.block_rotate(x.to(torch.float64), block)
    err = (rotate(x, block, split).to(torch.float64) - exact).abs().max()
    return float(err / exact.abs().max())


@pytest.mark.parametrize("block", [1, 2, 4, 8, 16, 32, 64, 128])
def test_fp32_rotation_is_fp32_accurate(block):
    width = rotation_width(block)
    gen = torch.Generator().manual_seed(block)
    # values over several decades, so that the lower parts carry real bits
    x = (torch.randn(16, width, generator=gen, dtype=torch.float64)
         * torch.exp(2 * torch.randn(16, width, generator=gen, dtype=torch.float64))).to(torch.float32).to(DEVICE)
    stages = 1 if width == 16 else 2
    # each stage sums 16 exact products in fp32: a few units of fp32 rounding per stage
    assert relative_error(x, block, 3) < 4 * stages * math.sqrt(16) * torch.finfo(torch.float32).eps


def test_the_split_is_what_makes_it_accurate():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, generator=gen).to(DEVICE)
    eps32 = torch.finfo(torch.float32).eps
    assert relative_error(x, 128, 3) < 32 * eps32
    # one bf16 part keeps 8 significant bits: an error of ~2^-9, about 10^4 times larger
    assert relative_error(x, 128, 1) > 1e3 * relative_error(x, 128, 3)


def test_bf16_exact_data_needs_one_part_and_fp16_two():
    gen = torch.Generator().manual_seed(1)
    bf16 = torch.randn(16, 128, generator=gen).to(torch.bfloat16).to(torch.float32).to(DEVICE)
    fp16 = torch.randn(16, 128, generator=gen).to(torch.float16).to(torch.float32).to(DEVICE)
    eps32 = torch.finfo(torch.float32).eps
    assert relative_error(bf16, 128, 1) < 32 * eps32
    assert relative_error(fp16, 128, 2) < 32 * eps32
    assert relative_error(fp16, 128, 1) > 100 * 32 * eps32  # fp16's 11 bits do not fit one bf16 part

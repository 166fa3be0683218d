"""Forward fake-quant kernel against cage.naive (SPEC 1), under Triton's interpreter on
CPU (compiled on a GPU when there is one).

Triton is a CI dependency: without it these tests fail at import, they do not skip.
"""

import os
import random
import zlib

import pytest
import torch

import triton  # noqa: F401  (a missing triton fails here, loudly)

from cage.ops.fake_quant import TRITON as triton_ops
from cage import naive
from cage.config import GRAD_MASKS, QuantConfig
from cage_kernels import tiling
from cage.ops.fake_quant import fake_quant_fwd_op
from cage_kernels import pack_mask
from cage.testing import check_fake_quant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def seeded(name: str) -> int:
    return zlib.crc32(name.encode())


def make_input(shape, dtype, seed, device=DEVICE):
    """Gaussian rows with row scales spread over two decades (activations are not unit-RMS)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if x.dim() > 1:
        x = x * torch.exp(torch.randn(*shape[:-1], 1, generator=gen, dtype=torch.float64))
    return x.to(dtype).to(device)


def run_and_check(x, config, rotate_back=True):
    q, mask_state = triton_ops.quantize(x, config, rotate_back)
    n_cols = x.shape[-1]
    if config.grad_mask == "none":
        assert mask_state.numel() == 0
    else:  # 1 bit per element, rows padded to whole bytes
        assert mask_state.dtype == torch.uint8
        assert tuple(mask_state.shape) == (x.numel() // n_cols, (n_cols + 7) // 8)
    return check_fake_quant(x, config, rotate_back, q, triton_ops.mask_to_bool(mask_state, x.shape))


def _forward_cases():
    """Every grid x bits x mask x dtype x rotation combination; the shape (3/7/33 rows, 1-3
    blocks of 16..128 columns, or odd widths without rotation) and rotate_back drawn per case."""
    cases = []
    for grid in ("centered", "integer"):
        for bits in range(1 if grid == "centered" else 2, 9):
            for grad_mask in GRAD_MASKS:
                for dtype in DTYPES:
                    for hadamard in (True, False):
                        name = (f"b{bits}-{grad_mask}-{DTYPE_NAMES[dtype]}-{'H' if hadamard else 'noH'}"
                                + ("-int" if grid == "integer" else ""))
                        rng = random.Random(seeded(name))
                        block = rng.choice((16, 32, 64, 128))
                        n_cols = block * rng.randint(1, 3) if hadamard else rng.choice((16, 37, 100, 200))
                        rows = rng.choice((3, 7, 33))
                        rotate_back = rng.random() < 0.5
                        config = QuantConfig(bits, hadamard=hadamard, block_size=block, grad_mask=grad_mask,
                                             grid=grid)
                        cases.append(pytest.param(config, (rows, n_cols), dtype, rotate_back, id=name))
    return cases


@pytest.mark.parametrize("config,shape,dtype,rotate_back", _forward_cases())
def test_forward_matches_reference(config, shape, dtype, rotate_back):
    x = make_input(shape, dtype, seeded(f"{config}{shape}{dtype}"))
    run_and_check(x, config, rotate_back)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("n_blocks", [1, 2, 3])
def test_rows_of_one_to_three_blocks(block, n_blocks):
    x = make_input((33, block * n_blocks), torch.float32, seeded(f"blocks{block}x{n_blocks}"))
    for rotate_back in (True, False):
        run_and_check(x, QuantConfig(4, block_size=block), rotate_back)


@pytest.mark.parametrize("block,n_cols", [(1, 5), (2, 6), (4, 12), (8, 24), (8, 40)])
def test_blocks_smaller_than_a_dot_tile(block, n_cols):
    # rotation tiles are 16 wide: smaller blocks sit block-diagonally inside one
    x = make_input((7, n_cols), torch.float32, seeded(f"small{block}"))
    for grad_mask in GRAD_MASKS:
        run_and_check(x, QuantConfig(3, block_size=block, grad_mask=grad_mask))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
def test_non_contiguous_and_leading_dims(dtype):
    config = QuantConfig(4, block_size=32)
    base = make_input((2, 3, 128), dtype, 1)
    strided = base[..., ::2]  # [2, 3, 64], stride 2 along the row
    transposed = make_input((64, 5), dtype, 2).t()  # [5, 64], column-major
    for x in (strided, transposed, base[:, 1]):
        assert not x.is_contiguous()
        run_and_check(x, config)
        q, _ = triton_ops.quantize(x, config, True)
        assert torch.equal(q, triton_ops.quantize(x.contiguous(), config, True)[0])


def test_one_dimensional_input_is_one_row():
    x = make_input((96,), torch.float32, 3)
    run_and_check(x, QuantConfig(2, block_size=32))
    run_and_check(x, QuantConfig(2, hadamard=False, grad_mask="clip"))


@pytest.mark.parametrize("hadamard,n_cols", [(True, 48), (True, 80), (False, 300)])
def test_rows_longer_than_a_chunk_take_two_sweeps(monkeypatch, hadamard, n_cols):
    # the chunk cap (normally 8192 columns) lowered so small rows take the two-sweep path,
    # including a partial last chunk
    monkeypatch.setattr(tiling, "ROW_CHUNK_MAX", 32)
    x = make_input((7, n_cols), torch.bfloat16, seeded(f"sweeps{n_cols}"))
    for grad_mask in GRAD_MASKS:
        run_and_check(x, QuantConfig(3, hadamard=hadamard, block_size=16, grad_mask=grad_mask), rotate_back=hadamard)


def test_zero_rows_and_empty_tensors():
    x = make_input((5, 64), torch.float32, 4)
    x[1] = 0
    x[3, :32] = 0
    run_and_check(x, QuantConfig(4, block_size=32))
    empty = torch.empty(0, 64, device=DEVICE)
    q, mask_state = triton_ops.quantize(empty, QuantConfig(4, block_size=32), True)
    assert q.shape == (0, 64) and mask_state.shape == (0, 8)


@pytest.mark.parametrize(
    "dtype,config",
    [(torch.float64, QuantConfig(4, block_size=32)), (torch.float32, QuantConfig(4, block_size=256))],
    ids=["fp64", "block256"],
)
def test_reference_fallbacks_keep_the_mask_format(dtype, config):
    # fp64 and blocks above 128 run the torch reference, with the same packed mask
    x = make_input((3, 256), dtype, 5)
    q, mask_state = triton_ops.quantize(x, config, True)
    q_ref, mask_ref = naive.quantize(x, config, True)
    assert torch.equal(q, q_ref)
    assert torch.equal(triton_ops.mask_to_bool(mask_state, x.shape), mask_ref)


@pytest.mark.parametrize("n_cols", [1, 8, 13, 64])
def test_mask_packing_round_trip(n_cols):
    gen = torch.Generator().manual_seed(n_cols)
    mask = torch.rand(3, 2, n_cols, generator=gen) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (6, (n_cols + 7) // 8)
    assert torch.equal(triton_ops.mask_to_bool(packed, mask.shape), mask)


def test_forward_custom_op_registration():
    x = make_input((6, 64), torch.float32, 6)
    torch.library.opcheck(fake_quant_fwd_op, (x, 4, True, 32, "trust", True))
    torch.library.opcheck(fake_quant_fwd_op, (x.to(torch.bfloat16), 2, False, 32, "none", True))


def test_the_check_rejects_wrong_outputs():
    # the tolerance logic must not wave through a wrong scale or a wrong mask bit
    config = QuantConfig(4, block_size=32)
    x = make_input((7, 64), torch.float32, 7)
    q, mask = naive.quantize(x, config)
    check_fake_quant(x, config, True, q, mask)
    q_wrong_scale = q.clone()
    q_wrong_scale[2] *= 1.02  # one row on a grid 2% too wide
    with pytest.raises(AssertionError):
        check_fake_quant(x, config, True, q_wrong_scale, mask)
    nudge = 0.3 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    q_wrong_level = naive.quantize(x + nudge * (x.abs() < 0.05), config)[0]
    with pytest.raises(AssertionError):  # a few elements pushed across boundaries
        check_fake_quant(x, config, True, q_wrong_level, mask)
    mask_wrong = mask.clone()
    mask_wrong[0, 0] = ~mask_wrong[0, 0]
    with pytest.raises(AssertionError, match="mask"):
        check_fake_quant(x, config, True, q, mask_wrong)


def test_exact_ties_round_half_to_even():
    # a constant block rotates to one nonzero and exact zeros: x_h = 0 sits on a decision
    # boundary (the grid has no zero level). The kernel's +-1 sums are exact, so it rounds
    # the tie half to even (SPEC 1): round(0 + 0.5) = 0, level -1/2.
    config = QuantConfig(2, block_size=32)
    x = torch.full((3, 64), 0.75, device=DEVICE)
    x[1, 32:] = -1.25
    q_h, mask_state = triton_ops.quantize(x, config, False)
    s = config.alpha * torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-12)
    step = 2 * s / (config.levels - 1)
    zeros = torch.ones_like(x, dtype=torch.bool)
    zeros[:, 0] = zeros[:, 32] = False
    assert torch.equal(q_h[zeros], (-0.5 * step).expand_as(x)[zeros])
    check_fake_quant(x, config, False, q_h, triton_ops.mask_to_bool(mask_state, x.shape))


def test_import_without_triton_is_a_clear_error():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import cage\n"  # cage itself never needs triton
        "try:\n    import cage_kernels\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "ImportError: cage_kernels needs the triton package" in out.stdout


@pytest.mark.parametrize("n_cols", [11008, 14336])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
def test_llama_mlp_row_lengths(n_cols, dtype):
    # Llama-7B / Llama-3-8B MLP widths (86 and 112 blocks of 128): rows much longer than a chunk
    x = make_input((3, n_cols), dtype, seeded(f"llama{n_cols}{dtype}"))
    for config, rotate_back in ((QuantConfig(4), True), (QuantConfig(3, grad_mask="clip"), False),
                                (QuantConfig(2, hadamard=False), True)):
        run_and_check(x, config, rotate_back)

"""Dense bit packing of integer grid codes, row by row.

A row of ``n`` codes of ``bits`` bits each becomes ``ceil(n * bits / 8)`` bytes: the codes are
written one after the other into a little-endian bit stream (code ``j`` occupies bits
``j*bits .. j*bits + bits - 1``, bit 0 being the lowest bit of byte 0), and the last byte is
padded with zero bits. Rows stay independently addressable. With 4 bits this is two codes per
byte, the first in the low nibble; with 8 bits it is the codes themselves.
"""

from __future__ import annotations

import torch

MAX_BITS = 8


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes that one row of ``n`` codes of ``bits`` bits takes."""
    return (n * bits + 7) // 8


def _check_bits(bits, owner: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{owner}: bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` ([rows, n] integers in ``0 .. 2**bits - 1``) into uint8 [rows, packed_row_bytes(n, bits)]."""
    _check_bits(bits, "pack_codes")
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.is_complex() \
            or codes.dtype == torch.bool:
        raise TypeError(f"pack_codes: codes must be an integer tensor, got "
                        f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}")
    if codes.dim() != 2:
        raise ValueError(f"pack_codes: codes must be 2-D [rows, n], got shape {list(codes.shape)}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 2**bits:
            raise ValueError(
                f"pack_codes: codes must lie in 0..{2**bits - 1} for bits={bits}, got values in {lo}..{hi}"
            )
    codes = codes.to(torch.uint8)
    rows, n = codes.shape
    if bits == 8:
        return codes.contiguous()
    if bits == 4:
        if n % 2:
            codes = torch.cat([codes, codes.new_zeros(rows, 1)], dim=1)
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    return _pack_bitstream(codes, bits)


def _pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The general packing (any width), on checked uint8 codes."""
    rows, n = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    pad = packed_row_bytes(n, bits) * 8 - n * bits
    if pad:
        stream = torch.cat([stream, stream.new_zeros(rows, pad)], dim=1)
    weights = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (stream.reshape(rows, -1, 8) << weights).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: uint8 [rows, n] codes from uint8 [rows, packed_row_bytes(n, bits)]."""
    _check_bits(bits, "unpack_codes")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            "unpack_codes: packed must be a 2-D uint8 tensor, got "
            + (f"{packed.dtype} of shape {list(packed.shape)}" if isinstance(packed, torch.Tensor)
               else type(packed).__name__)
        )
    rows, width = packed.shape
    if width != packed_row_bytes(n, bits):
        raise ValueError(
            f"unpack_codes: {n} codes of {bits} bits take {packed_row_bytes(n, bits)} bytes per row, "
            f"the packed tensor has {width}"
        )
    if bits == 8:
        return packed.clone()
    if bits == 4:
        both = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(rows, -1)
        return both[:, :n].contiguous()
    return _unpack_bitstream(packed, bits, n)


def _unpack_bitstream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The general unpacking (any width), on a checked packed tensor."""
    rows, width = packed.shape
    weights = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> weights) & 1).reshape(rows, width * 8)[:, : n * bits]
    shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream.reshape(rows, n, bits) << shifts).sum(dim=-1, dtype=torch.uint8)

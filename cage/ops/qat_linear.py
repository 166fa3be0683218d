"""The QAT linear layer's forward as an exact integer product (SPEC 1, "Integer codes").

With weights and activations quantized in the same block-Hadamard basis (or both unrotated),
``y = q(x_h) q(W_h)^T + b``, and every level is an odd integer times half its row's step:
``q = C * d/2``, ``|C| <= L - 1``. So

    y = diag(d_x / 2) (C_x C_w^T) diag(d_w / 2) + b

an int8 x int8 product with int32 accumulation, exact while ``K (L_x - 1)(L_w - 1) <= 2**31 - 1``,
then an fp32 epilogue ``(acc * d_x/2) * d_w/2 + b`` (int32 -> fp32 is exact up to ``2**24``,
a few ulp relative to ``|y|`` beyond). Two implementations of the product:

- ``"int8"``: ``torch._int_mm`` (cuBLASLt on CUDA, a CPU kernel elsewhere) with the weight codes
  as the ``.t()`` view of the row-major ``[N, K]`` codes, then the epilogue in torch;
- ``"int8-fused"``: the Triton GEMM ``cage_kernels.int8_matmul`` with the epilogue fused.

One autograd function covers the whole layer, so what it saves for the backward is the int8
codes, one fp32 ``d/2`` per row and the bit-packed mask (~1.13 B per input element; ``F.linear``
on the dequantized operands would save them at 2 or 4 B). The backward runs in the rotated
domain on the operands rebuilt from the codes, in the gradient's dtype (bf16 under autocast, as
today's path): ``grad_x = (mask_x * (g q(W_h))) H^T`` and ``grad_W = (mask_w * (g^T q(x_h))) H^T``
(the straight-through gradient is not quantized). Shapes or configs the integer product cannot
take fall back to the dequantized path, per call (:func:`int8_product_takes`).
"""

from __future__ import annotations

import contextlib

import torch

from .. import backend as _backend
from ..config import QuantConfig
from . import fake_quant as _fq

MATMULS = ("auto", "dequant", "int8", "int8-fused")
# "auto" multiplies the dequantized operands until a GPU run shows the integer product faster.
AUTO_MATMUL = "dequant"
INT32_MAX = 2**31 - 1


def check_matmul_name(matmul: str, owner: str) -> None:
    if matmul not in MATMULS:
        raise ValueError(f"{owner}: matmul must be one of {MATMULS}, got {matmul!r}")


def resolve_matmul(matmul: str) -> str:
    return AUTO_MATMUL if matmul == "auto" else matmul


def int_mm_takes(m: int, k: int, n: int, device_type: str) -> bool:
    """Whether ``torch._int_mm`` takes an ``[m, k] x [k, n]`` product on this device type.

    CUDA (cuBLASLt): 2-D operands with ``m > 16`` and ``k``, ``n`` positive multiples of 8. The CPU
    kernel takes any shape, so nothing but this rule would catch a CUDA-only failure in CI."""
    if device_type == "cuda":
        return m > 16 and k > 0 and n > 0 and k % 8 == 0 and n % 8 == 0
    return m > 0 and k > 0 and n > 0


def codes_take(weight: QuantConfig | None, act: QuantConfig | None, k: int) -> bool:
    """Whether both operands have integer codes whose product is exact in int32: both quantized
    with codes that fit int8 (7 bits on the centered grid, 8 on the integer one), in the same
    basis (one block Hadamard on both, or neither rotated), and ``k max|C_x| max|C_w| <= 2**31 - 1``."""
    if weight is None or act is None or not (weight.codes_fit_int8 and act.codes_fit_int8):
        return False
    same_basis = (weight.hadamard and act.hadamard and weight.block_size == act.block_size) or not (
        weight.hadamard or act.hadamard)
    return same_basis and k * weight.max_code * act.max_code <= INT32_MAX


def int8_product_takes(matmul: str, x: torch.Tensor, out_features: int, weight_dtype: torch.dtype, weight_quant,
                       act_quant) -> bool:
    """The per-call rule: the integer product runs for this input, else the dequantized path
    (which then also reports what the product would not take, a dtype mismatch say)."""
    if matmul not in ("int8", "int8-fused") or x.dim() < 1 or torch.float64 in (x.dtype, weight_dtype):
        return False
    device_type = x.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if not autocast and x.dtype != weight_dtype:
        return False
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if not codes_take(weight_quant, act_quant, k):
        return False
    if matmul == "int8":
        return int_mm_takes(m, k, out_features, device_type)
    return m > 0


def product(codes_x, half_x, codes_w, half_w, bias, matmul: str, out_dtype: torch.dtype,
            max_codes: tuple[int, int] = (127, 127)) -> torch.Tensor:
    """``(acc * scale_x) * scale_w + b`` of the int8 codes; ``max_codes``: the bounds of ``|C_x|``,
    ``|C_w|`` (the fused kernel checks K against them)."""
    if matmul == "int8-fused":
        return _backend.kernels().int8_matmul(codes_x, codes_w, half_x, half_w, bias, out_dtype=out_dtype,
                                              max_abs_code=max_codes)
    acc = torch._int_mm(codes_x, codes_w.t())
    y = (acc.to(torch.float32) * half_x[:, None]) * half_w[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def _dequantize(codes: torch.Tensor, half_step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q = C * d/2`` in fp32 (exact: it is the fake quantizer's own q), then in ``dtype``."""
    return (codes.to(torch.float32) * half_step[:, None]).to(dtype)


class Int8QATLinear(torch.autograd.Function):
    """``y = q(x_h) q(W_h)^T + b`` through the integer product; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_quant, act_quant, ops, matmul, out_dtype):
        n_cols = x.shape[-1]
        rows = x.reshape(-1, n_cols)
        codes_x, half_x, mask_x = ops.quantize_codes(rows, act_quant)
        codes_w, half_w, mask_w = ops.quantize_codes(weight, weight_quant)
        y = product(codes_x, half_x, codes_w, half_w, bias, matmul, out_dtype,
                    (act_quant.max_code, weight_quant.max_code))
        ctx.save_for_backward(codes_x, half_x, mask_x, codes_w, half_w, mask_w)
        ctx.quant = (weight_quant, act_quant, ops)
        ctx.shapes = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        codes_x, half_x, mask_x, codes_w, half_w, mask_w = ctx.saved_tensors
        weight_quant, act_quant, ops = ctx.quant
        x_shape, x_dtype, w_dtype, bias_dtype = ctx.shapes
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_qx = g @ _dequantize(codes_w, half_w, g.dtype)
            grad_x = ops.masked_grad(grad_qx.to(x_dtype).contiguous(), mask_x, act_quant, True).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            grad_qw = g.t() @ _dequantize(codes_x, half_x, g.dtype)
            grad_w = ops.masked_grad(grad_qw.to(w_dtype).contiguous(), mask_w, weight_quant, True)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a linear layer's output for input ``x``: autocast's, else ``x``'s."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def int8_linear_inference(x, codes_w, half_w, bias, act_quant: QuantConfig, backend: str, matmul: str,
                          max_code_w: int = 127):
    """``y = q(x_h) (C_w d_w/2)^T + b`` for fixed weight codes (a converted layer), no autograd."""
    ops = _fq.get_ops(backend, x.device, "QuantizedLinear")
    if matmul == "int8-fused":
        _backend.resolve("triton", x.device, "QuantizedLinear(matmul='int8-fused')")
    out_dtype = autocast_dtype(x)
    device_type = x.device.type
    quiet = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else (
        contextlib.nullcontext())
    with quiet:  # the quantizer's math is fp32 by contract, and the product is exact
        codes_x, half_x, _ = ops.quantize_codes(x.reshape(-1, x.shape[-1]), act_quant)
        y = product(codes_x, half_x, codes_w, half_w, bias, matmul, out_dtype, (act_quant.max_code, max_code_w))
    return y.reshape(*x.shape[:-1], codes_w.shape[0])


def int8_qat_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_quant: QuantConfig,
                    act_quant: QuantConfig, backend: str, matmul: str) -> torch.Tensor:
    """The QAT linear forward through the integer product (``int8_product_takes`` must hold).
    ``x`` is the activation as the quantizer takes it (already cast to the autocast dtype); the
    output has the autocast dtype under autocast, else ``x``'s."""
    device_type = x.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    out_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    ops = _fq.get_ops(backend, x.device, "QATLinear")
    if matmul == "int8-fused":  # the Triton GEMM: a clear error where Triton cannot run
        _backend.resolve("triton", x.device, "QATLinear(matmul='int8-fused')")
    if autocast:  # the quantizer's math is fp32 by contract, and the product is exact
        with torch.autocast(device_type, enabled=False):
            return Int8QATLinear.apply(x, weight, bias, weight_quant, act_quant, ops, matmul, out_dtype)
    return Int8QATLinear.apply(x, weight, bias, weight_quant, act_quant, ops, matmul, out_dtype)

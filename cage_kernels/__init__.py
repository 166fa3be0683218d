"""Fused Triton kernels of the CAGE QAT runtime: the lowest layer.

Tensors and plain numbers in, nothing imported from ``cage`` (which owns the quantizer
config, the fallbacks and the autograd functions, and calls these launchers):

- ``fake_quant_forward(x, levels=, alpha=, hadamard=, block_size=, mask_mode=, ...)
  -> (q, packed mask)``  (fake_quant.py)
- ``fake_quant_backward(grad, mask, hadamard=, block_size=, apply_mask=, ...) -> grad_x``
  (masked_backward.py)
- ``plan_forward(shape, dtype, device, ...)`` / ``plan_backward(...)``: the same calls planned
  once (``ForwardPlan(x)``, ``BackwardPlan(grad, mask)``), for callers that keep their plans
- ``adamw_cage_step(params, grads, exp_avgs, exp_avg_sqs, step=, lr=, ...)``: the fused
  multi-tensor AdamW + CAGE step (adamw_cage.py); ``StepPlan(params, grads, ...)`` plans
  its launches once for callers that step the same tensors every step
- ``fake_quant_codes(x, ...) -> (int8 codes, fp32 code scale per row, packed mask)``: the
  forward kernel emitting the rotated-domain integer codes (the int8 product's operands)
- ``packed_matmul(x, packed, step, code_offset, bits, bias=None) -> y``: ``x @ W^T`` with
  ``W`` read as packed grid codes and a per-row step (dequant_matmul.py)
- ``int8_matmul(a, b, scale_a, scale_b, bias=None, out_dtype=...) -> y``: an int8 x int8 GEMM
  with int32 accumulation and the fp32 scale epilogue fused (int8_matmul.py)
- ``pack_mask`` / ``mask_to_bool``: the bit-packed mask format, torch side.
- ``python -m cage_kernels.compile_gate``: the compile gate (registers, spills, shared memory).

On CPU tensors the kernels run only under Triton's interpreter: set TRITON_INTERPRET=1
before this package is imported.
"""

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without triton
    raise ImportError(
        "cage_kernels needs the triton package (pip install 'cage-qat[triton]' or pip install triton); "
        "use backend='torch' to run without it"
    ) from err

from .adamw_cage import StepPlan, adamw_cage_step, kernel_can_step
from .dequant_matmul import packed_matmul, packed_matmul_supports
from .int8_matmul import Int8MatmulPlan, int8_matmul, int8_matmul_supports, plan_int8_matmul
from .fake_quant import ForwardPlan, fake_quant_codes, fake_quant_forward, mask_to_bool, pack_mask, plan_forward, supports
from .masked_backward import BackwardPlan, fake_quant_backward, plan_backward
from .quant_math import MASK_CLIP, MASK_NONE, MASK_TRUST

__all__ = [
    "BackwardPlan", "ForwardPlan", "fake_quant_codes", "plan_backward", "plan_forward",
    "MASK_CLIP", "MASK_NONE", "MASK_TRUST", "StepPlan", "adamw_cage_step", "packed_matmul", "packed_matmul_supports",
    "fake_quant_backward", "fake_quant_forward", "kernel_can_step", "mask_to_bool", "pack_mask", "supports",
    "Int8MatmulPlan", "int8_matmul", "int8_matmul_supports", "plan_int8_matmul",
]

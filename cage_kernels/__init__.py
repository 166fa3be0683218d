"""Fused Triton kernels of the CAGE QAT runtime (the "triton" backend of ``cage``).

``cage.functional.get_ops`` hands this module itself to the autograd function, so it
exposes the backend contract:

- ``quantize(x, config, rotate_back) -> (q, mask_state)``  (fake_quant.py)
- ``masked_grad(grad, mask_state, config, grad_is_rotated) -> grad_x``  (fake_quant_backward.py)
- ``mask_to_bool(mask_state, shape) -> bool tensor``  (mask_state: bit-packed uint8)
- ``adamw_cage_step_group(group, params, states, lambda_at)``  (adamw_cage.py)

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

from .adamw_cage import adamw_cage_step_group
from .fake_quant import mask_to_bool, quantize
from .fake_quant_backward import masked_grad

__all__ = ["adamw_cage_step_group", "mask_to_bool", "masked_grad", "quantize"]

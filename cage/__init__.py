"""CAGE quantization-aware training: QuEST quantizer, CAGE-AdamW, Llama QAT job."""

from .config import ALPHA, QuantConfig
from .functional import fake_quantize, quantize_dequantize
from .linear import QATLinear, prepare_qat, qat_param_groups
from .optim import CAGEAdamW, cage_lambda_at

__all__ = [
    "ALPHA",
    "CAGEAdamW",
    "QATLinear",
    "QuantConfig",
    "cage_lambda_at",
    "fake_quantize",
    "prepare_qat",
    "qat_param_groups",
    "quantize_dequantize",
]
__version__ = "0.1.0"

"""CAGE quantization-aware training: QuEST quantizer, CAGE-AdamW, Llama QAT job."""

from .config import ALPHA, QuantConfig
from .convert import QuantizedLinear, convert
from .functional import fake_quantize, quantize_dequantize
from .linear import QATLinear, prepare_qat, qat_param_groups
from .optim import CAGEAdamW, cage_lambda_at
from .serialize import load_quantized, read_header, save_quantized, size_report

__all__ = [
    "ALPHA",
    "CAGEAdamW",
    "QATLinear",
    "QuantConfig",
    "QuantizedLinear",
    "cage_lambda_at",
    "convert",
    "fake_quantize",
    "load_quantized",
    "prepare_qat",
    "qat_param_groups",
    "quantize_dequantize",
    "read_header",
    "save_quantized",
    "size_report",
]
__version__ = "0.1.0"

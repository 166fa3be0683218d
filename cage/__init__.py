"""CAGE quantization-aware training: QuEST quantizer, CAGE-AdamW, Llama QAT job.

``cage.hf`` (the Hugging Face round trip) is a lazy attribute: it is imported on first use, so
``import cage`` imports neither it nor transformers.
"""

import importlib as _importlib

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

_LAZY_MODULES = ("hf",)


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return _importlib.import_module(f".{name}", __name__)  # also sets the attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY_MODULES})


# transformers already imported: register quant_method "cage" with it now (importing cage.hf does);
# otherwise ``import cage.hf`` does it, and ``import cage`` stays without transformers
if _importlib.import_module("sys").modules.get("transformers") is not None:
    _importlib.import_module(".hf", __name__)

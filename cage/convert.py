"""After training: the converted (real low-bit) linear layer and ``convert(model)``.

A :class:`QuantizedLinear` keeps what the QAT layer's weight quantizer produces, and nothing
else: the integer grid index of every weight in the rotated domain, packed at its bit width
(:mod:`cage.packing`), and the per-row scale ``s`` at the quantizer's compute precision. Its
weight is rebuilt from them by the same fp32 operations, in the same order, as
``cage.naive.quantize`` rounds it, so a converted model's forward is bit-identical to the QAT
model's torch-backend forward. Activations are still fake-quantized at run time, by the same
function as in training.

With ``backend="triton"`` (CUDA tensors, or CPU ones under the interpreter) the forward instead
multiplies by the packed codes directly (``cage_kernels.packed_matmul``: tiles dequantized in
registers, fp32 accumulation), which agrees with the torch path to rounding, not bit for bit.
``backend="auto"`` keeps dequantize + ``F.linear`` on every device until the fused kernel has been
measured against it on a GPU (``benchmarks/bench_dequant_matmul.py``): at prefill sizes a Triton
tile loop may well lose to cuBLAS on the rebuilt weight. The torch path is the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import backend as _backend
from . import naive
from .config import QuantConfig
from .functional import fake_quantize
from .linear import QATLinear, autocast_activation
from .packing import pack_codes, packed_row_bytes, unpack_codes
from .ops import packed_linear
from .ops import qat_linear as _int8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, owner: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{owner}: weight_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _code_offset(config: QuantConfig) -> int:
    """Codes are ``c = k + offset`` in ``0 .. 2**b - 1``, where the level is ``(k - level_offset) d``:
    centered grid ``k = -(2**(b-1)) + 1 .. 2**(b-1)`` (SPEC 1), integer grid ``k = -(2**(b-1)) .. 2**(b-1) - 1``."""
    return config.levels // 2 - (0 if config.grid == "integer" else 1)


def _code_multiple(config: QuantConfig) -> int:
    """Signed integer codes are ``C = multiple * (k - level_offset)``: odd on the centered grid."""
    return 1 if config.grid == "integer" else 2


def _grid_step(s: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    # the same expression as naive.grid_level's step, so that the rebuilt levels match its bits
    return 2 * s / config.step_divisor


def quantize_to_codes(w: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of a weight [out, in]: uint8 grid codes of the rotated rows and the
    per-row scale [out, 1] in the quantizer's compute dtype (fp32, or fp64 for fp64 weights)."""
    x_h = w.to(naive.compute_dtype(w.dtype)).contiguous()  # as naive.quantize
    if config.hadamard:
        x_h = naive.block_rotate(x_h, config.block_size)
    s = naive.row_scale(x_h, config, naive.scale_cap(w.dtype))  # as naive.quantize
    level, _ = naive.grid_level(x_h, s, config)
    return (level + config.level_offset + _code_offset(config)).to(torch.uint8), s


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, config: QuantConfig, rotate_back: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The weight the quantizer gives for these codes and scale: ``Q(w)`` (``rotate_back``) or the
    rotated-domain ``q(w_h)``, in ``dtype``; bit for bit what ``naive.quantize`` returns."""
    with torch.autocast(scale.device.type, enabled=False):  # the quantizer's math is fp32 by contract
        k = codes.to(scale.dtype) - _code_offset(config)
        q = (k - config.level_offset) * _grid_step(scale, config)
        if config.hadamard and rotate_back:
            q = naive.block_rotate(q, config.block_size)
    return q.to(dtype)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear multiplies x in: autocast's when it is on for x's device."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored as packed grid codes plus one scale per row.

    Buffers: ``packed_weight`` (uint8 [out, ceil(in * bits / 8)]) and ``weight_scale``
    ([out, 1], fp32; fp64 for fp64 weights). ``weight_dtype`` is the dtype the rebuilt weight
    takes (the trained weight's); ``model.to(dtype)`` changes it and keeps the scale exact.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_quant: QuantConfig,
        act_quant: QuantConfig | None = None,
        weight_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        matmul: str = "auto",
        device=None,
    ):
        super().__init__()
        _int8.check_matmul_name(matmul, "QuantizedLinear")
        for name, cfg in (("weight_quant", weight_quant), ("act_quant", act_quant)):
            if cfg is None and name == "act_quant":
                continue
            if not isinstance(cfg, QuantConfig):
                raise TypeError(f"QuantizedLinear: {name} must be a QuantConfig, got {cfg!r}")
            cfg.check_row_length(in_features)
        if weight_dtype not in DTYPES.values():
            raise ValueError(f"QuantizedLinear: weight_dtype must be one of {list(DTYPES.values())}, got {weight_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_quant, self.act_quant = weight_quant, act_quant
        self.weight_dtype, self.backend = weight_dtype, backend
        # runtime choice of the product, as QATLinear's (not part of the saved model)
        self.matmul = matmul
        self._signed_codes = None  # (key, int8 codes, fp32 d/2): derived from the buffers, rebuilt when they change
        row_bytes = packed_row_bytes(in_features, weight_quant.bits)
        self.register_buffer("packed_weight", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device))
        scale_dtype = naive.compute_dtype(weight_dtype)
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device)) if bias else None

    @classmethod
    def from_qat(cls, layer: QATLinear) -> "QuantizedLinear":
        """The converted form of a QATLinear that has a weight quantizer."""
        if layer.weight_quant is None:
            raise ValueError("QuantizedLinear.from_qat: the layer has no weight quantizer (weight_quant=None)")
        w = layer.weight.detach()
        if not torch.isfinite(w).all():
            raise ValueError("QuantizedLinear.from_qat: the weight has non-finite values (inf or nan)")
        new = cls(
            layer.in_features, layer.out_features, layer.bias is not None, weight_quant=layer.weight_quant,
            act_quant=layer.act_quant, weight_dtype=w.dtype, backend=layer.backend, matmul=layer.matmul,
            device=w.device,
        )
        codes, scale = quantize_to_codes(w, layer.weight_quant)
        with torch.no_grad():
            new.packed_weight.copy_(pack_codes(codes, layer.weight_quant.bits))
            new.weight_scale.copy_(scale)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        new.train(layer.training)
        rotate_back = new.rotates_weight_back()
        expected = naive.quantize(w, layer.weight_quant, rotate_back)[0]
        if not torch.equal(new.dequantize_weight(rotate_back), expected):
            raise RuntimeError("QuantizedLinear.from_qat: the packed weight does not rebuild the quantized weight exactly")
        return new

    def rotates_weight_back(self) -> bool:
        """False when weight and activations share one rotation, as QATLinear then multiplies in
        the rotated domain."""
        return not QATLinear._shares_rotation(self)  # the same rule as the layer it replaces

    def codes(self) -> torch.Tensor:
        """The uint8 grid codes [out, in] of the rotated weight rows."""
        return unpack_codes(self.packed_weight, self.weight_quant.bits, self.in_features)

    def dequantize_weight(self, rotate_back: bool = True) -> torch.Tensor:
        """``Q(w)`` in the input space, or the rotated-domain ``q(w_h)`` with ``rotate_back=False``."""
        return dequantize_codes(self.codes(), self.weight_scale, self.weight_quant, rotate_back, self.weight_dtype)

    def signed_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, code_scale)``: int8 signed codes [out, in] of the rotated rows (centered grid
        ``2c - (L - 1)``, integer grid ``k``) and fp32 ``code_scale`` [out] (``d / 2`` or ``d``), so that
        ``C * code_scale`` is the rotated-domain weight (the QAT layer's integer product's weight
        operand, bit for bit). Cached until a buffer changes."""
        key = (self.packed_weight.data_ptr(), self.packed_weight._version, self.weight_scale.data_ptr(),
               self.weight_scale._version, self.weight_scale.dtype)
        if self._signed_codes is None or self._signed_codes[0] != key:
            config = self.weight_quant
            multiple = _code_multiple(config)
            k = self.codes().to(torch.int16) - _code_offset(config)
            signed = (multiple * k - int(multiple * config.level_offset)).to(torch.int8)
            scale = (_grid_step(self.weight_scale, config) / multiple).reshape(-1).to(torch.float32)
            self._signed_codes = (key, signed, scale)
        return self._signed_codes[1], self._signed_codes[2]

    def _int8_takes(self, x: torch.Tensor) -> bool:
        """The integer product (``matmul="int8"`` / ``"int8-fused"``) runs for this call: the
        activations have codes in the weight's basis (7 bits at most), no gradient is asked
        for, and the shape is the product's (decode sizes, M <= 16, are not torch._int_mm's on
        CUDA: they take the next path)."""
        matmul = _int8.resolve_matmul(self.matmul)
        if matmul == "dequant" or self.act_quant is None:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return False
        return _int8.int8_product_takes(matmul, x, self.out_features, self.weight_dtype, self.weight_quant,
                                        self.act_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Precedence: the integer product (matmul="int8" / "int8-fused", when it takes the call),
        # then the fused packed-code matmul (backend="triton"), then dequantize + F.linear.
        if self._int8_takes(x):
            codes_w, half_w = self.signed_codes()
            return _int8.int8_linear_inference(autocast_activation(x), codes_w, half_w, self.bias, self.act_quant,
                                               self.backend, _int8.resolve_matmul(self.matmul),
                                               self.weight_quant.max_code)
        rotate_back = self.rotates_weight_back()
        if self.act_quant is not None:
            x = fake_quantize(autocast_activation(x), self.act_quant, backend=self.backend, rotate_back=rotate_back)
        matmul_dtype = _matmul_dtype(x)
        if self._fused_matmul_takes(x, matmul_dtype):
            return packed_linear.packed_linear(
                x.to(matmul_dtype), self.packed_weight, _grid_step(self.weight_scale, self.weight_quant).reshape(-1),
                _code_offset(self.weight_quant), self.weight_quant, self.bias, rotate_back,
            )
        return F.linear(x, self.dequantize_weight(rotate_back), self.bias)

    def _fused_matmul_takes(self, x: torch.Tensor, matmul_dtype: torch.dtype) -> bool:
        """Whether the fused kernel (weight read as packed codes) computes this forward: the
        layer asked for Triton (``backend="triton"``; "auto" keeps the torch path until the
        kernel is measured, see the module docstring), and the dtypes are the kernel's. Anything
        else (fp64, a dtype mismatch F.linear is to report) takes the torch path."""
        if self.backend != "triton" or _backend.resolve(self.backend, x.device, "QuantizedLinear") != "triton":
            return False
        same_dtype = x.dtype == self.weight_dtype or torch.is_autocast_enabled(x.device.type)
        return same_dtype and packed_linear.packed_linear_takes(matmul_dtype, self.weight_scale.dtype)

    def _apply(self, fn, recurse=True):
        # A dtype change (model.to(torch.bfloat16)) sets the rebuilt weight's dtype; the scale
        # keeps the quantizer's precision, so the codes keep meaning the same levels.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_dtype = self.weight_scale.dtype
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_quant={self.weight_quant}, act_quant={self.act_quant}, weight_dtype={dtype_name(self.weight_dtype)}"
        )


# ---- a layer's description, as stored in file headers ------------------------------------

LAYER_KINDS = ("quantized", "qat")


def layer_spec(module: nn.Module) -> dict:
    """What defines a QuantizedLinear or QATLinear apart from its tensors (JSON-ready)."""
    if isinstance(module, QuantizedLinear):
        kind, dtype = "quantized", module.weight_dtype
    elif isinstance(module, QATLinear):
        kind, dtype = "qat", module.weight.dtype
    else:
        raise TypeError(f"layer_spec: expected a QuantizedLinear or QATLinear, got {type(module).__name__}")
    return {
        "kind": kind,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "weight_dtype": dtype_name(dtype),
        "weight_quant": module.weight_quant.to_dict() if module.weight_quant is not None else None,
        "act_quant": module.act_quant.to_dict() if module.act_quant is not None else None,
    }


def _config_or_none(d, owner: str) -> QuantConfig | None:
    if d is None:
        return None
    try:
        return QuantConfig.from_dict(d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: {err}") from None


def layer_from_spec(spec: dict, name: str, *, device=None, backend: str = "auto") -> nn.Module:
    """An empty layer (tensors to be loaded) as ``spec`` (from :func:`layer_spec`) describes it."""
    owner = f"layer {name!r}"
    if spec.get("kind") not in LAYER_KINDS:
        raise ValueError(f"{owner}: kind must be one of {LAYER_KINDS}, got {spec.get('kind')!r}")
    wq = _config_or_none(spec["weight_quant"], f"{owner} weight_quant")
    aq = _config_or_none(spec["act_quant"], f"{owner} act_quant")
    dtype = dtype_from_name(spec["weight_dtype"], owner)
    dims = spec["in_features"], spec["out_features"], spec["bias"]
    if spec["kind"] == "quantized":
        if wq is None:
            raise ValueError(f"{owner}: a quantized layer needs a weight_quant")
        return QuantizedLinear(*dims, weight_quant=wq, act_quant=aq, weight_dtype=dtype, backend=backend, device=device)
    return QATLinear(*dims, weight_quant=wq, act_quant=aq, backend=backend, device=device, dtype=dtype)


def spec_differences(expected: dict, actual: dict, fields=None, prefix: str = "") -> list[str]:
    """``field is X in the file, Y in the model`` for every field (of ``fields``, default all)
    that differs; QuantConfig dicts are compared field by field."""
    keys = fields if fields is not None else sorted(set(expected) | set(actual))
    out = []
    for k in keys:
        a, b = expected.get(k), actual.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_differences(a, b, prefix=f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} is {a!r} in the file, {b!r} in the model")
    return out


# ---- the model-level step ----------------------------------------------------------------


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every QATLinear that has a weight quantizer by a QuantizedLinear.

    The converted model's forward equals the QAT model's (torch backend) bit for bit. A
    QATLinear without a weight quantizer (activations only) has nothing to pack and stays.
    Returns ``model``.
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear) and m.weight_quant is not None]
    for name, layer in targets:
        try:
            new = QuantizedLinear.from_qat(layer)
        except ValueError as err:
            raise ValueError(f"convert: layer {name!r}: {err}") from None
        set_module(model, name, new)
    return model


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

"""compressed-tensors export of a converted Hugging Face model, through the compressed-tensors library
(``pip install -e ".[compressed-tensors]"`` in the checkout; it needs Python >= 3.11 and torch >= 2.10).

A converted layer's weight is integer codes times one scale per row, in the Hadamard-rotated basis
(SPEC 1, "Integer codes"): ``q(W_h) = C * code_scale`` with odd ``C = 2c - (L - 1)`` and
``code_scale = d / 2`` on the centered grid, ``C = k`` and ``code_scale = d`` on the integer grid.
compressed-tensors stores exactly that: symmetric channel-wise integer weights with one scale per
output channel, and the rotation as a ``transform_config``: an online ``hadamard`` transform
(Sylvester order, 1/sqrt(B), ``head_dim`` = the block size B) at each Linear's ``input``, its inverse
folded into ``weight_input`` (SPEC 6). So the stored model is the converted model, weights exactly,
with an fp32 scale; only the activation quantizer changes (none, or int8 per token).

Schemes (``SCHEMES``):

- ``w8a16``: 8-bit ``pack-quantized`` int8 weights (vLLM takes weight-only int8 only so);
- ``w8a8``: ``int-quantized`` int8 weights plus dynamic per-token symmetric int8 activations;
- ``w4a16``: 4-bit ``pack-quantized`` int4 weights, for integer-grid models of 2 to 4 bits (centered
  levels are half-integers: a 4-bit format would need a zero point of 7.5).

Everything vLLM needs to run the transforms is checked before anything is written, each as a
one-line ValueError: no bias on a rotated layer, one input transform per fused module (q/k/v and
gate/up parts share a block size), one block size per transform scheme (a scheme per block size).
The recipe: build the plain architecture, ``apply_transform_config`` (which hooks the online input
transforms), overwrite each weight with ``C * code_scale``, ``apply_quantization_config`` (frozen),
set ``weight_scale = code_scale`` and a zero zero point, ``ModelCompressor.from_pretrained_model``,
``compress_model``, ``save_pretrained``, ``update_config``; the compressed codes are read back and
checked against ours before the files are written.

A bf16 scale (``scale_dtype=torch.bfloat16``) keeps every code (``|C| <= 127`` times a relative scale
error of at most 2**-9 stays within half a step) but multiplies each output row by ``1 + e_row``,
``|e_row| <= 2**-9``: no longer exact, an output error of up to 0.2% per layer.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from .convert import QuantizedLinear, convert, set_module
from .linear import QATLinear


@dataclasses.dataclass(frozen=True)
class Scheme:
    weight_bits: int
    format: str  # compressed-tensors' CompressionFormat value
    activations: bool  # dynamic per-token int8 input activations


SCHEMES = {
    "w8a16": Scheme(8, "pack-quantized", False),
    "w8a8": Scheme(8, "int-quantized", True),
    "w4a16": Scheme(4, "pack-quantized", False),
}
TRANSFORM_NAME = "quest"  # the transform scheme's name: its modules are ``<layer>.quest_input``
# vLLM's fused modules of Llama-style models (packed_modules_mapping): their parts share one input transform
FUSED_PARTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
OUTPUT_HEAD = "lm_head"


def _import_compressed_tensors():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:
        raise ImportError("the compressed-tensors export needs the compressed-tensors package "
                          "(in the checkout: pip install -e '.[compressed-tensors]'; Python >= 3.11, torch >= 2.10)") from err


def _block(layer: QuantizedLinear) -> int | None:
    cfg = layer.weight_quant
    return cfg.block_size if cfg.hadamard else None


def check_exportable(model: nn.Module, scheme: str) -> dict[str, QuantizedLinear]:
    """The converted layers to export as ``scheme``, after every check (a one-line ValueError each):
    the codes fit the scheme's integers, rotated layers have no bias, fused parts share a block."""
    if scheme not in SCHEMES:
        raise ValueError(f"--scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    bits = SCHEMES[scheme].weight_bits
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise ValueError("compressed-tensors export: the model has no quantized layer (nothing to store as integers; "
                         "a bf16 run is served as it is: --format hf)")
    for name, layer in layers.items():
        cfg = layer.weight_quant
        if bits == 4 and cfg.grid != "integer":
            raise ValueError(
                f"--scheme w4a16 needs the integer grid, and layer {name!r} has the {cfg.grid} grid: its levels "
                "(k - 1/2) d would need a zero point of 7.5, which int4 formats do not store; use --scheme w8a16 "
                "or w8a8 (exact for the centered grid up to 7 bits), or train with --grid integer")
        if not cfg.codes_fit_int(bits):
            raise ValueError(
                f"--scheme {scheme}: layer {name!r} has {cfg.bits}-bit {cfg.grid}-grid codes (|C| up to {cfg.max_code}), "
                f"which do not fit int{bits}; "
                + ("use --scheme w8a16 or w8a8" if bits == 4 else "an 8-bit centered grid has no int8 form"))
        if _block(layer) is not None and layer.bias is not None:
            raise ValueError(f"compressed-tensors export: layer {name!r} has a bias, and vLLM runs the online Hadamard "
                             "transform only on layers without one")
    modules = dict(model.named_modules())
    for parent_name, parent in modules.items():
        for parts in FUSED_PARTS:
            if not all(hasattr(parent, p) for p in parts):
                continue
            prefix = f"{parent_name}." if parent_name else ""
            seen = {p: (f"{prefix}{p}" in layers, _block(layers[f"{prefix}{p}"]) if f"{prefix}{p}" in layers else None)
                    for p in parts}
            if len(set(seen.values())) > 1:
                desc = ", ".join(f"{p} {'block ' + str(b) if q and b else ('unrotated' if q else 'not quantized')}"
                                 for p, (q, b) in seen.items())
                raise ValueError(f"compressed-tensors export: vLLM fuses {prefix}{{{','.join(parts)}}} into one layer "
                                 f"with one input transform, but its parts differ: {desc}")
    return layers


def transform_config(layers: dict[str, QuantizedLinear], unquantized: list[str]):
    """The Hadamard ``TransformConfig``: one scheme per block size (vLLM: one block size per scheme),
    with the online ``input`` transform and its inverse folded into ``weight_input``; None when no
    layer is rotated."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    by_block: dict[int, list[str]] = {}
    for name, layer in layers.items():
        if _block(layer) is not None:
            by_block.setdefault(_block(layer), []).append(name)
    if not by_block:
        return None
    if len(by_block) == 1 and len(next(iter(by_block.values()))) == len(layers) and unquantized == [OUTPUT_HEAD]:
        targets, ignore = ["Linear"], [OUTPUT_HEAD]  # the usual case, as llm-compressor writes it
        groups = {TRANSFORM_NAME: (next(iter(by_block)), targets, ignore)}
    else:
        groups = {(TRANSFORM_NAME if len(by_block) == 1 else f"{TRANSFORM_NAME}{b}"): (b, names, [])
                  for b, names in sorted(by_block.items())}
    return TransformConfig(config_groups={
        name: TransformScheme(type="hadamard", head_dim=block, apply=[
            TransformArgs(targets=targets, location="input", ignore=ignore),
            TransformArgs(targets=targets, location="weight_input", inverse=True, ignore=ignore),
        ]) for name, (block, targets, ignore) in groups.items()
    })


def _quantization_config(scheme: Scheme, unquantized: list[str], scale_dtype: torch.dtype):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(num_bits=scheme.weight_bits, type="int", symmetric=True, strategy="channel",
                               dynamic=False, **({} if scale_dtype == torch.float32 else {"scale_dtype": scale_dtype}))
    inputs = (QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
              if scheme.activations else None)
    group = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    return QuantizationConfig(config_groups={"group_0": group}, ignore=unquantized, quantization_status="frozen")


def _stored_codes(module: nn.Module, scheme: Scheme) -> torch.Tensor:
    """The integer weights compressed-tensors holds for a compressed module, as int8 [out, in]."""
    if scheme.format == "pack-quantized":
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        return unpack_from_int32(module.weight_packed, scheme.weight_bits, torch.Size(module.weight_shape.tolist()))
    return module.weight.to(torch.int8)


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, directory, scheme: str, *, scale_dtype: torch.dtype = torch.float32
                              ) -> dict:
    """Write ``model`` (a Hugging Face causal LM, converted or prepared: QAT layers are converted on a
    copy) to ``directory`` as a compressed-tensors checkpoint of ``scheme``; ``model`` is not changed.
    Returns ``{"scheme", "format", "quantized_layers", "transform_blocks", "file_bytes"}``."""
    _import_compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.transform import apply_transform_config

    if scale_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"export_compressed_tensors: scale_dtype must be torch.float32 or torch.bfloat16, got {scale_dtype}")
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"export_compressed_tensors: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if any(isinstance(m, QATLinear) and m.weight_quant is not None for m in model.modules()):
        model = convert(copy.deepcopy(model))
    layers = check_exportable(model, scheme)
    spec = SCHEMES[scheme]
    unquantized = [n for n, m in model.named_modules() if type(m) is nn.Linear or
                   (isinstance(m, QATLinear) and n not in layers)]
    tconfig = transform_config(layers, unquantized)

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    plain = type(model)._from_config(config, dtype=dtype).eval()
    for name, layer in layers.items():  # float Linear layers, filled below
        set_module(plain, name, nn.Linear(layer.in_features, layer.out_features, layer.bias is not None,
                                          dtype=torch.float32))
    source = model.state_dict()
    others = {k: v for k, v in source.items() if k.rpartition(".")[0] not in layers}
    missing = [k for k in plain.load_state_dict(others, strict=False).missing_keys if k.rpartition(".")[0] not in layers]
    if missing:
        raise RuntimeError(f"export_compressed_tensors: tensors of the plain model were not filled: {missing[:5]}")
    if tconfig is not None:
        apply_transform_config(plain, tconfig)  # online input hooks; weight_input is overwritten next
    codes = {}
    for name, layer in layers.items():
        c, code_scale = layer.signed_codes()
        codes[name] = (c, code_scale)
        target = plain.get_submodule(name)
        target.weight.copy_(c.to(torch.float32) * code_scale[:, None])  # the rotated-domain q(W_h), exact in fp32
        if layer.bias is not None:
            target.bias.copy_(layer.bias)
    apply_quantization_config(plain, _quantization_config(spec, unquantized, scale_dtype))
    for name, (_, code_scale) in codes.items():
        target = plain.get_submodule(name)
        target.weight_scale = nn.Parameter(code_scale[:, None].to(scale_dtype), requires_grad=False)
        if hasattr(target, "weight_zero_point"):
            target.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(plain, spec.format)
    compressor.compress_model(plain)
    for name, (c, _) in codes.items():
        if not torch.equal(_stored_codes(plain.get_submodule(name), spec), c):
            raise RuntimeError(f"export_compressed_tensors: layer {name!r}: the compressed codes differ from the model's")
    directory = Path(directory)
    plain.save_pretrained(str(directory))
    compressor.update_config(str(directory))
    return {
        "scheme": scheme, "format": spec.format, "quantized_layers": len(layers),
        "transform_blocks": sorted({_block(m) for m in layers.values() if _block(m) is not None}),
        "file_bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors")),
    }

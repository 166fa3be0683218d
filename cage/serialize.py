"""Saving and loading converted models: packed codes, scales, the other tensors and a JSON header.

The file is a safetensors file when the ``safetensors`` package is installed (the header rides in
its metadata under ``"cage"``), else a ``torch.save`` archive ``{"cage": header, "tensors": ...}``
read back with ``weights_only=True``. Either is recognised on load by its first bytes. The header
holds the format version, every quantized (or activation-only QAT) layer's name, shape and
QuantConfigs (:func:`cage.convert.layer_spec`), and a free ``extra`` dict for the application
(for example the model's shape). Loading checks the file against the model and names the first
layer or tensor that differs; nothing is reinterpreted.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from .convert import QuantizedLinear, layer_from_spec, layer_spec, set_module, spec_differences
from .linear import QATLinear

FORMAT = "cage-quantized"
FORMAT_VERSION = 1
HEADER_KEY = "cage"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save archives are zip files


def safetensors_installed() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a file describes: every QuantizedLinear and QATLinear, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QATLinear))}


def build_header(model: nn.Module, extra: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layers": {name: layer_spec(m) for name, m in quantized_layers(model).items()},
        "extra": extra or {},
    }


# ---- sizes -----------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_report(model: nn.Module) -> dict:
    """Bytes of the model as stored (packed layers, the rest in its own dtype) against a bf16
    checkpoint of the same model (2 bytes per value)."""
    layers = {n: m for n, m in quantized_layers(model).items() if isinstance(m, QuantizedLinear)}
    quant_keys = set()
    packed = packed_bf16 = 0
    for name, m in layers.items():
        prefix = f"{name}." if name else ""
        tensors = {"packed_weight": m.packed_weight, "weight_scale": m.weight_scale}
        if m.bias is not None:
            tensors["bias"] = m.bias
        quant_keys |= {prefix + k for k in tensors}
        packed += sum(_bytes(t) for t in tensors.values())
        packed_bf16 += 2 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
    other = other_bf16 = 0
    for key, t in _unique_state(model).items():
        if key not in quant_keys:
            other += _bytes(t)
            other_bf16 += 2 * t.numel() if t.is_floating_point() else _bytes(t)
    return {
        "quantized_layers": len(layers),
        "quantized_bytes": packed,
        "quantized_bf16_bytes": packed_bf16,
        "other_bytes": other,
        "other_bf16_bytes": other_bf16,
        "total_bytes": packed + other,
        "total_bf16_bytes": packed_bf16 + other_bf16,
    }


def format_size_report(report: dict) -> str:
    """The size report as a small table (MiB and the ratio to bf16)."""
    def row(label, stored, bf16):
        ratio = f"{stored / bf16:.3f}x" if bf16 else "-"
        return f"| {label} | {stored / 2**20:.3f} | {bf16 / 2**20:.3f} | {ratio} |"

    lines = [
        "| part | stored MiB | bf16 MiB | stored / bf16 |",
        "|---|---|---|---|",
        row(f"quantized layers ({report['quantized_layers']})", report["quantized_bytes"], report["quantized_bf16_bytes"]),
        row("other tensors", report["other_bytes"], report["other_bf16_bytes"]),
        row("total", report["total_bytes"], report["total_bf16_bytes"]),
    ]
    if "file_bytes" in report:
        lines.append(f"file on disk: {report['file_bytes'] / 2**20:.3f} MiB")
    return "\n".join(lines)


# ---- writing -----------------------------------------------------------------------------


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, detached, contiguous, on the CPU; a tensor that shares storage with an
    earlier one (tied weights) is copied, as safetensors refuses shared storage."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        t = t.detach()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        t = t.to("cpu").contiguous()
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _check_savable(model: nn.Module) -> None:
    for name, m in quantized_layers(model).items():
        if isinstance(m, QATLinear) and m.weight_quant is not None:
            raise ValueError(
                f"save_quantized: layer {name!r} is a QATLinear with a weight quantizer, not converted yet; "
                "call cage.convert(model) first"
            )


def save_quantized(model: nn.Module, path, *, extra: dict | None = None) -> dict:
    """Write a converted model to ``path``; return :func:`size_report` plus ``file_bytes``.

    ``extra``: JSON-serialisable values stored in the header (read back by :func:`read_header`).
    """
    _check_savable(model)
    header = build_header(model, extra)
    try:
        header_json = json.dumps(header, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"save_quantized: extra must be JSON-serialisable: {err}") from None
    tensors = _unique_state(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if safetensors_installed():
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={HEADER_KEY: header_json})
    else:
        torch.save({HEADER_KEY: header_json, "tensors": tensors}, tmp)
    os.replace(tmp, path)
    return {**size_report(model), "file_bytes": path.stat().st_size}


# ---- reading -----------------------------------------------------------------------------


def _check_header(header, path) -> dict:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cage quantized model file (no {FORMAT!r} header)")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {header.get('version')!r}; this cage reads version {FORMAT_VERSION}"
        )
    return header


def _read(path, tensors: bool) -> tuple[dict, dict | None]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized model file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == _ZIP_MAGIC:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or HEADER_KEY not in blob:
            raise ValueError(f"{path}: not a cage quantized model file (a torch archive without a {HEADER_KEY!r} header)")
        return _check_header(json.loads(blob[HEADER_KEY]), path), (blob.get("tensors") if tensors else None)
    if not safetensors_installed():
        raise ValueError(
            f"{path}: not a torch.save archive; if it is a safetensors file, install safetensors (pip install safetensors)"
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if HEADER_KEY not in meta:
                raise ValueError(f"{path}: not a cage quantized model file (no {HEADER_KEY!r} metadata)")
            header = _check_header(json.loads(meta[HEADER_KEY]), path)
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file: {err}") from None
    return header, data


def read_header(path) -> dict:
    """The JSON header of a file written by :func:`save_quantized` (format checked)."""
    return _read(path, tensors=False)[0]


def _module_spec_for_compare(module: nn.Module, spec: dict) -> dict:
    """The fields of ``spec`` that ``module`` (a plain nn.Linear, QATLinear or QuantizedLinear) pins."""
    if isinstance(module, (QuantizedLinear, QATLinear)):
        mine = layer_spec(module)
        if isinstance(module, QATLinear) and spec["kind"] == "quantized":
            mine["kind"] = "quantized"  # a prepared skeleton is converted per the file
        return mine
    return {
        "in_features": module.in_features, "out_features": module.out_features,
        "bias": module.bias is not None, "weight_dtype": str(module.weight.dtype).removeprefix("torch."),
    }


def _rebuild_layers(header: dict, model: nn.Module, path, backend: str) -> list[tuple[str, nn.Module]]:
    """Check every layer against the file, then swap in the layers the file needs; return the
    ``(name, replaced module)`` pairs, so that a failed load can put them back."""
    file_layers = header["layers"]
    swaps = []
    for name in quantized_layers(model):
        if name not in file_layers:
            raise ValueError(f"{path}: the model's quantized layer {name!r} is not in the file")
    for name, spec in file_layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the file's layer {name!r} does not exist in the model") from None
        if not isinstance(module, nn.Linear) and not isinstance(module, QuantizedLinear):
            raise ValueError(f"{path}: layer {name!r} is a {type(module).__name__} in the model, not a linear layer")
        mine = _module_spec_for_compare(module, spec)
        diffs = spec_differences(spec, mine, fields=sorted(mine))
        if diffs:
            raise ValueError(f"{path}: layer {name!r}: " + "; ".join(diffs))
        plain = isinstance(module, nn.Linear) and not isinstance(module, QATLinear)
        if plain or (isinstance(module, QATLinear) and spec["kind"] == "quantized"):
            keep_backend = getattr(module, "backend", backend)
            swaps.append((name, module, layer_from_spec(spec, name, device=module.weight.device, backend=keep_backend)))
    for name, _, new in swaps:
        set_module(model, name, new)
    return [(name, old) for name, old, _ in swaps]


def check_tensors(tensors: dict, model: nn.Module, path) -> None:
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing:
        raise ValueError(f"{path}: the model has tensors the file lacks: {missing[:5]}")
    if unexpected:
        raise ValueError(f"{path}: the file has tensors the model lacks: {unexpected[:5]}")
    for key, t in tensors.items():
        mine = state[key]
        if t.shape != mine.shape or t.dtype != mine.dtype:
            raise ValueError(
                f"{path}: tensor {key!r} is {t.dtype} {list(t.shape)} in the file, "
                f"{mine.dtype} {list(mine.shape)} in the model"
            )


@torch.no_grad()
def load_quantized(path, model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model``, in place; return it.

    ``model`` is a skeleton of the same architecture: plain (its linear layers are replaced as
    the file says), prepared (its QATLinear layers must carry the file's QuantConfigs and are
    converted) or converted (its layers must match the file). Any difference of layer, shape,
    dtype or QuantConfig is a ValueError that names the layer or tensor and the field.
    ``backend`` is the activation quantizer's backend of layers that the load creates from
    plain linears.
    """
    header, tensors = _read(path, tensors=True)
    replaced = _rebuild_layers(header, model, path, backend)
    try:
        check_tensors(tensors, model, path)
    except ValueError:
        for name, old in replaced:  # a failed load leaves the model as it was
            set_module(model, name, old)
        raise
    model.load_state_dict(tensors, strict=True)
    return model

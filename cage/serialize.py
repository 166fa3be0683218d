"""Saving and loading converted models: packed codes, scales, the other tensors and a JSON header.

The file is a safetensors file when the ``safetensors`` package is installed (the header rides in
its metadata under ``"cage"``), else a ``torch.save`` archive ``{"cage": header, "tensors": ...}``
read back with ``weights_only=True``. Either is recognised on load by its first bytes. The header
holds the format version, every quantized (or activation-only QAT) layer's name, shape and
QuantConfigs (:func:`cage.convert.layer_spec`), and a free ``extra`` dict for the application
(for example the model's shape). Loading checks the file against the model and names the first
layer or tensor that differs; nothing is reinterpreted. The whole file is checked (its structure,
every layer spec, every tensor's name, dtype and shape, every row scale finite and > 0) before the
model changes at all, and a load that fails after that puts the model's layers back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .backend import check_backend_name
from .convert import QuantizedLinear, layer_from_spec, layer_spec, set_module, spec_differences
from .linear import QATLinear

FORMAT = "cage-quantized"
# 2: layer specs may hold the integer grid (QuantConfig.grid). Version 1 files have no grid and load as
# the centered grid; a reader of version 1 refuses version 2 files, so none misreads integer-grid codes.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_KEY = "cage"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save archives are zip files


def readable_versions() -> str:
    """``versions 1 and 2``: the versions this reader takes, for error messages."""
    *first, last = READABLE_VERSIONS
    return f"versions {', '.join(map(str, first))} and {last}" if first else f"version {last}"


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


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"save_quantized: path: {path} is a folder; give a file path such as "
                         f"{path / 'model.safetensors'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_quantized: path: the folder {path.parent} does not exist; path must be a file "
                                "in an existing folder (create the folder first)")


def save_quantized(model: nn.Module, path, *, extra: dict | None = None, allow_unquantized: bool = False) -> dict:
    """Write a converted model to ``path``; return :func:`size_report` plus ``file_bytes``.

    A model without any QuantizedLinear or QATLinear layer (``prepare_qat`` forgotten, or a model
    that is not the prepared one) is an error; ``allow_unquantized=True`` writes it as it is (a
    float baseline in the same format).

    ``extra``: JSON-serialisable values stored in the header (read back by :func:`read_header`).
    ``path`` is a file in an existing folder (a missing folder or a folder as ``path`` is a one-line
    error before anything is written).
    """
    _check_path(Path(path))
    if not isinstance(allow_unquantized, bool):
        raise TypeError(f"save_quantized: allow_unquantized must be True or False, got {allow_unquantized!r}")
    if not allow_unquantized and not quantized_layers(model):
        raise ValueError(
            f"save_quantized: the model ({type(model).__name__}) has no QuantizedLinear or QATLinear layer, so nothing "
            "is quantized: prepare it with cage.prepare_qat, train, then cage.convert (or pass allow_unquantized=True "
            "to write it unquantized)"
        )
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
    if header.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format version {header.get('version')!r}; this cage reads {readable_versions()}")
    layers = header.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in layers.items()):
        raise ValueError(f"{path}: the header's 'layers' is not a dict of layer specs")
    if not isinstance(header.get("extra", {}), dict):
        raise ValueError(f"{path}: the header's 'extra' is not a dict")
    return header


def _parse_header(text, path) -> dict:
    if not isinstance(text, str):
        raise ValueError(f"{path}: the {HEADER_KEY!r} header is a {type(text).__name__}, not JSON text")
    try:
        return _check_header(json.loads(text), path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {HEADER_KEY!r} header is not valid JSON ({err})") from None


def _check_tensor_dict(tensors, path) -> dict:
    """``tensors`` is a dict of names to tensors, or a ValueError naming the file."""
    if tensors is None:
        raise ValueError(f"{path}: the archive has no 'tensors'")
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: the archive's 'tensors' is a {type(tensors).__name__}, not a dict")
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: tensor name {key!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: {key!r} is a {type(t).__name__}, not a tensor")
    return tensors


def _torch_archive(path):
    """``torch.load(path, weights_only=True)`` with one-line errors for a refused or unreadable file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"it calls {found.group(1)}, which weights_only loading does not allow" if found else str(err).splitlines()[0]
        raise ValueError(f"{path}: refused: {what} (torch archives load with weights_only=True; nothing from the file ran)") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable torch archive ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


# safetensors' dtype names -> torch dtypes (for shapes read without the data)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def safetensors_shapes(f, path) -> dict[str, torch.Tensor]:
    """The tensors of an open safetensors file as meta tensors (names, dtypes, shapes; no data read)."""
    out = {}
    for key in f.keys():
        view = f.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
        if dtype is None:
            raise ValueError(f"{path}: tensor {key!r} has the dtype {view.get_dtype()!r}, which cage does not read")
        out[key] = torch.empty(view.get_shape(), dtype=dtype, device="meta")
    return out


def _read(path, tensors: bool | str) -> tuple[dict, dict | None]:
    """The header and (``tensors=True``) the tensors, or (``"meta"``) meta tensors of their shapes
    (a safetensors file's data is then not read; a torch archive's is, to find them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized model file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == _ZIP_MAGIC:
        blob = _torch_archive(path)
        if not isinstance(blob, dict) or HEADER_KEY not in blob:
            raise ValueError(f"{path}: not a cage quantized model file (a torch archive without a {HEADER_KEY!r} header)")
        header = _parse_header(blob[HEADER_KEY], path)
        return header, (_check_tensor_dict(blob.get("tensors"), path) if tensors else None)
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
            header = _parse_header(meta[HEADER_KEY], path)
            if tensors == "meta":
                data = safetensors_shapes(f, path)
            else:
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
        if isinstance(module, QATLinear) and spec.get("kind") == "quantized":
            mine["kind"] = "quantized"  # a prepared skeleton is converted per the file
        return mine
    return {
        "in_features": module.in_features, "out_features": module.out_features,
        "bias": module.bias is not None, "weight_dtype": str(module.weight.dtype).removeprefix("torch."),
    }


def _plan_layers(header: dict, model: nn.Module, path, backend: str) -> list[tuple[str, nn.Module, nn.Module]]:
    """Check every layer against the file and build (not yet swap in) the layers the file needs;
    return ``(name, the model's module, its replacement)`` triples. The model is not changed."""
    file_layers = header["layers"]
    swaps = []
    for name in quantized_layers(model):
        if name not in file_layers:
            raise ValueError(f"{path}: the model's quantized layer {name!r} is not in the file")
    for name, spec in file_layers.items():
        try:
            module = model.get_submodule(name) if name else None
        except AttributeError:
            module = None
        if module is None:
            raise ValueError(f"{path}: the file's layer {name!r} does not exist in the model")
        if not isinstance(module, nn.Linear) and not isinstance(module, QuantizedLinear):
            raise ValueError(f"{path}: layer {name!r} is a {type(module).__name__} in the model, not a linear layer")
        mine = _module_spec_for_compare(module, spec)
        diffs = spec_differences(spec, mine, fields=sorted(mine))
        if diffs:
            raise ValueError(f"{path}: layer {name!r}: " + "; ".join(diffs))
        plain = isinstance(module, nn.Linear) and not isinstance(module, QATLinear)
        if plain or (isinstance(module, QATLinear) and spec.get("kind") == "quantized"):
            keep_backend = getattr(module, "backend", backend)
            try:
                new = layer_from_spec(spec, name, device=module.weight.device, backend=keep_backend)
            except KeyError as err:
                raise ValueError(f"{path}: layer {name!r}: the spec has no {err.args[0]!r}") from None
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: {err}" if str(err).startswith("layer ") else f"{path}: layer {name!r}: {err}") from None
            swaps.append((name, module, new))
    return swaps


def _state_after(model: nn.Module, swaps) -> dict[str, torch.Tensor]:
    """The state dict ``model`` would have with ``swaps`` made (nothing is swapped)."""
    state = model.state_dict()
    for name, _, new in swaps:
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state.update({prefix + k: v for k, v in new.state_dict().items()})
    return state


def check_tensors(tensors: dict, model, path) -> None:
    """``tensors`` has exactly ``model``'s state (a module or a state dict): names, dtypes and
    shapes (only those are read: meta tensors do); else a ValueError naming the first difference."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state), key=str)
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


def check_scales(tensors: dict, layers: dict, where) -> None:
    """Every quantized layer's ``weight_scale`` in ``tensors`` (a file's, by state dict key) is what
    the quantizer writes, a row scale ``alpha * rms > 0``: a NaN, an Inf, zero or a negative value
    (which would silently flip or poison the layer's rows) is a ValueError naming ``where`` and the layer.
    ``where`` may be a function returning it, called only for the error."""
    def place():
        return where() if callable(where) else where

    for name, spec in layers.items():
        if not isinstance(spec, dict) or spec.get("kind") != "quantized":
            continue
        key = f"{name}.weight_scale" if name else "weight_scale"
        scale = tensors.get(key)
        if not isinstance(scale, torch.Tensor) or scale.is_meta or not scale.numel():
            continue
        if not scale.is_floating_point():
            raise ValueError(f"{place()}: layer {name!r}: weight_scale is {scale.dtype}, not a floating-point tensor")
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"{place()}: layer {name!r}: weight_scale holds NaN or Inf "
                             "(a row scale is alpha * rms, finite and > 0): the file is damaged")
        if not bool((scale > 0).all()):
            raise ValueError(f"{place()}: layer {name!r}: weight_scale holds values <= 0 (the smallest is "
                             f"{scale.min().item():.6g}; a row scale is alpha * rms > 0): the file is damaged")


def read_tensor_shapes(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and the stored tensors' names, dtypes and shapes (meta tensors for a
    safetensors file, whose data is not read)."""
    return _read(path, tensors="meta")


def check_quantized(path, model: nn.Module, *, backend: str = "auto", contents=None) -> dict:
    """Everything :func:`load_quantized` checks, without changing ``model`` or reading a
    safetensors file's data; ``model`` may live on the meta device (a skeleton built from sizes
    read from the file, checked before anything is allocated). ``contents``: what
    :func:`read_tensor_shapes` returned, when the caller has it. Returns the header."""
    check_backend_name(backend, "check_quantized")
    header, tensors = read_tensor_shapes(path) if contents is None else contents
    check_tensors(tensors, _state_after(model, _plan_layers(header, model, path, backend)), path)
    return header


@torch.no_grad()
def load_quantized(path, model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model``, in place; return it.

    ``model`` is a skeleton of the same architecture: plain (its linear layers are replaced as
    the file says), prepared (its QATLinear layers must carry the file's QuantConfigs and are
    converted) or converted (its layers must match the file). Any difference of layer, shape,
    dtype or QuantConfig, any malformed part of the file, and a row scale (``weight_scale``) that is
    NaN, Inf or <= 0, is a ValueError that names the file and the layer or tensor; it is found before
    the model changes. ``backend`` is the activation
    quantizer's backend of layers that the load creates from plain linears.
    """
    check_backend_name(backend, "load_quantized")
    header, tensors = _read(path, tensors=True)
    swaps = _plan_layers(header, model, path, backend)
    check_tensors(tensors, _state_after(model, swaps), path)
    check_scales(tensors, header["layers"], path)
    for name, _, new in swaps:
        set_module(model, name, new)
    try:
        model.load_state_dict(tensors, strict=True)
    except BaseException:
        for name, old, _ in swaps:  # a failed load leaves the model's layers as they were
            set_module(model, name, old)
        raise
    return model

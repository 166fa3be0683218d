"""Hugging Face round trip of prepared (QAT) and converted models, and the ``"cage"`` quantization
method of transformers.

Importing this module registers ``quant_method: "cage"`` with transformers (:func:`register`; when
transformers is installed): then plain ``transformers.AutoModelForCausalLM.from_pretrained(directory)``
rebuilds the QATLinear / QuantizedLinear layers (:mod:`cage.hf_quantizer`), also with
``dtype=torch.bfloat16`` (bf16 layers, fp32 scales), and ``model.save_pretrained`` writes them back.
``import cage`` registers too when transformers is already imported; ``import cage.hf`` always does.
Without transformers, ``import cage.hf`` still works and its functions raise ImportError.

    cage.prepare_qat(hf_model, ...)          # a PreTrainedModel gets the "cage" quantizer attached
    hf_model.save_pretrained("out/")         # so config.json carries quantization_config (Trainer's too)
    cage.hf.save_pretrained(model, "out/")   # the same for any model: attach, then save_pretrained
    model = AutoModelForCausalLM.from_pretrained("out/")   # after import cage.hf
    model = cage.hf.from_pretrained("out/")  # the same, with the checks below first

``config.json`` gets ``quantization_config = {"quant_method": "cage", "format_version": 2,
"layers": {name: layer_spec}}`` (:func:`cage.convert.layer_spec`: kind, shape, dtype, both
QuantConfigs; version 1, from before the integer grid, reads as the centered grid).

:func:`from_pretrained` first checks the sizes in ``config.json`` (the architecture's and every layer
spec's) against the stored tensors' shapes, read from the safetensors headers, on a meta-device
skeleton: an edited size is a ValueError, never a huge allocation; then it calls transformers'
``from_pretrained`` (offline: it reads only ``directory``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from .convert import dtype_name, layer_from_spec, layer_spec, set_module, spec_differences
from .serialize import FORMAT_VERSION, READABLE_VERSIONS, check_tensors, quantized_layers, readable_versions, safetensors_shapes

QUANT_METHOD = "cage"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry that describes ``model``'s quantized layers."""
    layers = {name: layer_spec(m) for name, m in quantized_layers(model).items()}
    if not layers:
        raise ValueError("cage.hf: the model has no QATLinear or QuantizedLinear layer (prepare it with cage.prepare_qat)")
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layers}


def attach_quantization_config(model) -> None:
    """Give ``model`` (a transformers PreTrainedModel with QATLinear or QuantizedLinear layers) the
    ``"cage"`` quantizer and its ``config.quantization_config``, as ``from_pretrained`` of a cage
    checkpoint does: then plain ``model.save_pretrained`` (and so every checkpoint transformers'
    ``Trainer`` writes) puts the quantization_config into config.json, describing the layers as they
    are at save time (prepared, or converted since). :func:`cage.prepare_qat` calls it for a
    PreTrainedModel. A model quantized by another method is an error."""
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"cage.hf: expected a transformers PreTrainedModel, got {type(model).__name__}")
    register()
    from .hf_quantizer import CageHfQuantizer, CageQuantizationConfig

    config = CageQuantizationConfig.from_model(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not isinstance(quantizer, CageHfQuantizer):
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", type(quantizer).__name__)
        raise ValueError(f"cage.hf: the model is already quantized with {getattr(method, 'value', method)!r}, "
                         f"not {QUANT_METHOD!r}")
    if quantizer is None:
        model.hf_quantizer = CageHfQuantizer(config)
    else:
        quantizer.quantization_config = config
    model.config.quantization_config = config


def save_pretrained(model, directory, **kwargs) -> None:
    """``model.save_pretrained(directory, **kwargs)`` with the cage quantization_config attached."""
    attach_quantization_config(model)
    model.save_pretrained(directory, **kwargs)


def check_index_names(names, folder: str | None, where: str) -> None:
    """The one rule for the weight files a checkpoint's index names (``cage.hf.from_pretrained`` and
    the registered quantizer, :mod:`cage.hf_quantizer`): each is a relative path inside ``folder``
    (files of a subfolder included, as transformers loads them); a name that is not a string, is
    empty or the folder itself, is absolute, or has a ``..`` part, is a ValueError before anything is
    read. ``folder=None``: the names are paths into a download cache (a hub model id, resolved by
    huggingface_hub), where only a ``..`` part is refused."""
    for name in names:
        parts = Path(name).parts if isinstance(name, str) else None
        if folder is None:
            bad = parts is None or ".." in parts
        else:
            bad = not parts or os.path.isabs(name) or ".." in parts
        if bad:
            raise ValueError(f"{where}: the weights index names {name!r}, which is not a file in "
                             f"{folder or 'the checkpoint folder'}; an index may only name files of its folder")

def _weight_files(directory: Path) -> list[str]:
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"cage.hf.from_pretrained: {index} is not a weights index ({type(err).__name__}: {err})") from None
        check_index_names(files, str(directory), f"cage.hf.from_pretrained: {index}")
        return files
    if (directory / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    raise FileNotFoundError(
        f"cage.hf.from_pretrained: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} in {directory} "
        "(save with safe_serialization, the default)"
    )


def _stored_shapes(directory: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """The stored tensors' names, dtypes and shapes (meta tensors), from the files' headers."""
    from safetensors import safe_open

    shapes = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            shapes.update(safetensors_shapes(f, directory / name))
    return shapes


def _checked_quant_config(config, directory) -> dict:
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        found = qc.get("quant_method") if qc else None
        raise ValueError(
            f"cage.hf.from_pretrained: {directory}/config.json has no cage quantization_config "
            f"(quant_method {found!r}); save with cage.hf.save_pretrained"
        )
    if qc.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"cage.hf.from_pretrained: quantization_config format_version {qc.get('format_version')!r}; "
            f"this cage reads {readable_versions()}"
        )
    if not isinstance(qc.get("layers"), dict):
        raise ValueError(f"cage.hf.from_pretrained: {directory}/config.json: the quantization_config's layers are not a dict")
    return qc


def from_pretrained(directory, *, model_class=None, backend: str = "auto", **kwargs):
    """A model saved by :func:`save_pretrained` (or by ``save_pretrained`` of a model loaded with the
    registered quantizer), after checking its sizes: ``model_class.from_pretrained(directory,
    local_files_only=True, **kwargs)`` (``model_class`` defaults to ``AutoModelForCausalLM``; kwargs
    such as ``dtype=torch.bfloat16`` go to it), in eval mode, its quantized layers on ``backend``."""
    import transformers

    register()
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"cage.hf.from_pretrained: no config.json in {directory}")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    qc = _checked_quant_config(config, directory)
    model_class = model_class or transformers.AutoModelForCausalLM
    stored = _stored_shapes(directory, _weight_files(directory))
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(stored):
        raise ValueError(f"cage.hf.from_pretrained: {directory}/config.json says num_hidden_layers {layers}, "
                         f"but its weights hold {len(stored)} tensors (every layer has several)")
    del config.quantization_config  # the architecture alone; the layers are cage's to build
    with torch.device("meta"):  # every size checked against the stored shapes, nothing allocated
        skeleton = model_class.from_config(config)
    swap_layers(skeleton, qc["layers"], f"cage.hf.from_pretrained: {directory}",
                build=lambda *a, **k: layer_from_spec(*a, **k))  # looked up at call time
    _check_state(skeleton, stored, directory)
    model = model_class.from_pretrained(str(directory), local_files_only=True, **kwargs)
    for layer in quantized_layers(model).values():
        layer.backend = backend
    return model.eval()


def swap_layers(model: nn.Module, layers: dict, where: str, *, backend: str = "auto", model_dtype: bool = False,
                build=layer_from_spec) -> None:
    """Replace every linear layer ``layers`` names by the layer its spec describes, on the device of the
    layer it replaces (meta, before the weights load), after checking the spec against the model's
    shape (in_features, out_features, bias). ``model_dtype``: each new layer takes the dtype of the
    layer it replaces (for a converted layer, that of its rebuilt weight; the scale stays fp32), not
    the spec's. ``build`` makes a layer from a spec. Errors name ``where`` and the layer."""
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: layer {name!r} of the quantization_config is not in the model") from None
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{where}: layer {name!r} is a {type(old).__name__} in the model, not a linear layer")
        mine = {"in_features": old.in_features, "out_features": old.out_features, "bias": old.bias is not None}
        diffs = spec_differences(spec, mine, fields=sorted(mine)) if isinstance(spec, dict) else ["its spec is not a dict"]
        if diffs:
            raise ValueError(f"{where}: layer {name!r}: " + "; ".join(diffs))
        if model_dtype:
            spec = {**spec, "weight_dtype": dtype_name(old.weight.dtype)}
        try:
            new = build(spec, name, device=old.weight.device, backend=backend)
        except KeyError as err:
            raise ValueError(f"{where}: layer {name!r}: the spec has no {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        new.train(old.training)
        set_module(model, name, new)


def _check_state(model, state: dict, directory: Path) -> None:
    # tied weights are written once; the model's own tie fills the other name
    mine = model.state_dict()
    tied = {k for k in mine if k not in state and _is_tied(model, k)}
    check_tensors({**state, **{k: mine[k] for k in tied}}, model, directory)


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or ()
    if isinstance(tied, dict):
        tied = tied.keys()
    return getattr(model.config, "tie_word_embeddings", False) and key in set(tied)


# ---- the transformers quantization method ------------------------------------------------


def register() -> bool:
    """Register ``quant_method: "cage"`` (config and quantizer, :mod:`cage.hf_quantizer`) with
    transformers; True once it is registered (by this call or an earlier one). Needs transformers
    (ImportError otherwise). ``import cage.hf`` calls it when transformers is installed."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.quantizers import register_quantization_config, register_quantizer

    from .hf_quantizer import CageHfQuantizer, CageQuantizationConfig

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CageQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CageHfQuantizer)
    return True


def transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


if transformers_installed():
    try:
        register()
    except ImportError:  # transformers blocked or broken: the functions above will say so when called
        pass

"""Hugging Face round trip of prepared (QAT) and converted models. Optional: ``transformers`` is
imported inside the functions only, so ``import cage`` works without it.

Two calls do it::

    cage.hf.save_pretrained(model, "out/")   # model.save_pretrained + quantization_config in config.json
    model = cage.hf.from_pretrained("out/")  # rebuilds the QATLinear / QuantizedLinear layers

``config.json`` gets ``quantization_config = {"quant_method": "cage", "format_version": 1,
"layers": {name: layer_spec}}`` (:func:`cage.convert.layer_spec`: kind, shape, dtype, both
QuantConfigs). Plain ``transformers.AutoModel*.from_pretrained`` does not know the "cage" method:
it warns and gives back plain ``nn.Linear`` layers (for a prepared model, the latent full-precision
weights; for a converted one, it cannot use the packed tensors). Use :func:`from_pretrained`.

Sizes in ``config.json`` (the architecture's and every layer spec's) are checked against the
stored tensors' shapes, read from the safetensors headers, on a meta-device skeleton before the
model is built: an edited size is a ValueError, never a huge allocation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .convert import layer_from_spec, layer_spec, set_module, spec_differences
from .serialize import FORMAT_VERSION, check_tensors, quantized_layers, safetensors_shapes

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
    """Set ``model.config.quantization_config``, so that ``model.save_pretrained`` (or a Trainer's
    checkpoint) writes it into config.json."""
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise TypeError(f"cage.hf: expected a transformers PreTrainedModel, got {type(model).__name__}")
    model.config.quantization_config = quantization_config(model)


def save_pretrained(model, directory, **kwargs) -> None:
    """``model.save_pretrained(directory, **kwargs)`` with the cage quantization_config attached."""
    attach_quantization_config(model)
    model.save_pretrained(directory, **kwargs)


def _weight_files(directory: Path) -> list[str]:
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"cage.hf.from_pretrained: {index} is not a weights index ({type(err).__name__}: {err})") from None
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                raise ValueError(f"cage.hf.from_pretrained: {index} names {name!r}, which is not a file in {directory}")
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


def _read_weights(directory: Path, files: list[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for name in files if files is not None else _weight_files(directory):
        state.update(load_file(str(directory / name)))
    return state


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
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"cage.hf.from_pretrained: quantization_config format_version {qc.get('format_version')!r}; "
            f"this cage reads version {FORMAT_VERSION}"
        )
    if not isinstance(qc.get("layers"), dict):
        raise ValueError(f"cage.hf.from_pretrained: {directory}/config.json: the quantization_config's layers are not a dict")
    return qc


@torch.no_grad()
def from_pretrained(directory, *, model_class=None, backend: str = "auto"):
    """Rebuild a model saved by :func:`save_pretrained`: its architecture from config.json, its
    QATLinear / QuantizedLinear layers from the quantization_config, its tensors from the
    safetensors files. ``model_class`` defaults to ``AutoModelForCausalLM``. Offline: it reads
    only ``directory``."""
    import transformers

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"cage.hf.from_pretrained: no config.json in {directory}")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    qc = _checked_quant_config(config, directory)
    model_class = model_class or transformers.AutoModelForCausalLM
    files = _weight_files(directory)
    stored = _stored_shapes(directory, files)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(stored):
        raise ValueError(f"cage.hf.from_pretrained: {directory}/config.json says num_hidden_layers {layers}, "
                         f"but its weights hold {len(stored)} tensors (every layer has several)")
    del config.quantization_config  # the architecture alone; the layers are cage's to build
    with torch.device("meta"):  # every size checked against the stored shapes, nothing allocated
        skeleton = model_class.from_config(config)
    _swap_layers(skeleton, qc, directory, backend)
    _check_state(skeleton, stored, directory)
    model = model_class.from_config(config)
    config.quantization_config = qc
    _swap_layers(model, qc, directory, backend)
    state = _read_weights(directory, files)
    _check_state(model, state, directory)
    model.load_state_dict(state, strict=False)
    model.eval()
    return model


def _swap_layers(model, qc: dict, directory: Path, backend: str) -> None:
    """Replace every linear layer the quantization_config names by the layer its spec describes,
    after checking that the spec has the model's shape (in_features, out_features, bias)."""
    for name, spec in qc["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"cage.hf.from_pretrained: layer {name!r} of the quantization_config is not in the model") from None
        if not isinstance(old, nn.Linear):
            raise ValueError(f"cage.hf.from_pretrained: {directory}: layer {name!r} is a {type(old).__name__} "
                             "in the model, not a linear layer")
        mine = {"in_features": old.in_features, "out_features": old.out_features, "bias": old.bias is not None}
        diffs = spec_differences(spec, mine, fields=sorted(mine)) if isinstance(spec, dict) else ["its spec is not a dict"]
        if diffs:
            raise ValueError(f"cage.hf.from_pretrained: {directory}: layer {name!r}: " + "; ".join(diffs))
        try:
            new = layer_from_spec(spec, name, device=old.weight.device, backend=backend)
        except KeyError as err:
            raise ValueError(f"cage.hf.from_pretrained: {directory}: layer {name!r}: the spec has no {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"cage.hf.from_pretrained: {directory}: {err}") from None
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

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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .convert import layer_from_spec, layer_spec, set_module
from .serialize import FORMAT_VERSION, check_tensors, quantized_layers

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


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / WEIGHTS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(
            f"cage.hf.from_pretrained: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} in {directory} "
            "(save with safe_serialization, the default)"
        )
    state = {}
    for name in files:
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
    del config.quantization_config  # the architecture alone; the layers are cage's to build
    model = model_class.from_config(config)
    config.quantization_config = qc
    for name, spec in qc["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"cage.hf.from_pretrained: layer {name!r} of the quantization_config is not in the model") from None
        set_module(model, name, layer_from_spec(spec, name, device=old.weight.device, backend=backend))
    state = _read_weights(directory)
    # tied weights are written once; the model's own tie fills the other name
    tied = {k for k in model.state_dict() if k not in state and _is_tied(model, k)}
    check_tensors({**state, **{k: model.state_dict()[k] for k in tied}}, model, directory)
    model.load_state_dict(state, strict=False)
    model.eval()
    return model


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or ()
    if isinstance(tied, dict):
        tied = tied.keys()
    return getattr(model.config, "tie_word_embeddings", False) and key in set(tied)

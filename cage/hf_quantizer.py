"""The ``"cage"`` quantization method of Hugging Face transformers: a ``QuantizationConfigMixin`` and
an ``HfQuantizer`` registered for ``quant_method: "cage"`` (:func:`cage.hf.register` does it; importing
``cage.hf`` calls it). With them, plain ``AutoModelForCausalLM.from_pretrained(directory)`` rebuilds the
``QATLinear`` / ``QuantizedLinear`` layers a ``config.json`` names, on the meta device before the
weights load, and ``save_pretrained`` writes them back.

This module imports transformers: import it only through :func:`cage.hf.register`.
"""

from __future__ import annotations

import os

from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .convert import layer_spec
from .serialize import FORMAT_VERSION, READABLE_VERSIONS, check_scales, quantized_layers, readable_versions

QUANT_METHOD = "cage"


# the first transformers that passes the checkpoint's files to preprocess_model (4.57.6, the last
# 4.x, does not): without them the index could not be checked (check_index_names)
MIN_TRANSFORMERS = "5.0"


def checkpoint_index_names(files, folder: str) -> tuple[list[str], str | None]:
    """The files transformers resolved a checkpoint's index to (paths, absolute or relative to the
    working directory) as names relative to the checkpoint's local folder, and that folder; for a
    hub model id (no local folder), the paths themselves and None (:func:`cage.hf.check_index_names`).
    Paths are compared as written, not resolved, so files that are symlinks into a cache still load."""
    if not (folder and os.path.isdir(folder)):
        return [str(f) for f in files], None
    root = os.path.abspath(folder)
    return [os.path.relpath(os.path.abspath(f), root) for f in files], folder


class CageQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config = {"quant_method": "cage", "format_version": 2, "layers": {name: spec}}``:
    every quantized layer's kind (``"qat"`` or ``"quantized"``), shape, dtype and QuantConfigs
    (:func:`cage.convert.layer_spec`). Format version 1 (before the integer grid) reads as well."""

    def __init__(self, layers: dict | None = None, format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, **unused):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"cage quantization_config: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if format_version not in READABLE_VERSIONS:
            raise ValueError(f"cage quantization_config: format_version {format_version!r}; this cage reads "
                             f"{readable_versions()}")
        if not isinstance(layers, dict) or not layers or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in layers.items()):
            raise ValueError("cage quantization_config: 'layers' must be a non-empty dict of layer specs "
                             "(save with cage.hf.save_pretrained)")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = layers

    @classmethod
    def from_model(cls, model: nn.Module) -> "CageQuantizationConfig":
        layers = {name: layer_spec(m) for name, m in quantized_layers(model).items()}
        if not layers:
            raise ValueError("cage.hf: the model has no QATLinear or QuantizedLinear layer (prepare it with cage.prepare_qat)")
        return cls(layers=layers)

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method, "format_version": self.format_version, "layers": self.layers}

    def kinds(self) -> set[str]:
        return {spec.get("kind") for spec in self.layers.values()}


class CageHfQuantizer(HfQuantizer):
    """Loads checkpoints written with ``quant_method: "cage"``: the layers are built on the meta device
    in the model's dtype (``from_pretrained(..., dtype=torch.bfloat16)``: bf16 layers, fp32 scales), then
    transformers loads the stored tensors into them. A QAT model (``QATLinear`` layers) stays trainable:
    transformers' ``Trainer`` accepts it (``is_qat_trainable``); a converted one is for inference."""

    requires_calibration = True  # the checkpoint must already be quantized: there is no on-the-fly path

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .hf import check_index_names, swap_layers  # cage.hf imports this module (register), not the other way round

        where = f"cage quantizer ({getattr(model.config, 'name_or_path', '') or type(model).__name__})"
        if "checkpoint_files" not in kwargs:  # fail closed: the index's files could not be checked
            import transformers

            raise ValueError(f"{where}: transformers {transformers.__version__} does not pass the checkpoint's files to "
                             "the quantizer, so the cage quantizer cannot check that the weights index names only files "
                             f"of its folder; cage.hf needs transformers >= {MIN_TRANSFORMERS} (pip install -e '.[hf]')")
        self._checkpoint_files = [str(f) for f in (kwargs["checkpoint_files"] or ())]  # None: no files (a state_dict)
        check_index_names(*checkpoint_index_names(self._checkpoint_files, getattr(model.config, "name_or_path", "") or ""),
                          where)
        swap_layers(model, self.quantization_config.layers, where, model_dtype=True)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        layers = quantized_layers(model)
        left = [f"{n}.{k}" for n, m in layers.items() for k, t in m.state_dict().items() if t.is_meta]
        if left:
            raise ValueError(f"cage quantizer: the checkpoint lacks tensors of the quantized layers: {left[:5]}")
        for name, layer in layers.items():  # a NaN, Inf or <= 0 row scale is a damaged file, not a model
            if hasattr(layer, "weight_scale"):
                check_scales({f"{name}.weight_scale": layer.weight_scale}, {name: {"kind": "quantized"}},
                             lambda name=name: self._file_holding(f"{name}.weight_scale", model))  # only on failure
        return model

    def _file_holding(self, key: str, model) -> str:
        """The checkpoint file that stores ``key`` (for error messages), else the model's folder."""
        files = getattr(self, "_checkpoint_files", None) or []
        if len(files) > 1:
            try:
                from safetensors import safe_open

                for f in files:
                    with safe_open(f, framework="pt") as st:
                        if key in st.keys():
                            return f
            except Exception:  # only an error message is at stake
                pass
        if len(files) == 1:
            return files[0]
        return f"cage quantizer ({getattr(model.config, 'name_or_path', '') or type(model).__name__})"

    def get_state_dict_and_metadata(self, model):
        # save_pretrained: describe the layers as they are now (a loaded QAT model may have been
        # converted, or cast to another dtype, since it was loaded)
        self.quantization_config.layers = CageQuantizationConfig.from_model(model).layers
        self.quantization_config.format_version = FORMAT_VERSION
        return None, {}

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    def _qat(self) -> bool:
        return self.quantization_config.kinds() == {"qat"}

    @property
    def is_trainable(self) -> bool:
        """A QAT model trains (its latent weights are parameters); a converted one holds codes."""
        return self._qat()

    @property
    def is_qat_trainable(self) -> bool:
        return self._qat()

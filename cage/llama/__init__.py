"""The training application built on the ``cage`` runtime: a Llama model, byte-level data, the
QAT training job (``python -m cage train``) and the accuracy sweep (``python -m cage sweep``).

The runtime (``cage.QuantConfig``, ``cage.prepare_qat``, ``cage.CAGEAdamW``, ...) never imports
this package; it imports the runtime like any user would.
"""

from .data import TextData, load_corpus
from .model import PRESETS, Llama, LlamaConfig, config_from_preset, count_params
from .job import TrainConfig, train

__all__ = [
    "PRESETS", "Llama", "LlamaConfig", "TextData", "TrainConfig", "config_from_preset", "count_params",
    "load_corpus", "train",
]

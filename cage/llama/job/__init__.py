"""The QAT training job (``python -m cage train``): config, model building, loop, checkpoints, plots.

``train(TrainConfig(method="quest", bits=3, steps=200, out="runs/q3"))`` returns the metrics dict
that it also writes to ``out/metrics.json``.
"""

from .build import build_model, lr_at, quant_configs
from .checkpoint import CHECKPOINT, METRICS, PLOT, checkpoint_config, load_checkpoint
from .config import METHODS, TrainConfig, default_out_dir, fit_block_size
from .loop import evaluate, train

__all__ = [
    "CHECKPOINT", "METHODS", "METRICS", "PLOT", "TrainConfig", "build_model", "checkpoint_config",
    "default_out_dir", "evaluate", "fit_block_size", "load_checkpoint", "lr_at", "quant_configs", "train",
]

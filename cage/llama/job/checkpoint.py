"""A run's files: the checkpoint (model, optimizer, data order, RNG), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data import TextData
from .config import TrainConfig

CHECKPOINT = "checkpoint.pt"

METRICS = "metrics.json"

PLOT = "loss.png"


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file and rename it, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)

def save_checkpoint(path: Path, model, optimizer, data: TextData, step: int, cfg, history: dict, corpus_sha256: str) -> None:
    state = {
        "corpus_sha256": corpus_sha256,
        "threads": torch.get_num_threads(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": data.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "config": cfg.to_dict(),
        "history": history,
    }
    _atomic_write(path, lambda tmp: torch.save(state, tmp))

def _checkpoint_threads(out: str | None) -> int | None:
    path = Path(out or ".") / CHECKPOINT
    return load_checkpoint(path).get("threads") if path.is_file() else None

def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (run without --resume first)")
    return torch.load(path, map_location="cpu", weights_only=True)

def checkpoint_config(out: str) -> TrainConfig:
    """The TrainConfig saved in ``out``'s checkpoint (the CLI resumes from it)."""
    return TrainConfig.from_dict(load_checkpoint(Path(out) / CHECKPOINT)["config"])

def _check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in cfg.to_dict().items()
        if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != v
    ]
    if diffs:
        raise ValueError(
            "--resume: the run's settings differ from the checkpoint's, so it would not continue "
            "the same run:\n  " + "\n  ".join(diffs)
        )

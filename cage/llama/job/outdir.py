"""A run's output folder: may the run write there, and what ``--overwrite`` removes first."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint import CHECKPOINT, DCP_DIR, METRICS, PLOT
from .config import TrainConfig
from .records import TENSORBOARD_DIR, TRAIN_LOG

# Everything a run writes into its folder (and its half-written ``.tmp`` twins): what marks the
# folder as holding a run, and what --overwrite deletes. Other files there are left alone.
RUN_OUTPUTS = (CHECKPOINT, DCP_DIR, METRICS, PLOT, TRAIN_LOG, TENSORBOARD_DIR)


def existing_run_outputs(out: Path) -> list[Path]:
    names = [*RUN_OUTPUTS, *(name + ".tmp" for name in RUN_OUTPUTS)]
    return [out / name for name in names if (out / name).exists()]


def check_out_dir(cfg: TrainConfig) -> None:
    """ValueError unless ``cfg.out`` can take this run: a folder (or a path that can become one)
    that holds no earlier run, unless the run resumes it (``resume``) or replaces it (``overwrite``)."""
    if not cfg.out:
        return
    out = Path(cfg.out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" ({path} is a file)"
                raise ValueError(f"--out {cfg.out} is not a folder{where}; name a folder for the run's files")
            break
    if cfg.resume or cfg.overwrite or not out.is_dir():
        return
    found = existing_run_outputs(out)
    if found:
        raise ValueError(
            f"--out {cfg.out} already holds a run ({', '.join(p.name for p in found)}): add --resume "
            "to continue it, --overwrite to replace it, or name another --out"
        )


def clear_run_outputs(cfg: TrainConfig) -> list[Path]:
    """With ``overwrite``: delete the earlier run's files in ``cfg.out`` (see RUN_OUTPUTS); returns them.
    Under torchrun only rank 0 deletes (the others would race it)."""
    if not (cfg.overwrite and cfg.out) or int(os.environ.get("RANK", "0")) != 0:
        return []
    found = existing_run_outputs(Path(cfg.out))
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found

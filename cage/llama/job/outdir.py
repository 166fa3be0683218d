"""A run's output folder: may the run write there, and what it removes first.

- A folder holding a run (a checkpoint, or the metrics of one) is refused unless the run
  resumes it (``--resume``) or replaces it (``--overwrite``: its run files are deleted).
- A folder left by a run that stopped before its first checkpoint (killed, out of memory,
  diverged: a ``train_log.csv``, a ``loss.png``, TensorBoard events, a DCP folder without its
  ``state.pt``, but no checkpoint and no metrics) holds nothing to continue: ``--resume`` says
  so, and a plain run starts afresh there, replacing those files (it says which).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint import CHECKPOINT, DCP_DIR, METRICS, PLOT, has_checkpoint
from .config import TrainConfig
from .records import TENSORBOARD_DIR, TRAIN_LOG

# Everything a run writes into its folder (and its half-written ``.tmp`` twins): what marks the
# folder as holding a run, and what --overwrite deletes. Other files there are left alone.
RUN_OUTPUTS = (CHECKPOINT, DCP_DIR, METRICS, PLOT, TRAIN_LOG, TENSORBOARD_DIR)

# what only a run that saved something leaves (a complete checkpoint comes with its metrics)
SAVED_OUTPUTS = (CHECKPOINT, METRICS)


def existing_run_outputs(out: Path) -> list[Path]:
    names = [*RUN_OUTPUTS, *(name + ".tmp" for name in RUN_OUTPUTS)]
    return [out / name for name in names if (out / name).exists()]


def unsaved_run_outputs(out: Path) -> list[Path]:
    """The files of a run that stopped before its first checkpoint ([] when ``out`` holds none,
    or holds a run that saved something: a checkpoint of either format, or metrics)."""
    if not out.is_dir() or has_checkpoint(out) or any((out / name).exists() for name in SAVED_OUTPUTS):
        return []
    return existing_run_outputs(out)


def check_out_dir(cfg: TrainConfig) -> list[Path]:
    """ValueError unless ``cfg.out`` can take this run: a folder (or a path that can become one)
    that holds no earlier run, unless the run resumes it (``resume``, which needs a checkpoint
    there: FileNotFoundError) or replaces it (``overwrite``). Returns the files to delete before
    the run starts: the earlier run's with ``overwrite``, those of a run that stopped before its
    first checkpoint for a plain run."""
    if not cfg.out:
        return []
    out = Path(cfg.out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" ({path} is a file)"
                raise ValueError(f"--out {cfg.out} is not a folder{where}; name a folder for the run's files")
            break
    if cfg.resume:
        if not has_checkpoint(out):
            raise FileNotFoundError(no_checkpoint_message(out))
        return []
    if not out.is_dir():
        return []
    if cfg.overwrite:
        return existing_run_outputs(out)
    unsaved = unsaved_run_outputs(out)
    if unsaved:
        return unsaved
    found = existing_run_outputs(out)
    if found:
        raise ValueError(
            f"--out {cfg.out} already holds a run ({', '.join(p.name for p in found)}): add --resume "
            "to continue it, --overwrite to replace it, or name another --out"
        )
    return []


def no_checkpoint_message(out: Path) -> str:
    """What ``--resume`` says when ``out`` holds no checkpoint, and what to do instead."""
    if not out.exists():
        return f"--resume: no checkpoint in {out}: the folder does not exist (start the run without --resume)"
    if unsaved_run_outputs(out):
        return (f"--resume: no checkpoint in {out}: its run stopped before its first checkpoint, so there is "
                "nothing to continue; run the same command without --resume to start it again there "
                "(it replaces that run's files)")
    return (f"--resume: no checkpoint in {out} ({CHECKPOINT} or {DCP_DIR}/): start the run without --resume "
            "(or name the run's --out)")


def clear_run_outputs(cfg: TrainConfig, found: list[Path]) -> list[Path]:
    """Delete ``found`` (what check_out_dir returned) in ``cfg.out``; returns them. Under
    torchrun only rank 0 deletes (the others would race it)."""
    if not (found and cfg.out) or int(os.environ.get("RANK", "0")) != 0:
        return []
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return found

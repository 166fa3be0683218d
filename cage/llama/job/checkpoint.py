"""A run's files: the checkpoint (model, optimizer, data order, RNG, and the metrics it stands
for), written atomically.

Two formats. One process (``--parallel none``) writes the single file ``checkpoint.pt``. Several
(``ddp``/``fsdp2``) write ``checkpoint/``: a ``torch.distributed.checkpoint`` folder
``checkpoint/step-<step>/`` (model and optimizer, each process its shards, through
``get_state_dict``) and ``checkpoint/state.pt``, the rest of the run's state, written by rank 0
after every shard is on disk. ``state.pt`` names the folder it belongs to, so writing it is the
moment the checkpoint counts; older folders are deleted after it. A DCP checkpoint loads into
any number of processes, one included (``--parallel none`` reads it, and from then on writes
``checkpoint.pt``); whichever format holds the later step is the run's checkpoint.

Completion is one fact: the checkpoint carries the metrics of its step, ``completed`` included,
and ``metrics.json`` is a copy of them (a resumed complete run rewrites a missing or stale copy).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..data import TextData
from .config import TrainConfig

CHECKPOINT = "checkpoint.pt"

DCP_DIR = "checkpoint"  # the multi-process format's folder

DCP_STATE = "state.pt"  # in DCP_DIR: everything but the model and optimizer

METRICS = "metrics.json"

PLOT = "loss.png"


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file and rename it, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def run_state(data: TextData, step: int, cfg, history: dict, corpus_sha256: str, metrics: dict | None) -> dict:
    """What a checkpoint holds besides the model and the optimizer."""
    return {
        "corpus_sha256": corpus_sha256,
        "threads": torch.get_num_threads(),
        "data": data.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "config": cfg.to_dict(),
        "history": history,
        # as JSON has them (plain types: weights_only loads them, and metrics.json is a copy)
        "metrics": None if metrics is None else json.loads(json.dumps(metrics)),
    }


def save_checkpoint(path: Path, model, optimizer, data: TextData, step: int, cfg, history: dict,
                    corpus_sha256: str, metrics: dict | None = None) -> None:
    """The single-file checkpoint of a one-process run."""
    state = {
        **run_state(data, step, cfg, history, corpus_sha256, metrics),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    _atomic_write(path, lambda tmp: torch.save(state, tmp))
    remove_stale(path.parent, keep=None)


def save_distributed_checkpoint(out: Path, model, optimizer, parallel, state: dict, committed: str | None) -> str:
    """A DCP checkpoint, written by every process (a collective); returns its folder's name.

    The name differs from ``committed`` (the folder the current ``state.pt`` names), so a
    checkpoint is never written over the one that counts, even twice at the same step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step-{state['step']:08d}"
    if name == committed:
        name += "-b"
    target = out / DCP_DIR / name
    if parallel.is_main and target.exists():  # left by a session that died before committing it
        shutil.rmtree(target)
    parallel.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # dcp.save returns on rank 0 after every process reported its shards written
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(target))
    if parallel.is_main:
        _atomic_write(out / DCP_DIR / DCP_STATE, lambda tmp: torch.save({**state, "dcp": name}, tmp))
        remove_stale(out, keep=name)
    return name


def remove_stale(out: Path, keep: str | None) -> None:
    """After a checkpoint is committed: drop the other format and the DCP folders but ``keep``."""
    if keep is not None:
        (out / CHECKPOINT).unlink(missing_ok=True)
    folder = out / DCP_DIR
    if not folder.is_dir():
        return
    if keep is None:
        shutil.rmtree(folder)
        return
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name != keep:
            shutil.rmtree(entry)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (run without --resume first)")
    return torch.load(path, map_location="cpu", weights_only=True)


def find_checkpoint(out: Path) -> dict | None:
    """The run's checkpoint in ``out`` (the later step of the two formats), or None. A DCP
    checkpoint comes as its state without the model and optimizer, with ``"dcp"`` naming its
    folder; load those with ``restore_weights``."""
    found = []
    if (out / CHECKPOINT).is_file():
        found.append(((out / CHECKPOINT).stat().st_mtime, load_checkpoint(out / CHECKPOINT)))
    side = out / DCP_DIR / DCP_STATE
    if side.is_file():
        found.append((side.stat().st_mtime, torch.load(side, map_location="cpu", weights_only=True)))
    if not found:
        return None
    return max(found, key=lambda f: (f[1]["step"], f[0]))[1]


def has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINT).is_file() or (out / DCP_DIR / DCP_STATE).is_file()


def resume_checkpoint(out: Path) -> dict:
    ckpt = find_checkpoint(out)
    if ckpt is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint at {out / CHECKPOINT} or {out / DCP_DIR / DCP_STATE} (run without --resume first)"
        )
    return ckpt


def restore_weights(out: Path, ckpt: dict, model, optimizer, parallel) -> None:
    """Load the checkpoint's model and optimizer state into this session's (a collective for
    a DCP checkpoint under torchrun; DCP reshards to any number of processes)."""
    if "dcp" in ckpt:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, checkpoint_id=str(out / DCP_DIR / ckpt["dcp"]), no_dist=not parallel.distributed)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    elif parallel.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        # every process read the whole file: hand its full tensors over, each keeps its shards
        set_state_dict(
            model, optimizer, model_state_dict=ckpt["model"],
            optim_state_dict=_optimizer_state_by_name(ckpt["optimizer"], optimizer, parallel.unwrapped(model)),
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])


def _optimizer_state_by_name(saved: dict, optimizer, model) -> dict:
    """``optimizer.state_dict()`` of a one-process run (keyed by position) keyed by parameter
    name instead, as ``set_state_dict`` takes it; positions follow this ``optimizer``'s groups."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    positions = [i for g in saved["param_groups"] for i in g["params"]]
    if len(positions) != len(names):
        raise ValueError(f"--resume: the checkpoint's optimizer holds {len(positions)} parameters, the model {len(names)}")
    by_position = dict(zip(positions, names))
    return {
        "state": {by_position[i]: state for i, state in saved["state"].items()},
        "param_groups": [{**g, "params": [by_position[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def load_model_state(out: Path, ckpt: dict | None = None) -> dict | None:
    """The model weights of ``out``'s checkpoint as full tensors keyed like
    ``Llama.state_dict()`` (either format), or None without a checkpoint. ``ckpt``: what
    ``find_checkpoint(out)`` returned, when the caller has it already."""
    ckpt = find_checkpoint(out) if ckpt is None else ckpt
    if ckpt is None:
        return None
    if "dcp" not in ckpt:
        return ckpt["model"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(out / DCP_DIR / ckpt["dcp"]), os.path.join(tmp, "full.pt"))
        return torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=True)["model"]


def _checkpoint_threads(out: str | None) -> int | None:
    ckpt = find_checkpoint(Path(out or "."))
    return ckpt.get("threads") if ckpt else None


def checkpoint_config(out: str) -> TrainConfig:
    """The TrainConfig saved in ``out``'s checkpoint (the CLI resumes from it)."""
    return TrainConfig.from_dict(resume_checkpoint(Path(out))["config"])


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

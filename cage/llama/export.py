"""Convert a training run's checkpoint into a packed low-bit model file.

Reads the run's latest checkpoint (written by ``python -m cage train --out RUN``: RUN/checkpoint.pt
from one process, or the DCP folder RUN/checkpoint/ from torchrun with ddp or fsdp2, whose shards
are gathered into full tensors), rebuilds the run's QAT model, converts every quantized layer to packed grid codes and row scales (``cage.convert``),
writes FILE (``cage.save_quantized``: safetensors when installed, else a torch.save archive) and
prints its size against a bf16 checkpoint. ``python -m cage generate --model FILE`` samples from it.

The checkpoint is checked first: nothing from the folder runs, a damaged file is an error naming
it, and the model its config describes must have the stored tensors' shapes before it is built.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from ..convert import convert
from ..serialize import format_size_report, save_quantized
from .job.build import build_model
from .job.checkpoint import CHECKPOINT, DCP_DIR, DCP_STATE, check_model_config, find_checkpoint, load_model_state
from .job.config import TrainConfig

# the header's ``extra`` keys that generate reads back
LLAMA_CONFIG_KEY = "llama_config"
TRAIN_CONFIG_KEY = "train_config"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR",
                   help=f"the run's folder (holds {CHECKPOINT}, or {DCP_DIR}/ from a torchrun run)")
    p.add_argument("--out", required=True, metavar="FILE", help="the quantized model file to write")


def load_run_model(run) -> tuple[torch.nn.Module, TrainConfig]:
    """The run's QAT model (on the CPU, eval mode) with its latest checkpoint's weights, and its config."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"--run: no run folder at {run}")
    ckpt = find_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"--run: no checkpoint in {run} (neither {CHECKPOINT} nor {DCP_DIR}/{DCP_STATE})")
    check_model_config(run, ckpt)  # sizes against the stored weights, before anything is built
    cfg = TrainConfig.from_dict(ckpt["config"])
    model, _, _ = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(load_model_state(run, ckpt))
    return model.eval(), cfg


def export_run(run, out) -> dict:
    """Convert the run's model and write it to ``out``; return the size report."""
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: the folder {out.parent} does not exist")
    model, cfg = load_run_model(run)
    convert(model)
    extra = {LLAMA_CONFIG_KEY: dataclasses.asdict(model.config), TRAIN_CONFIG_KEY: cfg.to_dict()}
    return save_quantized(model, out, extra=extra)


def run(args: argparse.Namespace) -> int:
    report = export_run(args.run, args.out)
    print(f"wrote {args.out}")
    print(format_size_report(report))
    return 0

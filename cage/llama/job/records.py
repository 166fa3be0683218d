"""Per-step training records: ``train_log.csv`` and, when the ``tensorboard`` package is
installed, TensorBoard event files in ``tensorboard/``.

``train_log.csv`` has one row per optimizer step, with the columns of ``COLUMNS``:

- ``step`` (1-based), ``loss`` (training loss of the step's global batch, nats/byte), ``lr``,
  ``lambda_t`` (the CAGE lambda of the step), ``grad_norm`` (the gradient norm before clipping),
  ``skipped`` (1: the norm was NaN/Inf and the step was skipped, weights and moments unchanged;
  0: taken; empty in rows written before the column existed);
- ``tokens_per_s`` and ``weight_grid_distance``: only on the rows of logging steps (every
  ``--log-every`` steps), empty elsewhere. ``tokens_per_s`` is the mean throughput since the
  previous logging step; ``weight_grid_distance`` is ``||W - Q(W)|| / ||W||`` over all quantized
  weights (relative RMS distance to the quantization grid, the quantity CAGE pulls down; empty
  for bf16), computed only there because it quantizes every weight.

Rows are written at logging steps and checkpoints from values kept on the device until then (no
host sync per step). A resumed run first drops the rows after its checkpoint's step, and a last
row cut off by a kill (no newline), so the file never holds a step twice. Only rank 0 writes.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import torch

from ...naive import quantize
from ...ops.adamw_cage import local_tensor
from .checkpoint import _atomic_write

TRAIN_LOG = "train_log.csv"

TENSORBOARD_DIR = "tensorboard"

COLUMNS = ("step", "loss", "lr", "lambda_t", "grad_norm", "skipped", "tokens_per_s", "weight_grid_distance")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TrainRecords:
    """The CSV and TensorBoard writers of a run (inactive without ``out``)."""

    def __init__(self, out: Path | None, resume_step: int | None):
        self.path = out / TRAIN_LOG if out is not None else None
        self.tensorboard = None
        if self.path is None:
            return
        kept = _rows_up_to(self.path, resume_step) if resume_step is not None and self.path.is_file() else []

        def rewrite(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, COLUMNS)
                w.writeheader()
                w.writerows(kept)

        _atomic_write(self.path, rewrite)
        if tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of earlier sessions from that step on: those after the
            # checkpoint of a resumed run, all of them for a fresh run in the same folder
            self.tensorboard = SummaryWriter(
                str(out / TENSORBOARD_DIR), purge_step=0 if resume_step is None else resume_step + 1
            )

    def write_rows(self, rows: list[dict]) -> None:
        if self.path is None or not rows:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerows(
                {k: "" if r.get(k) is None else r[k] for k in COLUMNS} for r in rows
            )
        if self.tensorboard is not None:
            for r in rows:
                for k in COLUMNS[1:]:
                    if r.get(k) is not None:
                        self.tensorboard.add_scalar(f"train/{k}", r[k], r["step"])
            self.tensorboard.flush()

    def write_eval(self, step: int, split: str, loss: float) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(f"eval/{split}_loss", loss, step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _rows_up_to(path: Path, step: int) -> list[dict]:
    """The rows of the log at ``path`` for steps 1 to ``step``, in order. A session killed while
    it wrote leaves a last line without its newline, which can read as any step ("1" of a cut
    "12,..."): that line is dropped, and so is any row whose step is not after the one before."""
    with open(path, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the cut-off last line
    kept = []
    for row in csv.DictReader(text.splitlines(keepends=True)):
        try:
            n = int(row["step"])
        except (TypeError, ValueError):
            continue
        if n > step or (kept and n <= int(kept[-1]["step"])) or None in row or None in row.values():
            continue
        kept.append(row)
    return kept


@torch.no_grad()
def weight_grid_distance(optimizer, parallel) -> float | None:
    """||W - Q(W)|| / ||W|| over the quantized weights of ``optimizer``'s groups (each process
    its shards of whole rows, summed across processes under FSDP2); None without any."""
    sums = []
    for group in optimizer.param_groups:
        if group["quant"] is None:
            continue
        for p in group["params"]:
            w = local_tensor(p).float()
            q, _ = quantize(w, group["quant"])
            sums.append(torch.stack([(w - q).pow(2).sum(), w.pow(2).sum()]).double())
    if not sums:
        return None
    err, ref = torch.stack(sums).sum(0)
    if parallel.mode == "fsdp2":
        err, ref = parallel.sum(torch.stack([err, ref]))
    err, ref = float(err), float(ref)
    return math.sqrt(err / ref) if ref else None

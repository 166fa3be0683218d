"""Running a sweep's cells: each one a training run in its own folder and process."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from .plan import Cell


def cell_status(cell_dir: Path) -> str:
    """done | diverged | partial (has a checkpoint) | failed | todo."""
    m = cell_dir / "metrics.json"
    if m.is_file():
        try:
            d = json.loads(m.read_text())
            if d.get("completed") and d.get("final_test_loss") is not None:
                return "done"
        except (OSError, json.JSONDecodeError):
            pass
    if (cell_dir / "diverged.json").is_file():
        return "diverged"
    from ..job.checkpoint import has_checkpoint

    if has_checkpoint(cell_dir):  # either format: checkpoint.pt or a DCP folder
        return "partial"
    if (cell_dir / "failed.json").is_file():
        return "failed"
    return "todo"


def run_cell(cell_dir: str, time_limit_min: float | None = None, parallel: str = "none") -> int:
    """Entry point of a cell's process (or of each of its torchrun processes, with ``parallel``
    ddp or fsdp2): train (or resume) the run described by cell.json, for at most
    ``time_limit_min`` minutes (then it checkpoints and the cell stays "partial")."""
    from ..job import TrainConfig, train
    from ..job.checkpoint import has_checkpoint

    d = Path(cell_dir)
    cfg = TrainConfig.from_dict(json.loads((d / "cell.json").read_text())["train_config"])
    resume = has_checkpoint(d)
    # without a checkpoint the cell starts over, replacing what a failed attempt left
    cfg = dataclasses.replace(cfg, resume=resume, overwrite=not resume, time_limit_min=time_limit_min,
                              parallel=parallel)
    try:
        train(cfg)
    except FloatingPointError as err:  # a finding (e.g. 2-bit STE), not a crash
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        (d / "diverged.json").write_text(json.dumps({"error": str(err)}, indent=2) + "\n")
        print(f"diverged: {err}", flush=True)
    return 0


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _same_file(a, b) -> bool:
    """Two recorded corpus paths name the same file (one relative, one absolute, or both)."""
    return a is not None and b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def prepare_cell(out: Path, cell: Cell, tcfg: dict) -> Path:
    """Create the cell's folder and cell.json; refuse to mix settings with an earlier sweep."""
    from ..job import TrainConfig

    d = out / cell.name
    d.mkdir(parents=True, exist_ok=True)
    f = d / "cell.json"
    if f.is_file():
        # fields added since the cell was written read as their defaults (what the cell ran then)
        old = {**TrainConfig().to_dict(), **json.loads(f.read_text())["train_config"]}
        diffs = [k for k, v in tcfg.items() if k not in TrainConfig.RESUMABLE_CHANGES and old.get(k) != v
                 and not (k == "data" and _same_file(old.get(k), v))]
        if diffs:
            raise ValueError(
                f"sweep: {d} was made with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {tcfg[k]!r}' for k in diffs)}); "
                "use another --out for a different sweep"
            )
    _write_json(f, {"cell": dataclasses.asdict(cell), "name": cell.name, "train_config": tcfg})
    return d


def launch(cell_dir: Path, threads: int | None, time_limit_min: float | None = None,
           parallel: str = "none", nproc: int = 1) -> tuple[int, float]:
    """Run one cell in a child process (its output goes to train.log), for at most
    ``time_limit_min`` minutes of training; with ``parallel`` ddp or fsdp2, as ``nproc``
    processes under torchrun. (exit code, seconds)."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
    argv = ["-m", __name__, str(cell_dir), "--parallel", parallel]
    if time_limit_min is not None:
        argv += ["--time-limit", repr(time_limit_min)]
    if parallel != "none":
        argv = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *argv]
    t0 = time.perf_counter()
    with open(cell_dir / "train.log", "a") as log:
        rc = subprocess.run([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.perf_counter() - t0


def weight_grid_error(cell_dir: Path) -> float | None:
    """||W - Q(W)|| / ||W|| over all quantized weights of a finished cell's final checkpoint: how
    close training left the weights to their quantization grid (what CAGE's term pulls on).
    Cached in grid.json, trusted while it is newer than the cell's metrics.json (a cell trained
    again gets a new value); None without a checkpoint or quantizer."""
    cache, metrics = cell_dir / "grid.json", cell_dir / "metrics.json"
    if cache.is_file() and (not metrics.is_file() or cache.stat().st_mtime >= metrics.stat().st_mtime):
        return json.loads(cache.read_text())["weight_rel_quant_error"]
    import torch

    from ...linear import QATLinear
    from ...naive import quantize
    from ..job import TrainConfig, build_model
    from ..job.checkpoint import load_model_state

    cfg = TrainConfig.from_dict(json.loads((cell_dir / "cell.json").read_text())["train_config"])
    if cfg.method == "bf16":
        return None
    weights = load_model_state(cell_dir)
    if weights is None:
        return None
    model, _, _ = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(weights)
    err = ref = 0.0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, QATLinear) and mod.weight_quant is not None:
                w = mod.weight.float()
                q, _ = quantize(w, mod.weight_quant)
                err += float((w - q).pow(2).sum())
                ref += float(w.pow(2).sum())
    val = math.sqrt(err / ref) if ref else None
    _write_json(cache, {"weight_rel_quant_error": val})
    return val


def collect(out: Path, cells: list[Cell]) -> list[dict]:
    recs = []
    for cell in cells:
        d = out / cell.name
        st = cell_status(d)
        r = {**dataclasses.asdict(cell), "name": cell.name, "status": st, "test": None, "val": None,
             "wall_time_s": None, "metrics": None}
        if st == "done":
            m = json.loads((d / "metrics.json").read_text())
            r.update(test=m["final_test_loss"], val=m["final_val_loss"], wall_time_s=m["wall_time_s"], metrics=m,
                     weight_rel_quant_error=weight_grid_error(d))
        elif st == "diverged":
            r["error"] = json.loads((d / "diverged.json").read_text())["error"]
        recs.append(r)
    return recs


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="run one sweep cell (see launch)")
    parser.add_argument("cell_dir")
    parser.add_argument("--time-limit", type=float)
    parser.add_argument("--parallel", default="none")
    a = parser.parse_args()
    sys.exit(run_cell(a.cell_dir, a.time_limit, a.parallel))

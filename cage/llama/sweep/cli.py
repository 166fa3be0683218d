"""Accuracy sweep: method (bf16, ste, quest, cage) x bits x seeds, plus a CAGE lambda/silence ablation.

Every cell is one ``cage train`` run in its own folder ``<out>/<cell>/`` (``metrics.json``,
``checkpoint.pt``, ``train.log``), started as a separate process (``--jobs`` at a time, each with
``--threads`` torch threads). All cells share the model, data, token budget and recipe; only the
method, the bits, the seed and (ablation cells only) CAGE's lambda and silence ratio differ.
``bf16`` has no bits: it runs once per seed and is the reference of every bit width.

Resumable: a cell whose ``metrics.json`` is complete (or that diverged: ``diverged.json``) is
skipped; a cell with a checkpoint but no final metrics continues from its checkpoint. Run the
same command again after an interruption.

Splits (``cage.llama.data``): the main table reports the final loss on ``test``; the ablation is read
on ``val`` only, and nothing is tuned on ``test``. The main table uses SPEC 2's defaults
(lambda 10, silence 0.8, linear ramp) exactly.

Report: ``<results-dir>/accuracy-<name>.json`` (``--name``, default the preset), ``.md`` and ``.png`` (loss against bits per
method); ``--results-dir`` defaults to ``<out>/results``, so that only a sweep told
``--results-dir benchmarks/results`` rewrites the committed results. Paths under the working
directory are recorded relative to it. Text between ``<!-- BEGIN FINDINGS -->`` and ``<!-- END FINDINGS -->`` in an existing
``.md`` is kept when the report is rewritten. ``--report-only`` rebuilds the report from the
cells that exist (a partial sweep gives a partial report, with each cell's n).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import glob
import json
import math
import os
import shlex
import time
from pathlib import Path

from ...config import GRIDS
from .cells import _write_json, cell_status, launch, prepare_cell
from .corpora import ASSEMBLED
from .plan import METHODS, SWEEP_PRESETS, Cell, plan_cells, steps_for_budget, train_config_dict
from .report import _code_info, _load_state, display_path, write_report


PATH_OPTIONS = ("out", "results_dir", "data")  # recorded relative to the working directory


def _floats(s):
    return tuple(float(x) for x in s.split(",") if x != "")


def _ints(s):
    return tuple(int(x) for x in s.split(",") if x != "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..job.cli import one_line_errors

    one_line_errors(p)
    p.add_argument("--preset", default="cpu", choices=list(SWEEP_PRESETS), help="sweep preset (default: cpu)")
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), help="comma list (default: bf16,ste,quest,cage)")
    p.add_argument("--bits", type=_ints, help="comma list of bit widths (default: the preset's)")
    p.add_argument("--seeds", type=_ints, help="comma list of seeds of the main matrix")
    p.add_argument("--ablation-seeds", type=_ints, help="comma list of seeds of the ablation (empty: no ablation)")
    p.add_argument("--ablation-bits", type=int, help="bit width of the ablation")
    p.add_argument("--lambdas", type=_floats, help="ablation lambdas, comma list")
    p.add_argument("--silences", type=_floats, help="ablation silence ratios, comma list")
    p.add_argument("--steps", type=int, help="optimizer steps per cell")
    p.add_argument("--tokens-per-param", type=float, help="training budget instead of --steps: tokens per "
                   "model parameter (steps = budget x parameters / (batch-size x seq-len), rounded)")
    p.add_argument("--time-limit", type=float, help="minutes for this invocation: cells in flight checkpoint "
                   "when it runs out and no cell starts after it; run the same command again to continue")
    p.add_argument("--whole-cells", action="store_true", help="with --time-limit: start a cell only when the "
                   "slowest finished cell of this sweep would still finish in the time left (for machines whose "
                   "checkpoints do not outlive the invocation, as a device lease: a paused cell would start over)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--grid", choices=GRIDS, help="the quantizer's grid of every quantized cell (cage train --grid; "
                   "bf16 cells have none): centered (default) or integer; a non-default grid names the sweep "
                   "<preset>-<grid>, so its cells never mix with the centered ones")
    p.add_argument("--model", help="cage.llama.model preset of every cell")
    p.add_argument("--dim", type=int)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--data", help=f"corpus path, or one assembled from a package: {', '.join(ASSEMBLED)} "
                   "(see cage/llama/sweep/corpora.py; default: the preset's)")
    p.add_argument("--jobs", type=int, help="cells run at once (separate processes)")
    p.add_argument("--threads", type=int, help="torch threads per cell (per process of a cell)")
    p.add_argument("--parallel", choices=("none", "ddp", "fsdp2"),
                   help="run each cell as --nproc-per-node processes under torchrun (cage train --parallel)")
    p.add_argument("--nproc-per-node", type=int, help="processes per cell with --parallel (default: 2)")
    p.add_argument("--name", help="name of the sweep: runs/sweep-<name>, accuracy-<name>.* (default: the preset)")
    p.add_argument("--out", help="folder of the cells (default: runs/sweep-<name>)")
    p.add_argument("--results-dir", help="where accuracy-<name>.* go (default: <out>/results; the committed "
                   "results are benchmarks/results)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the cells there, run nothing")
    p.add_argument("--max-cells", type=int, help="run at most this many cells in this invocation")


def preset_from_args(args: argparse.Namespace) -> dict:
    grid = getattr(args, "grid", None) or "centered"
    p = dict(SWEEP_PRESETS[args.preset], preset=args.preset, grid=grid,
             name=args.name or (args.preset if grid == "centered" else f"{args.preset}-{grid}"))
    p.setdefault("methods", METHODS)
    if getattr(args, "tokens_per_param", None) is not None:
        if getattr(args, "steps", None) is not None:
            raise ValueError("sweep: give --steps or --tokens-per-param, not both")
        if not (args.tokens_per_param > 0 and math.isfinite(args.tokens_per_param)):
            raise ValueError(f"sweep: --tokens-per-param must be > 0, got {args.tokens_per_param}")
    for k in ("methods", "bits", "seeds", "ablation_seeds", "ablation_bits", "lambdas", "silences", "steps",
              "batch_size", "seq_len", "eval_batches", "lr", "model", "dim", "n_layers", "n_heads", "data",
              "jobs", "threads"):
        v = getattr(args, k, None)
        if v is not None:
            p[k] = v
    if getattr(args, "tokens_per_param", None) is not None:
        p["tokens_per_param"] = args.tokens_per_param
        p["steps"] = steps_for_budget(p, args.tokens_per_param)
    check_preset(p)
    return p


def check_preset(p: dict) -> None:
    """ValueError naming the option of the first setting of the sweep that cannot run (the
    training settings of each cell are TrainConfig.validate's)."""

    def bad(msg):
        raise ValueError(f"sweep: {msg}")

    def listed(option, values, allowed=None, empty_ok=False):
        if not values and not empty_ok:
            bad(f"{option} is empty; give a comma list")
        dup = sorted({v for v in values if list(values).count(v) > 1}, key=str)
        if dup:
            bad(f"{option} lists {', '.join(map(str, dup))} more than once")
        if allowed is not None and any(v not in allowed for v in values):
            bad(f"{option} must be from {allowed}, got {[v for v in values if v not in allowed]}")

    listed("--methods", p["methods"], METHODS)
    listed("--seeds", p["seeds"])
    if any(m != "bf16" for m in p["methods"]):
        listed("--bits", p["bits"], tuple(range(1, 9)))
    listed("--ablation-seeds", p["ablation_seeds"], empty_ok=True)
    if p["ablation_seeds"]:
        listed("--lambdas", p["lambdas"])
        listed("--silences", p["silences"])
        if p["ablation_bits"] not in range(1, 9):
            bad(f"--ablation-bits must be in 1..8, got {p['ablation_bits']}")
    if p.get("grid", "centered") != "centered":
        quantized = [*(p["bits"] if any(m != "bf16" for m in p["methods"]) else ()),
                     *((p["ablation_bits"],) if p["ablation_seeds"] else ())]
        if any(b < 2 for b in quantized):
            bad(f"--grid {p['grid']} takes 2..8 bits; the sweep asks for {min(quantized)}")
    if p["jobs"] < 1:
        bad(f"--jobs must be >= 1, got {p['jobs']}")
    if p["threads"] is not None and p["threads"] < 1:
        bad(f"--threads must be >= 1, got {p['threads']}")
    data = p["data"]
    if data not in (None, *ASSEMBLED) and not (data and (Path(data).expanduser().exists() or (
            glob.has_magic(data) and glob.glob(os.path.expanduser(data), recursive=True)))):
        bad(f"--data {data} does not exist (give a text file, a folder of text files, a glob that matches "
            f"files, or one of {list(ASSEMBLED)})")


def command_line(args: argparse.Namespace) -> str:
    """The sweep's command with the options that were given (from the parsed arguments, so it is
    right whether the sweep came from the shell or from ``cli.main([...])``)."""
    parts = ["python -m cage sweep"]
    for k, v in vars(args).items():
        if k.startswith("_") or v is None or v is False or k == "command":
            continue
        flag = "--" + k.replace("_", "-")
        if k in PATH_OPTIONS:
            v = display_path(v)
        if v is True:
            parts.append(flag)
        elif isinstance(v, tuple):
            parts += [flag, shlex.quote(",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v))]
        else:
            parts += [flag, shlex.quote(str(v))]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    p = preset_from_args(args)
    if args.max_cells is not None and args.max_cells < 1:
        raise ValueError(f"sweep: --max-cells must be >= 1, got {args.max_cells}")
    out = Path(args.out or os.path.join("runs", f"sweep-{p['name']}"))
    results_dir = Path(args.results_dir) if args.results_dir else out / "results"
    cells = plan_cells(p)
    if args.report_only:
        if not (out / "sweep.json").is_file():
            raise ValueError(f"sweep --report-only: no sweep in {out} (no sweep.json); run the sweep first")
        write_report(out, results_dir, p, cells)
        print(f"sweep: report written to {results_dir}/accuracy-{p['name']}.*")
        return 0
    parallel, nproc = args.parallel or "none", args.nproc_per_node or 2
    if args.nproc_per_node is not None and (parallel == "none" or nproc < 1):
        raise ValueError(f"sweep: --nproc-per-node must be >= 1 and goes with --parallel ddp|fsdp2, "
                         f"got {args.nproc_per_node} with --parallel {parallel}")
    if args.time_limit is not None and not (args.time_limit > 0 and math.isfinite(args.time_limit)):
        raise ValueError(f"sweep: --time-limit must be a number of minutes > 0, got {args.time_limit}")
    if args.whole_cells and args.time_limit is None:
        raise ValueError("sweep: --whole-cells goes with --time-limit MIN")
    corpus = out / "corpus" / f"{p['data']}.txt"
    # relative to the working directory, as --out is: a sweep folder moved to another machine
    # (a device lease) continues there
    data = str(corpus) if p["data"] in ASSEMBLED else p["data"]
    configs = {c: train_config_dict(p, c, out, data) for c in cells}  # each validated: no work yet
    out.mkdir(parents=True, exist_ok=True)
    if p["data"] in ASSEMBLED:
        ASSEMBLED[p["data"]](corpus)
    dirs = {c: prepare_cell(out, c, configs[c]) for c in cells}
    todo = [c for c in cells if cell_status(dirs[c]) in ("todo", "partial", "failed")]
    finished = len(cells) - len(todo)
    later = ""
    if args.max_cells is not None and len(todo) > args.max_cells:
        later = f", {len(todo) - args.max_cells} left for a later call (--max-cells)"
        todo = todo[: args.max_cells]
    state = _load_state(out)
    inv = {"command": command_line(args),
           "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "wall_s": 0.0,
           "cells_to_run": len(todo)}
    state["invocations"].append(inv)
    state["code"] = _code_info()
    _write_json(out / "sweep.json", state)
    print(f"sweep {p['name']}: {len(cells)} cells, {finished} already finished, running {len(todo)} "
          f"({p['jobs']} at a time x {p['threads']} threads){later} in {out}", flush=True)
    t0 = time.perf_counter()
    deadline = None if args.time_limit is None else t0 + 60 * args.time_limit
    failures = 0

    def slowest_finished() -> float | None:
        secs = [json.loads((d / "metrics.json").read_text()).get("wall_time_s") for d in dirs.values()
                if cell_status(d) == "done"]
        secs = [s for s in secs if s is not None]
        return max(secs) if secs else None

    def one(c: Cell):
        d = dirs[c]
        limit = None
        if deadline is not None:
            limit = (deadline - time.perf_counter()) / 60
            if limit <= 0:
                return c, "not started (time limit)", 0.0
            need = slowest_finished() if args.whole_cells else None
            if need is not None and need > 60 * limit:
                return c, f"not started (needs ~{need:.0f}s, {60 * limit:.0f}s left)", 0.0
        (d / "failed.json").unlink(missing_ok=True)
        rc, secs = launch(d, p["threads"], limit, parallel, nproc)
        st = cell_status(d)
        if rc == 0 and st == "partial" and limit is not None:
            st = "paused (time limit)"  # checkpointed; the next invocation continues it
        elif rc != 0 or st not in ("done", "diverged"):
            _write_json(d / "failed.json", {"returncode": rc})
            st = "failed"
        return c, st, secs

    with concurrent.futures.ThreadPoolExecutor(max_workers=p["jobs"]) as pool:
        for i, fut in enumerate(concurrent.futures.as_completed([pool.submit(one, c) for c in todo]), 1):
            c, st, secs = fut.result()
            failures += st == "failed"
            extra = ""
            if st == "done":
                m = json.loads((dirs[c] / "metrics.json").read_text())
                extra = f" test {m['final_test_loss']:.4f} val {m['final_val_loss']:.4f}"
            print(f"[{i}/{len(todo)}] {c.name}: {st} in {secs:.0f}s{extra}  "
                  f"(sweep {time.perf_counter() - t0:.0f}s)", flush=True)
            inv["wall_s"] = time.perf_counter() - t0
            _write_json(out / "sweep.json", state)
            write_report(out, results_dir, p, cells)
    inv["wall_s"] = time.perf_counter() - t0
    inv["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _write_json(out / "sweep.json", state)
    write_report(out, results_dir, p, cells)
    left = [c for c in cells if cell_status(dirs[c]) not in ("done", "diverged")]
    print(f"sweep: done in {inv['wall_s']:.0f}s, {failures} failed, {len(left)} of {len(cells)} cells unfinished"
          + ("; run the same command again to continue" if left else "")
          + f"; report in {results_dir}/accuracy-{p['name']}.*", flush=True)
    return 1 if failures else 0

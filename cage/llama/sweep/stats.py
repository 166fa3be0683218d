"""The statistics of a sweep: per-cell summaries, paired differences, recovered fractions."""

from __future__ import annotations

import math
import statistics

from .plan import DEFAULT_LAMBDA, DEFAULT_SILENCE


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
    """CAGE's share of QuEST's gap to bf16 that it wins back: (quest - cage) / (quest - bf16).
    None when QuEST is not worse than bf16: there is no gap to recover, and the ratio's sign would flip."""
    if None in (bf16, quest, cage) or quest <= bf16:
        return None
    return (quest - cage) / (quest - bf16)


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Per-seed differences a - b over the seeds both have: the values, mean, std, standard error,
    and ``resolved`` = |mean| > 2 standard errors (needs n >= 2; no spread and a mean of 0 is not resolved)."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None
                   and math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = {s: a[s] - b[s] for s in seeds}
    st = summarize(list(diffs.values()))
    se = st["std"] / math.sqrt(st["n"]) if st["std"] is not None else None
    resolved = None if se is None else abs(st["mean"]) > 2 * se
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
        # judged once every planned cell has an outcome (a loss, or diverged): a cell still to
        # run leaves the claim open rather than failed
        finished = all(set(_by_seed(main, "test", method=m, **({} if m == "bf16" else {"bits": b}))) >= set(p["seeds"])
                       for m in p["methods"])
        per_bits[str(b)] = {
            "ranking": ranked,
            "paper_ranking_holds": None if not finished else (
                [m for m in ranked if m in expected] == [m for m in expected if m in ranked]
                and len(ranked) == len([m for m in expected if m in p["methods"]])),
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
        "holds": None if not per_bits or any(v["paper_ranking_holds"] is None for v in per_bits.values())
        else all(v["paper_ranking_holds"] for v in per_bits.values()),
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
                  paired_minus_quest=paired(vals, quest_val),
                  complete=st["diverged"] == 0 and set(vals) >= set(p["ablation_seeds"]))
        abl.append(st)
    # settings compete on the same seeds: only those finished on every ablation seed, none diverged
    done = [a for a in abl if a["complete"] and a["mean"] is not None]
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

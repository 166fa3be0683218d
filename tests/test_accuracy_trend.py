"""benchmarks/accuracy_trend.py: the trend report's numbers from the cells of each rung's sweep
(synthetic cells here; the real ladder is hours of CPU time)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def trend(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("accuracy_trend", ROOT / "benchmarks" / "accuracy_trend.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RUNS", tmp_path / "runs")
    return mod


def _record(method, bits, seed, test, lam=10.0, sil=0.8, val=None):
    role = "ablation" if (lam, sil) != (10.0, 0.8) else "main"
    return dict(method=method, bits=bits, seed=seed, cage_lambda=lam, silence_ratio=sil, role=role, status="done",
                test=test, val=test + 0.1 if val is None else val, wall_time_s=1.0, name="x",
                metrics={"params": 192960}, weight_rel_quant_error=0.2 if method == "cage" else 0.25)


def _cells(cage_gain):
    """bf16 2.0, quest W4 2.1 / W3 2.2, cage better than quest by cage_gain[seed], 3 seeds."""
    recs = []
    for seed, gain in enumerate(cage_gain):
        recs.append(_record("bf16", None, seed, 2.0 + 0.01 * seed))
        for b, q in ((4, 2.1), (3, 2.2)):
            recs.append(_record("quest", b, seed, q + 0.01 * seed))
            recs.append(_record("cage", b, seed, q + 0.01 * seed - gain))
    return recs


def test_rung_summary_pairs_by_seed_with_a_standard_error(trend, monkeypatch):
    (trend.RUNS / "plays-t10").mkdir(parents=True)
    monkeypatch.setattr(trend, "collect", lambda out, cells: _cells([0.01, 0.02, 0.03]))
    row = trend.rung_summary("plays", 10.0)
    d = row["per_bits"]["4"]["paired_cage_minus_quest"]
    assert d["mean"] == pytest.approx(-0.02) and d["n"] == 3
    assert d["standard_error"] == pytest.approx(0.01 / math.sqrt(3))
    assert d["resolved"] is True  # |mean| > 2 s.e.
    # _record's val is test + 0.1: the same paired difference on val
    assert row["per_bits"]["4"]["paired_cage_minus_quest_val"]["mean"] == pytest.approx(-0.02)
    # means over the seeds: quest 2.11, cage 2.09, bf16 2.01: (2.11 - 2.09) / (2.11 - 2.01)
    assert row["per_bits"]["4"]["recovered_fraction"] == pytest.approx(0.2)
    assert row["per_bits"]["3"]["grid_distance"] == {"quest": pytest.approx(0.25), "cage": pytest.approx(0.2)}
    assert row["tokens_per_param"] == 10.0 and row["steps"] > 0
    assert trend.rung_summary("enwiki", 10.0) is None  # no sweep folder: no row


def test_an_ablation_needs_a_non_default_setting_and_is_chosen_on_val(trend, monkeypatch):
    (trend.RUNS / "plays-t30").mkdir(parents=True)
    main = _cells([0.0, 0.0, 0.0])
    monkeypatch.setattr(trend, "collect", lambda out, cells: main)
    assert trend.ablation_summary("plays", 30.0, 3, "0") is None  # only the main cage cell
    ablated = main + [_record("cage", 3, 0, test=2.15, lam=20.0, sil=0.5, val=2.0),
                      _record("cage", 3, 0, test=2.05, lam=40.0, sil=0.5, val=2.5)]
    monkeypatch.setattr(trend, "collect", lambda out, cells: ablated)
    a = trend.ablation_summary("plays", 30.0, 3, "0")
    # lambda 40 has the lower test loss but the higher val loss: the choice is made on val
    assert (a["best_on_val"]["cage_lambda"], a["best_on_val"]["silence_ratio"]) == (20.0, 0.5)
    assert a["test"] == {"chosen": pytest.approx(2.15), "spec_default": pytest.approx(2.2), "quest": pytest.approx(2.2),
                         "seeds": [0]}
    # over two ablation seeds, a setting finished on one only does not compete; the test numbers
    # compare the chosen setting, the default and quest on the seeds all three finished
    two_seeds = ablated + [_record("cage", 3, 1, test=2.3, lam=40.0, sil=0.5, val=2.0)]
    monkeypatch.setattr(trend, "collect", lambda out, cells: two_seeds)
    a = trend.ablation_summary("plays", 30.0, 3, "0,1")
    assert (a["best_on_val"]["cage_lambda"], a["best_on_val"]["silence_ratio"]) == (40.0, 0.5)
    assert a["test"]["seeds"] == [0, 1] and a["test"]["chosen"] == pytest.approx((2.05 + 2.3) / 2)
    assert {(x["cage_lambda"], x["silence_ratio"]): x["complete"] for x in a["settings"]}[(20.0, 0.5)] is False


def test_report_writes_json_markdown_and_plot(trend, monkeypatch, tmp_path):
    (trend.RUNS / "plays-t1").mkdir(parents=True)
    (trend.RUNS / "enwiki-t3").mkdir(parents=True)
    monkeypatch.setattr(trend, "collect", lambda out, cells: _cells([0.01, -0.01, 0.0]))
    results = tmp_path / "results"
    assert trend.main(["report", "--results-dir", str(results)]) == 0
    rep = json.loads((results / "accuracy-trend.json").read_text())
    assert [(r["corpus"], r["tokens_per_param"]) for r in rep["rungs"]] == [("plays", 1.0), ("enwiki", 3.0)]
    md = (results / "accuracy-trend.md").read_text()
    assert "| plays | 1 |" in md and "+0.0000 ± 0.0058 (n=3)" in md
    assert (results / "accuracy-trend.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rung_extended_to_more_seeds_is_reported_with_all_of_them(trend, monkeypatch):
    out = trend.RUNS / "plays-t3"
    def cell(name, method, seed, role="main"):
        (out / name).mkdir(parents=True)
        (out / name / "cell.json").write_text(json.dumps({"cell": {"method": method, "bits": 4, "seed": seed, "role": role}}))

    for seed in range(5):
        cell(f"quest-w4-s{seed}", "quest", seed)
        cell(f"cage-w4-l20-r0.5-s{seed + 10}", "cage", seed + 10, role="ablation")
        cell(f"cage-w4-s{seed + 10}", "cage", seed + 10)  # the ablation's default setting is a main-role cell
    # ablation seeds are not main-matrix seeds: they have no quest or bf16 cell
    assert trend.main_seeds(out) == [0, 1, 2, 3, 4]
    assert trend.ablation_seeds(out, 4) == [10, 11, 12, 13, 14] and trend.ablation_seeds(out, 3) == []
    planned = {}

    def collect(out, cells):
        planned["seeds"] = sorted({c.seed for c in cells})
        return _cells([0.01, 0.02, 0.03, 0.02, 0.01])

    monkeypatch.setattr(trend, "collect", collect)
    row = trend.rung_summary("plays", 3.0)
    assert planned["seeds"] == [0, 1, 2, 3, 4]
    assert row["per_bits"]["4"]["paired_cage_minus_quest"]["n"] == 5
    assert trend.main_seeds(trend.RUNS / "enwiki-t3") == [0, 1, 2]  # nothing there yet: the preset's

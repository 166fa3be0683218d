"""benchmarks/grid_comparison.py and benchmarks/int8_parity.py: their reports pair runs by seed
(synthetic runs here; the real ones are hours of CPU time)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(mod, "machine_line", lambda: "test machine")
    return mod


def test_the_grid_report_pairs_integer_with_centered_by_seed(tmp_path, monkeypatch):
    grid = _load("grid_comparison", tmp_path, monkeypatch)
    records = {}
    for g, shift in (("centered", 0.0), ("integer", 0.01)):
        # seed 2 only on the centered grid: not a pair
        seeds = (0, 1, 2) if g == "centered" else (0, 1)
        records[("plays", g)] = [dict(method=m, bits=4, seed=s, test=1.7 + 0.1 * s + shift + 0.001 * s * (g == "integer"))
                                 for m in ("quest", "cage") for s in seeds]
    monkeypatch.setattr(grid, "_records", lambda corpus, g, rung, seeds: records.get((corpus, g), []))
    rep = grid.summary(10.0, "0,1,2")
    rows = {(r["corpus"], r["bits"], r["method"]): r for r in rep["rows"]}
    assert set(rows) == {("plays", 4, "quest"), ("plays", 4, "cage")}  # no enwiki, no W3 cell: no row
    d = rows[("plays", 4, "quest")]["integer_minus_centered"]
    assert d["n"] == 2 and math.isclose(d["mean"], 0.0105) and d["per_seed"] == pytest.approx({"0": 0.01, "1": 0.011})
    assert rows[("plays", 4, "quest")]["centered"]["n"] == 3
    assert "| plays | W4 | quest |" in grid.markdown(rep) and "test machine" in grid.markdown(rep)


def _run(d: Path, val, test, losses):
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"completed": True, "final_val_loss": val, "final_test_loss": test,
                                                "step": len(losses)}))
    (d / "train_log.csv").write_text("step,loss\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(losses)))


def test_the_int8_report_pairs_the_two_products_by_seed(tmp_path, monkeypatch):
    parity = _load("int8_parity", tmp_path, monkeypatch)
    for seed in (0, 1):
        for mm, off in (("dequant", 0.0), ("int8", 0.002 * (seed + 1))):
            _run(parity.run_dir("quest", mm, seed), 2.0 + seed + off, 2.1 + seed + off,
                 [3.0, 2.5 + off * 10, 2.2 + off])
    # a seed whose int8 run did not finish is left out
    _run(parity.run_dir("quest", "dequant", 2), 2.0, 2.1, [3.0])
    rep = parity.summary([0, 1, 2])
    (row,) = rep["rows"]
    assert row["method"] == "quest" and row["seeds"] == [0, 1]
    assert math.isclose(row["int8_minus_dequant_test"]["mean"], 0.003)
    assert row["max_step_loss_diff"] == pytest.approx({0: 0.02, 1: 0.04})
    assert row["first_step_loss_diff"] == {0: 0.0, 1: 0.0}
    assert row["first_step_over_1e-2"] == {0: 2, 1: 2}

"""The accuracy sweep: a miniature end to end (files, resume), the statistics on synthetic numbers,
and the presets (the GPU one is only built and stepped once, shrunk)."""

import json
import math

import pytest

from cage.llama import cli
from cage.llama import sweep
from cage.llama.sweep import Cell, aggregate, paired, plan_cells, recovered_fraction, summarize

# ---------------------------------------------------------------- miniature end to end


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    # A small corpus keeps each cell's start-up short (the default corpus is 5 MB).
    words = "to be or not to be that is the question whether tis nobler in the mind".split()
    text = "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400))
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(text)
    return path


def _argv(out, res, data):
    return [
        "sweep", "--preset", "tiny", "--methods", "bf16,quest,cage", "--bits", "4", "--seeds", "0",
        "--ablation-seeds", "", "--steps", "2", "--seq-len", "32", "--batch-size", "4",
        "--eval-batches", "1", "--jobs", "2", "--data", str(data), "--out", str(out), "--results-dir", str(res),
    ]


def test_miniature_sweep_writes_results_and_resumes(tmp_path, small_text, capsys):
    out, res = tmp_path / "runs", tmp_path / "results"
    assert cli.main(_argv(out, res, small_text)) == 0
    names = {"bf16-s0", "quest-w4-s0", "cage-w4-s0"}
    assert {p.name for p in out.iterdir() if p.is_dir()} == names
    for n in names:
        m = json.loads((out / n / "metrics.json").read_text())
        assert m["completed"] and m["step"] == 2 and math.isfinite(m["final_test_loss"])
        assert m["config"]["threads"] == 1 and m["config"]["seed"] == 0
    cage_cfg = json.loads((out / "cage-w4-s0" / "metrics.json").read_text())["config"]
    assert (cage_cfg["cage_lambda"], cage_cfg["silence_ratio"]) == (10.0, 0.8)  # SPEC defaults
    report = json.loads((res / "accuracy-tiny.json").read_text())
    cells = report["aggregate"]["cells"]
    assert cells["bf16"]["n"] == cells["quest-w4"]["n"] == cells["cage-w4"]["n"] == 1
    tests = {c["name"]: c["test"] for c in report["cells"]}
    assert cells["quest-w4"]["gap_to_bf16"] == pytest.approx(tests["quest-w4-s0"] - tests["bf16-s0"])
    rf = report["aggregate"]["per_bits"]["4"]["recovered_fraction"]["value"]
    assert rf == pytest.approx(recovered_fraction(tests["bf16-s0"], tests["quest-w4-s0"], tests["cage-w4-s0"]))
    grid = {c["name"]: c.get("weight_rel_quant_error") for c in report["cells"]}
    assert grid["bf16-s0"] is None and 0 < grid["quest-w4-s0"] < 1 and 0 < grid["cage-w4-s0"] < 1
    md = (res / "accuracy-tiny.md").read_text()
    assert "| quest |" in md and "python -m cage sweep --preset tiny" in md
    assert (res / "accuracy-tiny.png").read_bytes()[:4] == b"\x89PNG"

    # Findings written into the .md survive a rewrite of the report.
    (res / "accuracy-tiny.md").write_text(md.replace("\n## Setup", "\n<!-- BEGIN FINDINGS -->\nmy notes\n<!-- END FINDINGS -->\n\n## Setup", 1))

    # Second invocation: nothing to run. Then a cell that lost its metrics resumes from its checkpoint.
    capsys.readouterr()
    before = (out / "bf16-s0" / "metrics.json").read_text()
    assert cli.main(_argv(out, res, small_text)) == 0
    assert "3 already finished, running 0" in capsys.readouterr().out
    assert (out / "bf16-s0" / "metrics.json").read_text() == before
    (out / "quest-w4-s0" / "metrics.json").unlink()
    assert cli.main(_argv(out, res, small_text)) == 0
    log = capsys.readouterr().out
    assert "2 already finished, running 1" in log and "quest-w4-s0: done" in log
    assert "resuming at step 2" in (out / "quest-w4-s0" / "train.log").read_text()
    assert json.loads((out / "quest-w4-s0" / "metrics.json").read_text())["final_test_loss"] == pytest.approx(tests["quest-w4-s0"])
    assert "my notes" in (res / "accuracy-tiny.md").read_text()
    state = json.loads((out / "sweep.json").read_text())
    assert len(state["invocations"]) == 3

    # The same folder with other settings is refused instead of mixing two sweeps.
    argv = _argv(out, res, small_text)
    argv[argv.index("--steps") + 1] = "3"
    assert cli.main(argv) == 2


# ---------------------------------------------------------------- statistics


def test_summarize_and_paired():
    s = summarize([1.0, 2.0, 3.0, float("inf"), None])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    assert summarize([5.0])["std"] is None and summarize([])["mean"] is None
    p = paired({0: 1.0, 1: 2.0, 2: 3.5, 3: 9.0}, {0: 1.5, 1: 2.4, 2: 4.0})
    assert p["n"] == 3 and p["per_seed"] == {"0": -0.5, "1": pytest.approx(-0.4), "2": -0.5}
    assert p["mean"] == pytest.approx(-1.4 / 3)
    assert p["se"] == pytest.approx(p["std"] / math.sqrt(3)) and p["resolved"] is True
    assert paired({0: 1.0, 1: 2.0}, {0: 2.0, 1: 1.0})["resolved"] is False
    assert paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})["resolved"] is False  # no spread, no difference
    assert paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})["resolved"] is True  # no spread, a difference
    assert paired({0: 1.0}, {0: 2.0})["resolved"] is None  # one seed: no standard error


def test_recovered_fraction():
    assert recovered_fraction(3.0, 3.2, 3.15) == pytest.approx(0.25)
    assert recovered_fraction(3.0, 3.2, 3.25) == pytest.approx(-0.25)  # worse than quest
    assert recovered_fraction(3.0, 3.0, 3.1) is None and recovered_fraction(None, 3.2, 3.1) is None
    assert recovered_fraction(3.0, 2.99, 2.95) is None  # quest not worse than bf16: no gap to recover


def _records(losses, val_shift=0.0):
    """Records like sweep.collect's from {(method, bits, seed[, lambda, silence]): test loss}."""
    recs = []
    for key, loss in losses.items():
        method, bits, seed, *ab = key
        lam, sil = ab or (10.0, 0.8)
        role = "ablation" if ab and (lam, sil) != (10.0, 0.8) else "main"
        recs.append(dict(method=method, bits=bits, seed=seed, cage_lambda=lam, silence_ratio=sil, role=role,
                         status="diverged" if loss == "nan" else "done",
                         test=None if loss == "nan" else loss, val=None if loss == "nan" else loss + val_shift))
    return recs


def test_aggregate_on_synthetic_numbers():
    p = dict(methods=("bf16", "ste", "quest", "cage"), bits=(4, 3), seeds=(0, 1, 2), ablation_bits=3,
             lambdas=(5.0, 10.0), silences=(0.5, 0.8), ablation_seeds=(0, 1))
    base = {"bf16": 3.0, ("ste", 4): 3.8, ("quest", 4): 3.2, ("cage", 4): 3.15,
            ("ste", 3): "nan", ("quest", 3): 3.4, ("cage", 3): 3.19}
    losses = {}
    for seed, noise in zip((0, 1, 2), (-0.01, 0.0, 0.01)):
        losses[("bf16", None, seed)] = base["bf16"] + noise
        for b in (4, 3):
            for m in ("ste", "quest", "cage"):
                v = base[(m, b)]
                losses[(m, b, seed)] = v if v == "nan" else v + noise
    # Ablation on val: lambda 5 / silence 0.5 is best there.
    losses[("cage", 3, 0, 5.0, 0.5)] = 3.10
    losses[("cage", 3, 1, 5.0, 0.5)] = 3.11
    losses[("cage", 3, 0, 5.0, 0.8)] = 3.30
    losses[("cage", 3, 0, 10.0, 0.5)] = 3.25
    agg = aggregate(_records(losses, val_shift=0.05), p)
    c = agg["cells"]
    assert c["bf16"]["n"] == 3 and c["bf16"]["mean"] == pytest.approx(3.0) and c["bf16"]["std"] == pytest.approx(0.01)
    assert c["quest-w4"]["gap_to_bf16"] == pytest.approx(0.2) and c["cage-w4"]["gap_to_bf16"] == pytest.approx(0.15)
    assert c["ste-w3"]["n"] == 0 and c["ste-w3"]["diverged"] == 3
    pb = agg["per_bits"]
    assert pb["4"]["recovered_fraction"]["value"] == pytest.approx(0.25)
    assert pb["4"]["recovered_fraction"]["per_seed"]["0"] == pytest.approx(0.25)
    assert pb["3"]["recovered_fraction"]["value"] == pytest.approx(0.525)
    assert pb["4"]["ranking"] == ["bf16", "cage", "quest", "ste"] and pb["4"]["paper_ranking_holds"]
    assert pb["3"]["ranking"] == ["bf16", "cage", "quest", "ste"]  # diverged ranks last
    pc = pb["4"]["paired_cage_minus_quest"]
    assert pc["mean"] == pytest.approx(-0.05) and pc["std"] == pytest.approx(0.0, abs=1e-12) and pc["resolved"]
    cl = agg["claims"]
    assert cl["cage_w4_recovers_more_than_10pct_of_quest_gap"]["holds"] is True
    assert cl["cage_w3_le_quest_w4"]["holds"] is True  # 3.19 <= 3.2
    assert cl["ranking_bf16_cage_quest_ste_at_every_bits"]["holds"] is True
    ab = agg["ablation"]
    assert ab["split"] == "val" and ab["best"]["cage_lambda"] == 5.0 and ab["best"]["silence_ratio"] == 0.5
    assert ab["best_is_default"] is False
    default = next(a for a in ab["settings"] if a["is_default"])
    assert default["n"] == 2 and default["mean"] == pytest.approx(3.19 - 0.005 + 0.05)  # seeds 0 and 1, val
    assert default["paired_minus_quest"]["mean"] == pytest.approx(3.19 - 3.4)
    # Statistics use the seeds the compared cells share: a missing seed does not skew them.
    partial = [r for r in _records(losses) if not (r["method"] == "quest" and r["bits"] == 4 and r["seed"] == 2)]
    for r in partial:
        if r["method"] == "cage" and r["bits"] == 4 and r["seed"] == 2:
            r["test"] = 2.0  # would pull the recovered fraction far up if compared with quest's other seeds
    pb = aggregate(partial, p)["per_bits"]["4"]
    assert pb["recovered_fraction"]["seeds"] == [0, 1] and pb["recovered_fraction"]["value"] == pytest.approx(0.25)
    # A claim that fails is reported as failing.
    losses2 = dict(losses)
    for seed in (0, 1, 2):
        losses2[("cage", 4, seed)] = 3.25
    agg2 = aggregate(_records(losses2), p)
    assert agg2["per_bits"]["4"]["ranking"] == ["bf16", "quest", "cage", "ste"]
    assert agg2["claims"]["cage_w4_recovers_more_than_10pct_of_quest_gap"]["holds"] is False
    assert agg2["claims"]["ranking_bf16_cage_quest_ste_at_every_bits"]["holds"] is False
    # A cell still to run leaves the ranking claim open, not failed.
    todo = [r for r in _records(losses2) if not (r["method"] == "ste" and r["bits"] == 4 and r["seed"] == 1)]
    agg3 = aggregate(todo, p)
    assert agg3["per_bits"]["4"]["paper_ranking_holds"] is None and agg3["per_bits"]["3"]["paper_ranking_holds"] is True
    assert agg3["claims"]["ranking_bf16_cage_quest_ste_at_every_bits"]["holds"] is None


def test_the_ablation_choice_compares_settings_finished_on_every_seed():
    p = dict(methods=("quest", "cage"), bits=(3,), seeds=(0, 1), ablation_bits=3,
             lambdas=(10.0, 20.0, 40.0), silences=(0.8,), ablation_seeds=(0, 1))
    losses = {("quest", 3, 0): 3.4, ("quest", 3, 1): 3.41, ("cage", 3, 0): 3.3, ("cage", 3, 1): 3.31,
              ("cage", 3, 0, 20.0, 0.8): 3.0,  # best on its one finished seed, the other still to run
              ("cage", 3, 0, 40.0, 0.8): 2.9, ("cage", 3, 1, 40.0, 0.8): "nan"}  # one seed diverged
    ab = aggregate(_records(losses), p)["ablation"]
    assert (ab["best"]["cage_lambda"], ab["best"]["silence_ratio"]) == (10.0, 0.8) and ab["best_is_default"]
    complete = {a["cage_lambda"]: a["complete"] for a in ab["settings"]}
    assert complete == {10.0: True, 20.0: False, 40.0: False}


# ---------------------------------------------------------------- presets


def _preset(name, **kw):
    return dict(sweep.SWEEP_PRESETS[name], preset=name, methods=sweep.METHODS, **kw)


def test_cpu_preset_plan():
    cells = plan_cells(_preset("cpu"))
    main = [c for c in cells if c.role == "main"]
    assert len(main) == 8 * (1 + 3 * 3)  # seeds x (bf16 + 3 methods x 3 bits)
    assert len(cells) == len(main) + 3 * 5  # the ablation's default setting is the main cage cell
    assert len({c.name for c in cells}) == len(cells)
    assert Cell("cage", 3, 0) in cells and Cell("cage", 3, 1, 20.0, 0.5, "ablation") in cells
    assert [c.seed for c in main] == sorted(c.seed for c in main)  # seed by seed
    # comparable pairs first inside a seed: a sweep cut short leaves whole cage - quest pairs
    assert [c.name for c in main[:7]] == ["quest-w4-s0", "cage-w4-s0", "quest-w3-s0", "cage-w3-s0",
                                          "quest-w2-s0", "cage-w2-s0", "bf16-s0"]


def test_gpu_preset_is_the_paper_30M_shape_and_steps(tmp_path, small_text):
    import torch

    from cage.llama.model import Llama, count_params
    from cage.llama.job import TrainConfig, train

    p = _preset("30M")
    d = sweep.train_config_dict(p, Cell("cage", 4, 0), tmp_path, "corpus.txt")
    cfg = TrainConfig.from_dict(d)
    mc = cfg.model_config()
    assert (mc.dim, mc.n_layers, mc.n_heads, cfg.seq_len, cfg.peak_lr) == (640, 6, 5, 512, 1.2e-3)
    with torch.device("meta"):
        n = count_params(Llama(mc), non_embedding=True)
    assert 25e6 < n < 35e6
    # Shrunk to a few hundred thousand parameters, one step of the same recipe runs.
    small = sweep.train_config_dict(dict(p, steps=1, seq_len=32, batch_size=2, eval_batches=1, dim=64, n_heads=2, n_layers=1),
                                    Cell("cage", 4, 0), tmp_path, str(small_text))
    m = train(TrainConfig.from_dict({**small, "out": None, "verbose": False, "silence_ratio": 0.0}))
    assert m["completed"] and math.isfinite(m["final_test_loss"])


def test_the_grid_distance_cache_is_dropped_when_the_cell_trains_again(tmp_path):
    import json
    import os

    from cage.llama.job import TrainConfig
    from cage.llama.sweep.cells import weight_grid_error

    (tmp_path / "cell.json").write_text(json.dumps({"train_config": TrainConfig(method="bf16").to_dict()}))
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "grid.json").write_text(json.dumps({"weight_rel_quant_error": 0.5}))
    assert weight_grid_error(tmp_path) == 0.5  # cached after the metrics
    os.utime(tmp_path / "grid.json", (1, 1))  # the cell's metrics.json is newer: recomputed (bf16 has no grid)
    assert weight_grid_error(tmp_path) is None

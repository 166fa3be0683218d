"""``cage sweep``'s options: checked before any cell starts; results go where the user says (by
default under the sweep's own folder, never over the committed ones); recorded paths are
relative to the working directory."""

import json
from pathlib import Path

import pytest

from cage.llama import cli
from cage.llama.sweep import cli as sweep_cli
from cage.llama.sweep.report import _code_info, display_path

REPO = Path(__file__).resolve().parents[1]

TINY = ["sweep", "--preset", "tiny", "--methods", "bf16,quest", "--bits", "4", "--seeds", "0", "--ablation-seeds", "",
        "--steps", "2"]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working folder, a small corpus in it, and cells that never really run: each
    launch is recorded and does nothing (so the cell ends up failed)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("to be or not to be that is the question\n" * 100)
    launched = []

    def launch(cell_dir, threads, *rest):
        launched.append(Path(cell_dir).name)
        return 0, 0.0

    monkeypatch.setattr(sweep_cli, "launch", launch)
    return tmp_path, launched


BAD_OPTIONS = [
    (["--data", "/nonexistent/corpus.txt"], "--data /nonexistent/corpus.txt does not exist"),
    (["--data", ""], "--data  does not exist"),
    (["--seeds", ""], "--seeds is empty"),
    (["--seeds", "0,1,0"], "--seeds lists 0 more than once"),
    (["--bits", ""], "--bits is empty"),
    (["--bits", "4,16"], "--bits must be from"),
    (["--methods", "quest,int8"], "--methods must be from"),
    (["--methods", ""], "--methods"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--max-cells", "-1"], "--max-cells must be >= 1"),
    (["--ablation-seeds", "0", "--lambdas", ""], "--lambdas is empty"),
    (["--ablation-seeds", "0", "--ablation-bits", "16"], "--ablation-bits must be in 1..8"),
    (["--steps", "-3"], "--steps must be an integer >= 1"),  # a cell's TrainConfig.validate
    (["--report-only"], "no sweep in"),
]


@pytest.mark.parametrize("extra, message", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_option_stops_the_sweep_before_any_cell(extra, message, work, capsys):
    folder, launched = work
    assert cli.main([*TINY, "--data", "text.txt", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cage sweep: error: ") and message in err and "Traceback" not in err
    assert launched == [] and sorted(p.name for p in folder.iterdir()) == ["text.txt"]  # nothing written


def test_results_default_to_the_sweep_folder_and_paths_are_recorded_relative(work):
    folder, launched = work
    assert cli.main([*TINY, "--data", str(folder / "text.txt"), "--out", str(folder / "runs" / "mine")]) == 1
    assert sorted(launched) == ["bf16-s0", "quest-w4-s0"]
    report = json.loads((folder / "runs" / "mine" / "results" / "accuracy-tiny.json").read_text())
    assert not (folder / "benchmarks").exists()
    command = report["run_info"]["invocations"][0]["command"]
    assert "--out runs/mine" in command and "--data text.txt" in command and str(folder) not in command
    assert report["preset"]["data"] == "text.txt"
    cell = json.loads((folder / "runs" / "mine" / "bf16-s0" / "cell.json").read_text())
    assert cell["train_config"]["data"] == str(folder / "text.txt")  # the cells still find their corpus


def test_an_explicit_results_dir_is_used(work):
    folder, _ = work
    assert cli.main([*TINY, "--data", "text.txt", "--results-dir", "elsewhere"]) == 1
    assert (folder / "elsewhere" / "accuracy-tiny.md").is_file()
    assert not (folder / "runs" / "sweep-tiny" / "results").exists()


def test_display_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert display_path(str(tmp_path / "a" / "b")) == "a/b"
    assert display_path("a/b") == "a/b"
    assert display_path("/somewhere/else") == "/somewhere/else"  # outside: as given
    assert display_path(None) is None and display_path("plays+stdlib") == "plays+stdlib"
    monkeypatch.chdir(REPO)
    assert _code_info()["package"] == "."


def test_a_value_argparse_rejects_is_one_line(work, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["sweep", "--jobs", "two"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("cage sweep: error: argument --jobs") and err.count("\n") == 1


def test_a_glob_is_a_data_path_the_sweep_accepts(work, capsys):
    folder, launched = work
    assert cli.main([*TINY, "--data", "*.txt"]) == 1  # the cells ran (and "failed": launch is stubbed)
    assert launched
    assert cli.main([*TINY, "--data", "*.nothing"]) == 2
    assert "--data *.nothing does not exist" in capsys.readouterr().err


def test_the_grid_goes_to_the_quantized_cells(work, capsys):
    folder, launched = work
    argv = ["sweep", "--preset", "trend", "--tokens-per-param", "1", "--methods", "bf16,quest,cage", "--bits", "4",
            "--seeds", "0", "--grid", "integer", "--data", "text.txt"]
    assert cli.main(argv) == 1  # launch is stubbed: every cell "failed"
    out = folder / "runs" / "sweep-trend-integer"  # the grid names the default sweep
    cfgs = {d.name: json.loads((d / "cell.json").read_text())["train_config"]
            for d in out.iterdir() if (d / "cell.json").is_file()}
    assert {k: v["grid"] for k, v in cfgs.items()} == {"quest-w4-s0": "integer", "cage-w4-s0": "integer",
                                                       "bf16-s0": "centered"}  # bf16 quantizes nothing
    assert len({v["steps"] for v in cfgs.values()}) == 1  # the budget ladder's steps, whatever the grid
    report = json.loads((out / "results" / "accuracy-trend-integer.json").read_text())
    assert report["preset"]["grid"] == "integer"
    assert "integer grid" in (out / "results" / "accuracy-trend-integer.md").read_text()
    # the centered sweep of the same preset is another folder; a grid changed under a sweep is refused
    assert cli.main([*argv[:-4], "--data", "text.txt"]) == 1 and (folder / "runs" / "sweep-trend").is_dir()
    capsys.readouterr()
    assert cli.main([*argv[:-4], "--grid", "centered", "--out", str(out), "--data", "text.txt"]) == 2
    assert "grid: 'integer' -> 'centered'" in capsys.readouterr().err
    assert cli.main(["sweep", "--preset", "tiny", "--bits", "1", "--grid", "integer"]) == 2
    assert "--grid integer takes 2..8 bits" in capsys.readouterr().err


def test_an_integer_grid_cell_trains_on_that_grid(tmp_path, monkeypatch):
    from cage.llama.sweep.cells import prepare_cell, run_cell
    from cage.llama.sweep.plan import Cell, SWEEP_PRESETS, train_config_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("to be or not to be that is the question\n" * 100)
    p = {**SWEEP_PRESETS["tiny"], "steps": 2, "seq_len": 32, "eval_batches": 1, "grid": "integer"}
    cell = Cell("cage", 4, 0)
    d = prepare_cell(tmp_path, cell, train_config_dict(p, cell, tmp_path, "text.txt"))
    assert run_cell(str(d)) == 0
    m = json.loads((d / "metrics.json").read_text())
    assert m["completed"] and m["weight_quant"]["grid"] == m["activation_quant"]["grid"] == "integer"


def test_a_cell_written_before_the_grid_option_is_the_same_cell(tmp_path):
    from cage.llama.sweep.cells import prepare_cell
    from cage.llama.sweep.plan import Cell, SWEEP_PRESETS, train_config_dict

    cell = Cell("quest", 4, 0)
    tcfg = train_config_dict(SWEEP_PRESETS["tiny"], cell, tmp_path, None)
    d = prepare_cell(tmp_path, cell, tcfg)
    old = json.loads((d / "cell.json").read_text())
    del old["train_config"]["grid"], old["train_config"]["matmul"]
    (d / "cell.json").write_text(json.dumps(old))
    prepare_cell(tmp_path, cell, tcfg)  # no "made with other settings"

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

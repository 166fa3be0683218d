"""Sweeps sized by a training budget, cut into time-limited invocations, and the assembled
Wikipedia corpus (issue 11)."""

import bz2
import json
from pathlib import Path

import pytest

from cage.llama import cli
from cage.llama.sweep import cells as cells_mod
from cage.llama.sweep import corpora
from cage.llama.sweep.cli import add_arguments, preset_from_args
from cage.llama.sweep.plan import steps_for_budget


def _args(*argv):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_tokens_per_param_sets_the_steps_from_the_model_size():
    import torch

    from cage.llama.model import Llama, config_from_preset, count_params

    p = preset_from_args(_args("--preset", "tiny", "--tokens-per-param", "10"))
    params = count_params(Llama(config_from_preset("tiny", max_seq_len=p["seq_len"])))
    assert p["tokens_per_param"] == 10
    assert p["steps"] == round(10 * params / (p["batch_size"] * p["seq_len"]))
    assert steps_for_budget(dict(p, batch_size=2 * p["batch_size"]), 10) == pytest.approx(p["steps"] / 2, abs=1)
    assert torch.get_default_device().type == "cpu"  # the meta device did not leak


@pytest.mark.parametrize("argv, message", [
    (("--tokens-per-param", "3", "--steps", "10"), "give --steps or --tokens-per-param, not both"),
    (("--tokens-per-param", "0"), "--tokens-per-param must be > 0"),
    (("--tokens-per-param", "nan"), "--tokens-per-param must be > 0"),
])
def test_bad_budget_is_an_error(argv, message):
    with pytest.raises(ValueError, match=message):
        preset_from_args(_args("--preset", "tiny", *argv))


def test_time_limited_invocations_pause_cells_and_the_next_one_finishes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("to be or not to be that is the question\n" * 200)
    argv = ["sweep", "--preset", "tiny", "--methods", "quest,cage", "--bits", "4", "--seeds", "0",
            "--ablation-seeds", "", "--steps", "6", "--data", "text.txt", "--out", "sw", "--jobs", "1"]
    # the first cell gets well under a second of training: it checkpoints early and pauses;
    # the limit has passed when it returns, so the second cell does not start
    assert cli.main([*argv, "--time-limit", "0.0001"]) == 0
    assert cells_mod.cell_status(tmp_path / "sw" / "quest-w4-s0") == "partial"
    assert cells_mod.cell_status(tmp_path / "sw" / "cage-w4-s0") == "todo"
    assert cli.main(argv) == 0
    for name in ("quest-w4-s0", "cage-w4-s0"):
        m = json.loads((tmp_path / "sw" / name / "metrics.json").read_text())
        assert m["completed"] and m["step"] == 6
    assert "time limit of" in (tmp_path / "sw" / "quest-w4-s0" / "train.log").read_text()


def test_whole_cells_starts_only_a_cell_that_fits_in_the_time_left(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("to be or not to be that is the question\n" * 200)
    argv = ["sweep", "--preset", "tiny", "--methods", "quest,cage", "--bits", "4", "--seeds", "0",
            "--ablation-seeds", "", "--steps", "4", "--data", "text.txt", "--out", "sw", "--jobs", "1"]
    assert cli.main([*argv, "--max-cells", "1"]) == 0  # quest-w4-s0 finishes
    # the cell left for later is not counted as finished
    assert "0 already finished, running 1 (1 at a time x 1 threads), 1 left for a later call" in capsys.readouterr().out
    metrics = tmp_path / "sw" / "quest-w4-s0" / "metrics.json"
    m = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**m, "wall_time_s": 600.0}))  # as if a cell took 10 minutes
    capsys.readouterr()
    assert cli.main([*argv, "--time-limit", "5", "--whole-cells"]) == 0
    assert "cage-w4-s0: not started (needs ~600s, " in capsys.readouterr().out
    assert cells_mod.cell_status(tmp_path / "sw" / "cage-w4-s0") == "todo"
    metrics.write_text(json.dumps(m))  # at its real speed the next cell fits
    assert cli.main([*argv, "--time-limit", "5", "--whole-cells"]) == 0
    assert cells_mod.cell_status(tmp_path / "sw" / "cage-w4-s0") == "done"
    assert cli.main([*argv, "--whole-cells"]) == 2
    assert "--whole-cells goes with --time-limit" in capsys.readouterr().err


def test_bad_time_limit_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "--preset", "tiny", "--time-limit", "-1"]) == 2
    assert "--time-limit must be a number of minutes > 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


WIKITEXT = """{{Infobox person|name=Ada|born={{birth date|1815|12|10}}}}
'''Ada Lovelace''' was an English [[mathematician]] and [[Writer|writer]].<ref>{{cite book|title=X}}</ref>
[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]]]]

== Early life ==
She was born in [[London]] on 10 December 1815.<ref name="b"/> See [http://example.org the archive].
{| class="wikitable"
| a || b
|}
* She wrote the first program.
<!-- a hidden comment -->
[[Category:Mathematicians]]
[[de:Ada Lovelace]]"""


def test_wiki_markup_is_stripped_to_prose():
    text = corpora.strip_wiki_markup(WIKITEXT)
    assert text.splitlines() == [
        "Ada Lovelace was an English mathematician and writer.", "",
        "Early life",
        "She was born in London on 10 December 1815. See the archive.", "",
        "She wrote the first program.",
    ]


def test_articles_of_a_dump_leave_out_redirects(tmp_path):
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    page = "<page><title>{}</title><revision><text>{}</text></revision></page>"
    xml = (f'<mediawiki xmlns="{ns}">' + page.format("Ada", "'''Ada''' wrote [[code]].")
           + page.format("AL", "#REDIRECT [[Ada]]") + page.format("Empty", "{{stub}}") + "</mediawiki>")
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(xml.encode()))
    assert list(corpora.wiki_articles(dump)) == [("Ada", "Ada wrote code.")]


def test_enwiki_without_gensim_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gensim==4.4.0"):
        corpora.enwiki_dump()


def test_enwiki_is_a_data_name_the_sweep_accepts():
    p = preset_from_args(_args("--preset", "tiny", "--data", "enwiki"))
    assert p["data"] == "enwiki" and "enwiki" in corpora.ASSEMBLED
    assert Path(corpora.ENWIKI_FILE).suffix == ".bz2"


def test_a_cell_recorded_with_an_absolute_corpus_path_continues_with_the_relative_one(tmp_path, monkeypatch):
    from cage.llama.sweep.plan import Cell, SWEEP_PRESETS, train_config_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("x")
    (tmp_path / "other.txt").write_text("y")
    p = dict(SWEEP_PRESETS["tiny"], methods=("quest",))
    cell = Cell("quest", 4, 0)
    cells_mod.prepare_cell(tmp_path / "sw", cell, train_config_dict(p, cell, Path("sw"), str(tmp_path / "c.txt")))
    cells_mod.prepare_cell(tmp_path / "sw", cell, train_config_dict(p, cell, Path("sw"), "c.txt"))  # same file
    with pytest.raises(ValueError, match="was made with other settings.*data"):
        cells_mod.prepare_cell(tmp_path / "sw", cell, train_config_dict(p, cell, Path("sw"), "other.txt"))


def test_a_sweep_cell_runs_under_torchrun_and_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("to be or not to be that is the question\n" * 200)
    base = ["sweep", "--preset", "tiny", "--methods", "quest", "--bits", "4", "--seeds", "0", "--ablation-seeds", "",
            "--steps", "4", "--data", "text.txt", "--threads", "1"]
    assert cli.main([*base, "--out", "one"]) == 0
    assert cli.main([*base, "--out", "two", "--parallel", "ddp", "--nproc-per-node", "2"]) == 0
    one, two = (json.loads((tmp_path / o / "quest-w4-s0" / "metrics.json").read_text()) for o in ("one", "two"))
    assert two["completed"] and (tmp_path / "two" / "quest-w4-s0" / "checkpoint").is_dir()  # the DCP format
    assert two["final_test_loss"] == pytest.approx(one["final_test_loss"], rel=1e-4)


def test_nproc_per_node_needs_parallel(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "--preset", "tiny", "--nproc-per-node", "2"]) == 2
    assert "--nproc-per-node must be >= 1 and goes with --parallel" in capsys.readouterr().err

"""``cage train --grid centered|integer`` (the quantizer's grid: part of what is trained) and
``--matmul auto|dequant|int8|int8-fused`` (how the QAT layers multiply: a runtime option that
may change on --resume)."""

import json

import pytest
import torch

from cage import QATLinear, QuantConfig
from cage.llama import cli
from cage.llama.job import TrainConfig, build_model, train
from cage.llama.job.build import quant_configs

TINY = ["--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
        "--eval-every", "2", "--threads", "1", "--quiet"]


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 300)
    return path


def test_the_grid_reaches_the_quantizers_and_the_default_is_centered():
    assert TrainConfig().grid == "centered" and TrainConfig().matmul == "auto"
    for method, hadamard, mask in (("ste", False, "none"), ("quest", True, "trust"), ("cage", True, "trust")):
        wq, aq = quant_configs(TrainConfig(method=method, grid="integer", bits=3), 64)
        assert wq == aq == QuantConfig(3, hadamard=hadamard, block_size=64 if hadamard else 128, grad_mask=mask,
                                       grid="integer")
    wq, _ = quant_configs(TrainConfig(method="cage"), 64)
    assert wq.grid == "centered"
    model, wq, aq = build_model(TrainConfig(preset="tiny", grid="integer", matmul="int8"), torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    assert layers and all(m.weight_quant.grid == "integer" and m.matmul == "int8" for m in layers)


@pytest.mark.parametrize("argv, words", [
    (["--grid", "zero"], ["--grid", "invalid choice"]),
    (["--grid", "integer", "--bits", "1"], ["--grid integer", "2..8 bits", "--bits"]),
    (["--grid", "integer", "--method", "bf16"], ["--grid", "method bf16 quantizes nothing"]),
    (["--matmul", "int4"], ["--matmul", "invalid choice"]),
    (["--matmul", "int8", "--method", "bf16"], ["--matmul", "method bf16"]),
])
def test_bad_grid_or_matmul_is_one_line(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main(["train", *TINY, *argv])
    except SystemExit as stop:  # argparse's own refusals
        rc = stop.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert list(tmp_path.iterdir()) == []


def test_int8_fused_needs_triton_where_it_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["train", *TINY, "--device", "cpu", "--matmul", "int8-fused"]) == 2
    err = capsys.readouterr().err
    assert "--matmul int8-fused" in err and err.count("\n") == 1


def test_an_integer_grid_run_records_it_and_its_resume_checks_it(tmp_path, small_text, capsys):
    out = tmp_path / "int"
    argv = ["train", *TINY, "--data", str(small_text), "--out", str(out), "--grid", "integer"]
    assert cli.main([*argv, "--stop-after", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["grid"] == "integer" and m["weight_quant"]["grid"] == "integer"
    assert m["activation_quant"]["grid"] == "integer" and m["grid"] == "integer"
    # another grid is another run: refused with the difference
    assert cli.main(["train", "--resume", "--out", str(out), "--grid", "centered"]) == 2
    assert "grid: checkpoint 'integer', now 'centered'" in capsys.readouterr().err
    # the run's own grid comes from its checkpoint; --matmul may change on resume
    assert cli.main(["train", "--resume", "--quiet", "--out", str(out), "--matmul", "int8"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["completed"] and m["config"]["grid"] == "integer" and m["config"]["matmul"] == "int8"


def test_the_default_folder_names_a_non_default_grid():
    from cage.llama.job.config import default_out_dir

    assert default_out_dir(TrainConfig()) == "runs/cage-w4a4-cpu-seed0"
    assert default_out_dir(TrainConfig(grid="integer")) == "runs/cage-w4a4-integer-cpu-seed0"


def test_a_checkpoint_from_before_the_grid_option_resumes(tmp_path, small_text):
    run = dict(preset="tiny", steps=4, batch_size=2, seq_len=32, eval_batches=1, eval_every=2, threads=1,
               verbose=False, data=str(small_text), out=str(tmp_path / "old"))
    train(TrainConfig(stop_after=2, **run))
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("grid", "matmul"):
        del ckpt["config"][key]  # as written before the options existed
    torch.save(ckpt, path)
    assert train(TrainConfig(resume=True, **run))["completed"]
    assert cli.main(["train", "--resume", "--quiet", "--out", run["out"]]) == 0


def test_int8_matmul_trains_like_the_dequantized_product(tmp_path, small_text):
    run = dict(method="quest", preset="tiny", steps=3, batch_size=2, seq_len=32, eval_batches=1, threads=1,
               verbose=False, data=str(small_text))
    a = train(TrainConfig(**run))
    b = train(TrainConfig(matmul="int8", **run))
    assert b["config"]["matmul"] == "int8"
    assert b["final_val_loss"] == pytest.approx(a["final_val_loss"], rel=1e-4)

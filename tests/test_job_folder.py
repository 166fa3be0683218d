"""A run's folder over its life (issue 18 items 2, 3 and 9): a run started with --overwrite
resumes with the command it prints, after --stop-after, --time-limit and once finished."""

import json
import shlex

import pytest

from cage.llama import cli
from cage.llama.job import TrainConfig, train
from cage.llama.job import loop as loop_mod

# printed lines wanted: no --quiet
TINY = ["--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
        "--eval-every", "2", "--threads", "1"]


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 300)
    return path


def printed_resume_command(text: str) -> list[str]:
    """The argv of the `python -m cage train ... --resume ...` command a run printed (last one)."""
    lines = [line for line in text.splitlines() if "python -m cage train" in line]
    assert lines, text
    cmd = shlex.split(lines[-1].split("python -m cage train", 1)[1])
    return ["train", *cmd]


def test_a_run_started_with_overwrite_resumes_with_the_printed_command(tmp_path, small_text, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--data", str(small_text), "--out", str(out)]
    assert cli.main([*argv, "--stop-after", "1"]) == 0
    capsys.readouterr()
    # --overwrite replaces it; the new run stops after step 1 and says how to continue
    assert cli.main([*argv, "--overwrite", "--seed", "1", "--stop-after", "1"]) == 0
    again = printed_resume_command(capsys.readouterr().out)
    assert "--resume" in again and str(out) in again
    assert cli.main(again + ["--stop-after", "3"]) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["step"] == 3 and not m["completed"] and m["config"]["seed"] == 1
    assert cli.main(again) == 0, capsys.readouterr().err  # to the end
    assert json.loads((out / "metrics.json").read_text())["completed"]
    capsys.readouterr()
    assert cli.main(again) == 0  # a finished run: nothing to do, not an error
    assert "already complete" in capsys.readouterr().out


def test_a_time_limited_overwrite_run_resumes(tmp_path, small_text, capsys, monkeypatch):
    out = tmp_path / "t"
    clock = iter(range(0, 10_000, 60))  # each reading of the loop's clock: one more minute
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: float(next(clock)))
    assert cli.main(["train", *TINY, "--data", str(small_text), "--out", str(out), "--overwrite",
                     "--time-limit", "1.5"]) == 0
    monkeypatch.undo()
    again = printed_resume_command(capsys.readouterr().out)
    assert not json.loads((out / "metrics.json").read_text())["completed"]
    assert cli.main(again) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["completed"]


def test_in_process_resume_of_an_overwrite_run(tmp_path, small_text):
    run = dict(preset="tiny", steps=4, batch_size=2, seq_len=32, eval_batches=1, threads=1, verbose=False,
               data=str(small_text), out=str(tmp_path / "r"))
    train(TrainConfig(overwrite=True, stop_after=2, **run))
    assert train(TrainConfig(resume=True, **run))["completed"]


def test_the_printed_resume_command_is_shell_quoted(tmp_path, small_text, capsys):
    out = tmp_path / "it's a $run"  # a space, a quote and a dollar sign
    assert cli.main(["train", *TINY, "--data", str(small_text), "--out", str(out), "--stop-after", "1"]) == 0
    again = printed_resume_command(capsys.readouterr().out)
    assert again == ["train", "--resume", "--out", str(out)]
    assert cli.main(again) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["completed"]


def test_the_interrupt_message_quotes_the_folder(tmp_path):
    from cage.llama.job.distributed import Parallel

    out = tmp_path / "a b"
    msg = str(loop_mod._interrupted(2, 5, TrainConfig(out=str(out)), out, Parallel()))
    assert shlex.split(msg.splitlines()[-1]) == ["python", "-m", "cage", "train", "--resume", "--out", str(out)]


def die_at_step(monkeypatch, n: int):
    """Make train_step raise MemoryError at its n-th call (a run killed before it checkpointed)."""
    real, calls = loop_mod.train_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise MemoryError("out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(loop_mod, "train_step", step)


def test_a_run_that_died_before_its_first_checkpoint_starts_again(tmp_path, small_text, capsys, monkeypatch):
    out = tmp_path / "died"
    argv = ["train", *TINY, "--data", str(small_text), "--out", str(out)]
    die_at_step(monkeypatch, 2)  # the first checkpoint is at step 2 (--eval-every 2)
    with pytest.raises(MemoryError):
        cli.main(argv)
    monkeypatch.undo()
    left = {p.name for p in out.iterdir()}
    assert "train_log.csv" in left and not {"checkpoint.pt", "metrics.json"} & left
    capsys.readouterr()
    # --resume has nothing to continue: it says what to do
    assert cli.main(["train", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint" in err and "before its first checkpoint" in err
    assert "without --resume" in err
    # and that works: the leftovers are replaced, the run trains from step 0
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "stopped before its first checkpoint" in printed and "train_log.csv" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["completed"] and [e["step"] for e in m["evals"]][:1] == [0]
    with open(out / "train_log.csv") as f:
        assert [line.split(",")[0] for line in f][1:] == ["1", "2", "3", "4"]


def test_a_folder_with_a_checkpoint_or_metrics_is_still_refused(tmp_path, small_text, capsys):
    out = tmp_path / "kept"
    argv = ["train", *TINY, "--data", str(small_text), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--stop-after", "2"]) == 0
    (out / "checkpoint.pt").unlink()  # metrics.json alone still marks a run someone may want
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resume_of_a_folder_that_does_not_exist(tmp_path, capsys):
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "does not exist" in err and err.count("\n") == 1


def test_the_divergence_message_without_a_checkpoint_says_what_to_do(tmp_path):
    msg = loop_mod._diverged_message(TrainConfig(), 10, 10, tmp_path, None, 125)
    assert "holds no checkpoint of this run (the first is written at step 125)" in msg
    assert "without --resume" in msg and "\n" not in msg


def start_long_run(out, *extra):
    """A `cage train` process on ``out`` that runs until killed; returns once it logged step 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "cage", "train", "--preset", "tiny", "--steps", "100000", "--batch-size", "2",
           "--seq-len", "32", "--log-every", "1", "--eval-every", "100000", "--eval-batches", "1",
           "--threads", "1", "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 1/"):
            return proc
    proc.kill()
    raise AssertionError(f"the run did not start: {proc.wait()}")


def test_two_runs_on_one_folder_are_refused_and_a_killed_holder_releases_it(tmp_path, small_text, capsys):
    import signal

    out = tmp_path / "busy"
    first = start_long_run(out)
    try:
        log_before = (out / "train_log.csv").read_bytes()
        for extra in ([], ["--overwrite"], ["--resume"]):
            capsys.readouterr()
            assert cli.main(["train", *TINY, "--quiet", "--data", str(small_text), "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"--out {out} is in use by another run" in err, err
            assert f"process {first.pid}" in err
        # the first run's files were not touched (it has no checkpoint yet: a plain run would
        # otherwise have replaced them)
        assert (out / "train_log.csv").read_bytes()[: len(log_before)] == log_before
    finally:
        first.send_signal(signal.SIGKILL)  # no handler runs: the kernel drops the lock
        first.wait()
    assert cli.main(["train", *TINY, "--quiet", "--data", str(small_text), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["completed"]


def test_the_lock_is_released_after_a_run_and_after_an_error(tmp_path, small_text):
    from cage.llama.job import outdir

    run = dict(preset="tiny", steps=2, batch_size=2, seq_len=32, eval_batches=1, threads=1, verbose=False,
               data=str(small_text), out=str(tmp_path / "r"))
    train(TrainConfig(**run))
    with pytest.raises(ValueError, match="already holds a run"):  # the lock is free: the folder check speaks
        train(TrainConfig(**run))
    with outdir.lock_out_dir(TrainConfig(**run)):
        with pytest.raises(ValueError, match="is in use by another run"):
            train(TrainConfig(**{**run, "overwrite": True}))
    assert train(TrainConfig(**{**run, "overwrite": True}))["completed"]
    # a run that fails before writing anything leaves no folder behind
    with pytest.raises(ValueError, match="too small"):
        train(TrainConfig(**{**run, "seq_len": 4096, "out": str(tmp_path / "new")}))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("cut", ["1", "6,5.51", "", "1,5.5,0.003,0.0,1.2,0,,"])
def test_a_cut_off_last_row_of_the_train_log_is_dropped_on_resume(tmp_path, small_text, cut):
    import csv

    run = dict(preset="tiny", steps=6, batch_size=2, seq_len=32, eval_batches=1, eval_every=2, log_every=1,
               threads=1, verbose=False, data=str(small_text), out=str(tmp_path / "r"))
    train(TrainConfig(stop_after=3, **run))  # checkpoint at 2, stopped (and checkpointed) at 3
    log = tmp_path / "r" / "train_log.csv"
    # a later session wrote step 4 and was killed in the middle of the row of step 5 (or 10, 12, ...)
    with open(log, "a") as f:
        f.write("4,5.5,0.003,0.0,1.2,0,,\n" + cut)
    train(TrainConfig(resume=True, **run))
    with open(log, newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sigterm_before_the_first_step_stops_at_once(tmp_path, small_text, monkeypatch, capsys):
    """A signal while the corpus loads (a slow or stuck read) ends the run there: it has
    nothing to checkpoint, so it does not wait for a first step that may never come."""
    import os
    import signal
    import time

    real_load = loop_mod.load_corpus

    def stuck(path):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # a read that never returns
        return real_load(path)

    monkeypatch.setattr(loop_mod, "load_corpus", stuck)
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.perf_counter()
    assert cli.main(["train", *TINY, "--data", str(small_text), "--out", str(tmp_path / "r")]) == 143
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert "SIGTERM before the first step" in err and "nothing was saved" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are back

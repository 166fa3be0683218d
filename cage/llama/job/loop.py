"""The training loop of ``python -m cage train`` (the methods, the recipe and the splits are in
``cage.llama.job.cli``'s docstring, which is also the command's help).

Under torchrun with ``--parallel ddp|fsdp2`` (``cage.llama.job.distributed``) every process
trains its share of each global batch and only rank 0 writes files or prints. Outputs in
``out``: the checkpoint (``cage.llama.job.checkpoint``), ``metrics.json``, ``loss.png`` (redrawn
at every evaluation), ``train_log.csv`` and ``tensorboard/`` (``cage.llama.job.records``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import signal
import time
from pathlib import Path
from typing import NamedTuple

import torch

from ...linear import QATLinear, qat_param_groups
from ...optim import CAGEAdamW
from ..data import SPLITS, TextData, load_corpus
from ..model import count_params
from .build import build_hf_model, build_model, lr_at, prepare_model
from .checkpoint import (CHECKPOINT, METRICS, PLOT, _atomic_write, _check_resume_config, _checkpoint_threads,
                         find_checkpoint, restore_weights, resume_checkpoint, run_state, save_checkpoint,
                         save_distributed_checkpoint)
from .config import TrainConfig
from .outdir import check_out_dir, clear_run_outputs, lock_out_dir
from .distributed import Parallel, setup
from .machine import autocast_context, choose_threads, environment, resolve_device, to_device
from .plots import save_plot
from .records import TrainRecords, weight_grid_distance
from .signals import SignalBeforeStart, TrainingInterrupted, stop_on_signals
from .sources import HF_DIR, RunData, stage_tokenizer, write_run_hf_folder


@torch.no_grad()
def evaluate(model, data: TextData, split: str, n_batches: int, batch_size: int, device, amp,
             parallel: Parallel | None = None) -> float:
    """Mean loss over the fixed evaluation windows of ``split`` (each process scores its share
    of every batch, and the shares' mean is the one-process value)."""
    par = parallel or Parallel()
    was_training = model.training
    model.eval()
    # summed on the device (float64, as Python's float summed the batch losses before) and
    # read once at the end: one host read per evaluation, not one per batch
    total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    for x, y in data.eval_batches(split, n_batches, batch_size):
        x, y = par.eval_slice(x, y)
        with amp:
            _, loss = model(to_device(x, device), to_device(y, device))
        total += loss.detach().to(total.dtype)
    model.train(was_training)
    return float(par.mean(total)) / n_batches


@contextlib.contextmanager
def unquantized(model: torch.nn.Module):
    """``model``'s QAT layers without their quantizers for the duration: each computes
    ``F.linear(x, weight, bias)``, the nn.Linear it was prepared from (prepare_qat keeps the weights)."""
    layers = [(m, m.weight_quant, m.act_quant) for m in model.modules() if isinstance(m, QATLinear)]
    try:
        for m, _, _ in layers:
            m.weight_quant = m.act_quant = None
        yield model
    finally:
        for m, w, a in layers:
            m.weight_quant, m.act_quant = w, a


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _replicated(norm: torch.Tensor) -> torch.Tensor:
    """The value of a gradient norm that FSDP2 returns as a DTensor (a collective, no host sync)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def make_optimizer(cfg: TrainConfig, core: torch.nn.Module) -> CAGEAdamW:
    """The run's optimizer. It checks no gradient itself (``check_finite=False``): ``train_step``
    passes it the flag of the clip norm, so the gradients are read once for both, the same on
    every device, and nothing is read back to the host."""
    return CAGEAdamW(
        qat_param_groups(core, cfg.weight_decay),
        lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
        total_steps=cfg.steps, cage_lambda=cfg.optimizer_lambda, silence_ratio=cfg.silence_ratio,
        schedule=cfg.schedule, coupling=cfg.coupling, backend=cfg.backend, check_finite=False,
    )


class StepValues(NamedTuple):
    """What one training step leaves on the device until the next flush."""

    loss: torch.Tensor  # mean training loss of this process's share of the global batch
    grad_norm: torch.Tensor  # the gradient norm before clipping (replicated under FSDP2)
    found_inf: torch.Tensor  # one element, 1.0: the norm is NaN/Inf and the step was skipped


def nonfinite_flag(grad_norm: torch.Tensor) -> torch.Tensor:
    """The one-element device flag of ``CAGEAdamW.step(found_inf=...)``: 1.0 when ``grad_norm``
    is NaN or Inf (one gradient is), else 0.0."""
    return (~torch.isfinite(grad_norm)).float().reshape(1)


def train_step(model, optimizer, micro_batches, *, device, amp, grad_clip: float,
               parallel: Parallel | None = None) -> StepValues:
    """One optimizer step over ``micro_batches`` (this process's (x, y) pairs of one global
    batch): forward and backward under ``amp``, gradients clipped to ``grad_clip``, and the
    optimizer step, skipped on the device when the gradient norm is NaN/Inf (the step count
    still advances). Reads nothing back to the host, and the batches go to a GPU without a
    sync (``to_device``); returns the step's device values."""
    par = parallel or Parallel()
    loss_sum = None
    for i, (xb, yb) in enumerate(micro_batches):
        with par.gradient_sync(model, last=i == len(micro_batches) - 1):
            with amp:
                _, loss = model(to_device(xb, device), to_device(yb, device))
            # equal micro-batches: the mean of their means is the batch mean
            (loss / len(micro_batches) if len(micro_batches) > 1 else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    step_loss = loss_sum / len(micro_batches) if len(micro_batches) > 1 else loss_sum
    # the same clipping as with error_if_nonfinite=True, without its host read: a NaN/Inf norm
    # is the flag instead (the grads it scales are then not used)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, error_if_nonfinite=False)
    grad_norm = _replicated(grad_norm.detach())
    found_inf = nonfinite_flag(grad_norm)
    optimizer.step(found_inf=found_inf)
    optimizer.zero_grad(set_to_none=True)
    return StepValues(step_loss, grad_norm, found_inf)


def skip_streak(skipped: list[int], step: int) -> int:
    """How many of the steps up to ``step`` were skipped in a row (``skipped``: the skipped
    step numbers, ascending)."""
    n = 0
    while n < len(skipped) and skipped[-1 - n] == step - n:
        n += 1
    return n


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training job; returns its metrics (also written to out/metrics.json).

    With ``cfg.stop_after`` before the end (or once ``cfg.time_limit_min`` minutes of this session
    have passed), it trains up to that step, checkpoints and returns
    metrics with ``completed: False``; resuming then gives bit-identical results to an
    uninterrupted run (same batches, same optimizer state, same order of operations, same
    thread count). A step whose gradient norm is NaN/Inf is skipped on the device (no host
    sync: weights and moments keep their values, the step count advances); the host learns of
    it at the next flush of the per-step values (progress line, evaluation), the step shows in
    ``train_log.csv`` (``skipped``) and the metrics (``skipped_steps``, ``skipped_at``), and
    once the last ``cfg.max_skipped_steps`` steps were all skipped the run raises
    FloatingPointError there, without a checkpoint (it diverged: the message says whether one
    exists and of which step). On SIGINT or SIGTERM it finishes the step, checkpoints and raises
    ``TrainingInterrupted`` (its message says how to resume). ``cfg.threads`` applies during
    the call only: torch's thread count is process-wide, and a sweep or the tests run several
    jobs in one process.
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
        cfg = _with_hf_config(cfg)
        cfg.validate()
        with lock_out_dir(cfg):  # one run per folder, from before it is looked at
            replaced = clear_run_outputs(cfg, check_out_dir(cfg))  # before any work: a folder holding a run is refused
            if replaced and not cfg.overwrite and cfg.verbose:
                print(f"--out {cfg.out}: replacing the files of a run that stopped before its first checkpoint "
                      f"({', '.join(p.name for p in replaced)})", flush=True)
            par, device = setup(cfg)
            try:
                with stop_on_signals() as stop_request:
                    result = _train(cfg, par, device, stop_request)
            except TrainingInterrupted:
                par.close()  # every process stops at the same step
                raise
            except SignalBeforeStart as early:
                par.close(clean=False)
                raise _interrupted_before_start(early.signum, cfg, par) from None
            except BaseException:
                par.close(clean=False)
                raise
            par.close()
            return result
    finally:
        torch.set_num_threads(threads_before)


def _with_hf_config(cfg: TrainConfig) -> TrainConfig:
    """An HF run's config with its ``hf_config_dict``: on a new run the config.json as read now;
    on --resume the checkpoint's (when the config given lacks it and the checkpoint has one; a
    checkpoint from before it was saved leaves it None: the file is read, as then)."""
    if not cfg.is_hf:
        return cfg
    if cfg.resume:
        if cfg.hf_config_dict is None and cfg.out:
            ckpt = find_checkpoint(Path(cfg.out))
            saved = None if ckpt is None else ckpt.get("config", {}).get("hf_config_dict")
            if saved is not None:
                return dataclasses.replace(cfg, hf_config_dict=saved)
        return cfg
    from .sources import hf_config_dict

    fresh = dataclasses.replace(cfg, hf_config_dict=None)
    try:
        return dataclasses.replace(fresh, hf_config_dict=hf_config_dict(fresh))
    except (ValueError, FileNotFoundError):
        return fresh  # validate() says what is wrong, by option


# agreed_signal's code for the time limit: below every stop signal, so a signal wins (SIGHUP is
# not one the loop catches)
TIME_UP = 1


def _train(cfg: TrainConfig, par: Parallel, device: torch.device, stop_request) -> dict:
    return TrainRun(cfg, par, device, stop_request).run()


class TrainRun:
    """One session of a run, its phases as methods: ``setup`` (data, model, optimizer),
    ``restore`` (a checkpoint's state on --resume), ``step`` (one optimizer step),
    ``evaluate``, ``checkpoint`` and ``finish`` (the final evaluations, checkpoint and line);
    ``run`` strings them together. Where the data and the model come from is ``setup``'s
    business alone (``cage.llama.job.sources``), so a new kind of either does not touch the loop.
    """

    def __init__(self, cfg: TrainConfig, par: Parallel, device: torch.device, stop_request):
        self.cfg, self.par, self.device, self.stop_request = cfg, par, device, stop_request
        self.session_start = time.perf_counter()
        self.log = print if cfg.verbose and par.is_main else (lambda *a, **k: None)
        self.dtype_name, self.amp = autocast_context(cfg, device)
        self.out = Path(cfg.out) if cfg.out else None
        if cfg.resume and self.out is None:
            raise ValueError("--resume needs the run's --out folder")
        # skipped: the numbers of the steps skipped for a NaN/Inf gradient norm
        self.history = {"evals": [], "train_loss": [], "skipped": [], "wall_time_s": 0.0}
        self.step_count = 0
        self.ckpt = None
        self.committed = None  # the DCP folder of the checkpoint that counts
        self.saved_step = None  # the step of the run's last checkpoint
        # per step, kept on the device until a flush: (step, lr, lambda_t, the step's device values)
        self.pending: list[tuple[int, float, float, StepValues]] = []
        # host time of the training steps (for ETA) and of those since the last progress line
        # (tokens/s), including the wait for the device at the flush that follows them
        self.train_time, self.trained_steps = 0.0, 0
        self.interval_time, self.interval_steps = 0.0, 0
        self.records = None

    # ---- set up

    def setup(self) -> None:
        cfg, par = self.cfg, self.par
        self.data = RunData(cfg, load_corpus)  # this module's name: what tests replace to see when it loads
        if cfg.is_hf:
            base = build_hf_model(cfg, pretrained=not cfg.resume)  # resumed: the checkpoint's weights
            self.core, self.wq, self.aq = prepare_model(cfg, base, self.device)
        else:
            self.core, self.wq, self.aq = build_model(cfg, self.device)
        self.model = par.wrap(self.core, self.device)
        self.optimizer = make_optimizer(cfg, self.core)  # before the first forward (FSDP2's lazy init)
        if cfg.hf_model is not None and not cfg.resume:
            # the gap a QAT fine-tune leaves: the pretrained model as it was, unquantized (the QAT
            # layers hold its weights; their quantizers off, each is its nn.Linear), evaluated as
            # the run holds it (sharded under FSDP2), not as a second full copy on every process
            with unquantized(self.core):
                self.history["pretrained_val_loss"] = evaluate(self.model, self.data, "val", cfg.eval_batches,
                                                               cfg.batch_size, self.device, self.amp, par)

    def restore(self) -> None:
        """Continue from the checkpoint in ``out`` (--resume): its weights, optimizer, data order,
        RNG, step and history, once its settings and corpus are checked against this session's."""
        cfg, out = self.cfg, self.out
        ckpt = self.ckpt = resume_checkpoint(out)
        # a field the checkpoint's config lacks was added since it was written, with a default
        # that is what the run did then (the centered grid, say)
        _check_resume_config({**TrainConfig().to_dict(), **ckpt["config"]}, cfg)
        if ckpt["corpus_sha256"] != self.data.fingerprint:
            raise ValueError(
                f"--resume: the corpus changed since the checkpoint was written (sha256 "
                f"{ckpt['corpus_sha256'][:12]}..., now {self.data.fingerprint[:12]}...); the run cannot continue"
            )
        restore_weights(out, ckpt, self.model, self.optimizer, self.par)
        self.data.load_state_dict(ckpt["data"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available() and not self.par.distributed:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.step_count, self.history, self.committed = ckpt["step"], ckpt["history"], ckpt.get("dcp")
        self.history.setdefault("skipped", [])  # a checkpoint from before steps were skipped
        self.saved_step = self.step_count

    def describe(self) -> None:
        """The values the records and the start line use (hashes the corpus once), and that line."""
        cfg, par = self.cfg, self.par
        if self.out is not None and par.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            stage_tokenizer(cfg)  # an HF run's tokenizer files, for RUN/hf/ and cage export
        self.corpus_info = self.data.info
        self.env = environment(self.device)
        self.prior_wall_time = self.history["wall_time_s"]  # of earlier sessions of this run
        self.n_params = count_params(self.core)
        self.n_quantized = sum(p.numel() for g in self.optimizer.param_groups if g["quant"] is not None
                               for p in g["params"])
        self.stop = min(cfg.steps, cfg.stop_after or cfg.steps)
        self.eval_every = cfg.eval_every or max(1, cfg.steps // 4)
        self.log_every = cfg.log_every or max(1, cfg.steps // 20)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        wq, aq = self.wq, self.aq
        quant_desc = ("none" if wq is None and aq is None
                      else f"weights {wq or 'unquantized'}, activations {aq or 'unquantized'}")
        self.model_name = (cfg.preset if not cfg.is_hf
                           else f"{Path(cfg.hf_model).name} (--hf-model)" if cfg.hf_model is not None
                           else f"{Path(cfg.hf_config).name} (--hf-config)")
        self.title = (f"{cfg.method} {'' if cfg.method == 'bf16' else f'W{cfg.weight_bits}A{cfg.act_bits} '}"
                      f"{cfg.preset if not cfg.is_hf else self.model_name.split(' ')[0]}")
        self.lambda_on = cfg.silence_ratio * cfg.steps if cfg.optimizer_lambda > 0 else None
        layout = "" if not par.distributed else f", {par.mode} over {par.world} processes"
        self.log(
            f"cage train: method {cfg.method} ({quant_desc}), lambda {cfg.optimizer_lambda:g}\n"
            f"  model {self.model_name}: {self.n_params / 1e6:.2f}M params ({self.n_quantized / 1e6:.2f}M quantized), "
            f"corpus {self.data.label}\n"
            f"  {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens"
            + (f" ({cfg.grad_accum} micro-batches)" if cfg.grad_accum > 1 else "")
            + f", peak lr {cfg.peak_lr:g}, device {self.device} ({self.dtype_name}, {torch.get_num_threads()} threads"
            + layout + (f", matmul {cfg.matmul}" if cfg.matmul != "auto" else "") + ")"
            + (f", resuming at step {self.step_count}" if cfg.resume else ""),
            flush=True,
        )

    # ---- the phases of the loop

    def draw_plot(self):
        if self.out is None or not self.par.is_main:
            return None
        path = self.out / PLOT
        return str(path) if save_plot(path, self.history, self.title, self.lambda_on, self.cfg.steps) else None

    def evaluate(self, split: str, plot: bool = True) -> float:
        cfg = self.cfg
        loss = evaluate(self.model, self.data, split, cfg.eval_batches, cfg.batch_size, self.device, self.amp, self.par)
        self.history["evals"].append({"step": self.step_count, "split": split, "loss": loss})
        self.records.write_eval(self.step_count, split, loss)
        if plot:
            self.draw_plot()
        return loss

    def metrics(self, completed: bool, final: dict | None = None) -> dict:
        cfg, wq, aq = self.cfg, self.wq, self.aq
        m = {
            "config": cfg.to_dict(),
            "completed": completed,
            "step": self.step_count,
            "method": cfg.method,
            "weight_quant": wq.to_dict() if wq else None,
            "activation_quant": aq.to_dict() if aq else None,
            "grid": None if wq is None and aq is None else cfg.grid,
            "cage_lambda": cfg.optimizer_lambda,
            "peak_lr": cfg.peak_lr,
            "model": self.core.config_dict() if cfg.is_hf else dataclasses.asdict(self.core.config),
            "params": self.n_params,
            "params_non_embedding": count_params(self.core, non_embedding=True),
            "params_quantized": self.n_quantized,
            "corpus": self.corpus_info,
            "split_tokens": self.data.split_tokens,
            "tokens_trained": self.step_count * self.tokens_per_step,
            "dtype": self.dtype_name,
            "environment": self.env,
            "evals": self.history["evals"],
            "skipped_steps": len(self.history["skipped"]),
            "skipped_at": list(self.history["skipped"]),
            "wall_time_s": self.prior_wall_time + (time.perf_counter() - self.session_start),
        }
        if self.par.distributed:
            m["parallel"] = {"mode": self.par.mode, "processes": self.par.world}
        if "pretrained_val_loss" in self.history:
            m["pretrained_val_loss"] = self.history["pretrained_val_loss"]
        if final:
            m.update(final)
        return m

    def flush(self, progress: bool = False) -> int:
        """Copy the pending per-step values to the host (one copy: the only host sync of those
        steps) and write their rows; ``progress``: a progress line's, with the throughput and
        the grid distance. Returns how many of the steps were skipped; raises FloatingPointError
        when the last ``cfg.max_skipped_steps`` steps were all skipped."""
        pending, par, history = self.pending, self.par, self.history
        if not pending:
            return 0
        t0 = time.perf_counter()
        losses = par.mean(torch.stack([v.loss for *_, v in pending])).float()
        norms = torch.stack([v.grad_norm for *_, v in pending]).float()
        flags = torch.stack([v.found_inf.reshape(()) for *_, v in pending]).float()
        values = torch.stack([losses, norms, flags], 1).cpu().tolist()
        waited = time.perf_counter() - t0  # on a GPU: the steps still queued when it began
        self.train_time += waited
        self.interval_time += waited
        rows = [
            {"step": s, "loss": loss, "lr": lr, "lambda_t": lam, "grad_norm": norm, "skipped": int(flag != 0)}
            for (s, lr, lam, _), (loss, norm, flag) in zip(pending, values)
        ]
        history["train_loss"].extend(r["loss"] for r in rows)
        history["skipped"].extend(r["step"] for r in rows if r["skipped"])
        if progress:
            rows[-1]["tokens_per_s"] = self.tokens_per_step * self.interval_steps / self.interval_time
            rows[-1]["weight_grid_distance"] = weight_grid_distance(self.optimizer, par)
            self.interval_time, self.interval_steps = 0.0, 0
        self.records.write_rows(rows)
        pending.clear()
        last = rows[-1]["step"]
        streak = skip_streak(history["skipped"], last)
        if streak >= self.cfg.max_skipped_steps:
            raise FloatingPointError(_diverged_message(self.cfg, last, streak, self.out, self.saved_step,
                                                       self.eval_every))
        return sum(r["skipped"] for r in rows)

    def checkpoint(self, completed: bool, final: dict | None = None) -> dict:
        """Flush, then write the checkpoint and metrics.json of this step; returns the metrics."""
        par, out = self.par, self.out
        self.flush()
        m = self.metrics(completed, final)
        if out is not None:
            # The checkpoint carries the wall time so far, so a resumed run keeps adding to it.
            self.history["wall_time_s"] = m["wall_time_s"]
            if par.distributed:
                state = run_state(self.data, self.step_count, self.cfg, self.history, self.corpus_info["sha256"], m)
                state["cuda_rng"] = None  # one process's devices need not exist in another layout
                self.committed = save_distributed_checkpoint(out, self.model, self.optimizer, par, state,
                                                             self.committed)
            elif par.is_main:
                save_checkpoint(out / CHECKPOINT, self.model, self.optimizer, self.data, self.step_count, self.cfg,
                                self.history, self.corpus_info["sha256"], metrics=m)
            if par.is_main:
                _write_metrics(out, m)
        self.saved_step = self.step_count  # (without --out: the step whose state would have been saved)
        return m

    def step(self) -> None:
        """One optimizer step on the next global batch (this process trains its rows of it)."""
        cfg, par, optimizer = self.cfg, self.par, self.optimizer
        t0 = time.perf_counter()
        step = self.step_count
        lr = self.lr = lr_at(step, cfg.steps, cfg.peak_lr, cfg.warmup_frac, cfg.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if self.data.own_rows:  # a memory-mapped corpus: this process reads its rows of the global batch
            x, y = self.data.train_batch(cfg.batch_size, par.rows(cfg.batch_size))
            micro = par.micro_batches(x, y, cfg.grad_accum, local=True)
        else:
            x, y = self.data.train_batch(cfg.batch_size)  # the global batch, the same on every process
            micro = par.micro_batches(x, y, cfg.grad_accum)
        values = train_step(self.model, optimizer, micro, device=self.device, amp=self.amp, grad_clip=cfg.grad_clip,
                            parallel=par)
        self.pending.append((step + 1, lr, optimizer.lambda_at(step + 1), values))
        self.step_count = step + 1
        dt = time.perf_counter() - t0
        self.train_time += dt
        self.trained_steps += 1
        self.interval_time += dt
        self.interval_steps += 1

    def progress(self) -> None:
        """The progress line (a flush of the pending steps)."""
        cfg, step = self.cfg, self.step_count
        skipped = self.flush(progress=True)
        sec_per_step = self.train_time / self.trained_steps
        self.log(
            f"step {step}/{cfg.steps}  loss {self.history['train_loss'][-1]:.4f}  lr {self.lr:.3g}  "
            f"lambda {self.optimizer.lambda_at(step):.3g}  "
            f"{self.tokens_per_step / sec_per_step:,.0f} tok/s  "
            f"ETA {_fmt_time(sec_per_step * (self.stop - step))}"
            + (f"  skipped {skipped} step{'s' if skipped > 1 else ''} (NaN/Inf gradient norm)"
               if skipped else ""),
            flush=True,
        )

    def finish(self) -> dict:
        """The final evaluations on every held-out split and the completed checkpoint."""
        cfg = self.cfg
        final = {f"final_{split}_loss": self.evaluate(split, plot=False) for split in SPLITS[1:]}
        final["final_eval_loss"] = final[f"final_{cfg.eval_split}_loss"]
        if self.out is not None:
            self.flush()
            final["plot"] = self.draw_plot()
            if cfg.is_hf:  # before the checkpoint that marks the run complete
                folder = self.out / HF_DIR
                write_run_hf_folder(cfg, self.model, self.par, folder)
                final["hf_folder"] = str(folder)
        return self.checkpoint(completed=True, final=final)

    def final_line(self, m: dict) -> None:
        n_skipped = len(self.history["skipped"])
        self.log(
            f"final held-out loss: test {m['final_test_loss']:.4f}, val {m['final_val_loss']:.4f} "
            f"(nats/{self.data.unit}) after {self.step_count} steps, {_fmt_time(m['wall_time_s'])}"
            + (f"; the pretrained model (unquantized) had val {m['pretrained_val_loss']:.4f} at step 0"
               if "pretrained_val_loss" in m else "")
            + (f" ({n_skipped} skipped for a NaN/Inf gradient norm)" if n_skipped else "")
            + (f"; wrote {self.out}/" if self.out else "")
            + (f" and the Hugging Face folder {m['hf_folder']}/" if m.get("hf_folder") else ""),
            flush=True,
        )

    # ---- the session

    def run(self) -> dict:
        cfg, par, out = self.cfg, self.par, self.out
        self.setup()
        if cfg.resume:
            self.restore()
        self.describe()
        if cfg.resume and self.step_count >= cfg.steps:
            done = _completed_metrics(self.ckpt, out)
            if done is not None:
                if par.is_main:
                    _write_metrics(out, done)
                self.log(f"the run in {out} is already complete ({self.step_count} steps); nothing to do", flush=True)
                return done
            # a checkpoint of the last step without its metrics (older format): evaluate below
        self.records = TrainRecords(out if par.is_main else None, self.step_count if cfg.resume else None)
        self.stop_request.arm()  # from here a signal finishes the step and checkpoints
        try:
            if self.step_count == 0 and not cfg.resume:
                self.log(f"step 0: {cfg.eval_split} loss {self.evaluate(cfg.eval_split):.4f}", flush=True)
            self.model.train()
            while self.step_count < self.stop:
                self.step()
                step = self.step_count
                if step % self.log_every == 0 or step == self.stop:
                    self.progress()
                if step % self.eval_every == 0 and step < cfg.steps:
                    self.flush()  # the steps' device time counts as theirs, not the evaluation's
                    self.log(f"step {step}: {cfg.eval_split} loss {self.evaluate(cfg.eval_split):.4f}", flush=True)
                    self.checkpoint(completed=False)
                time_up = (cfg.time_limit_min is not None
                           and time.perf_counter() - self.session_start > 60 * cfg.time_limit_min)
                signum = par.agreed_signal(self.stop_request.signum or (TIME_UP if time_up else 0))
                if signum == TIME_UP:  # every process stops after the same step
                    self.log(f"time limit of {cfg.time_limit_min:g} min reached", flush=True)
                    break
                if signum:
                    if self.saved_step != step:
                        self.checkpoint(completed=False)
                    raise _interrupted(signum, step, cfg, out, par)

            if self.step_count < cfg.steps:  # stopped early on purpose: checkpoint and leave
                m = self.checkpoint(completed=False)
                self.log(f"stopped after step {self.step_count} of {cfg.steps}; "
                         + (f"continue with: {resume_command(cfg, out, par)}" if out is not None
                            else "nothing saved (no --out)"), flush=True)
                return m
            m = self.finish()
        finally:
            self.records.close()
        self.final_line(m)
        return m


def _diverged_message(cfg: TrainConfig, step: int, streak: int, out: Path | None, saved_step: int | None,
                      eval_every: int) -> str:
    """One line: the run stopped because its last ``streak`` steps were all skipped."""
    first = step - streak + 1
    if out is None:
        where = "nothing was saved (no --out)"
    elif saved_step is None:
        where = (f"{out} holds no checkpoint of this run (the first is written at step {eval_every}): run again "
                 "without --resume to start it over there")
    else:
        where = (f"the last checkpoint in {out} is of step {saved_step}"
                 + (" (taken during the skipped steps)" if saved_step >= first else ""))
    return (
        f"step {step}: the last {streak} steps ({first} to {step}) were all skipped, their gradient norm "
        f"NaN or Inf (--max-skipped-steps {cfg.max_skipped_steps}); the run stopped. It diverged or its input "
        f"holds NaN/Inf: try a lower --lr (now {cfg.peak_lr:g}) or --dtype fp32; {where}"
    )


def _interrupted(signum: int, step: int, cfg: TrainConfig, out: Path | None, par: Parallel) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    if out is None:
        return TrainingInterrupted(signum, step, f"{name} after step {step}; nothing saved (no --out)", par.is_main)
    return TrainingInterrupted(
        signum, step,
        f"{name}: stopped after step {step} of {cfg.steps} and checkpointed it; continue from step {step} with\n"
        f"  {resume_command(cfg, out, par)}", par.is_main,
    )


def _interrupted_before_start(signum: int, cfg: TrainConfig, par: Parallel) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    if cfg.resume and cfg.out:
        after = (f"its checkpoint in {cfg.out} is unchanged; continue with: "
                 f"{resume_command(cfg, Path(cfg.out), par)}")
    else:
        after = "nothing was saved" + ("" if cfg.out else " (no --out)")
    return TrainingInterrupted(signum, 0, f"{name} before the first step of this session: stopped; {after}",
                               par.is_main)


def resume_command(cfg: TrainConfig, out: Path, par: Parallel) -> str:
    """The shell command that continues the run in ``out`` (its settings come from the checkpoint),
    the folder shell-quoted."""
    where = shlex.quote(str(out))
    if par.distributed:
        return f"torchrun --nproc-per-node {par.world} -m cage train --resume --parallel {cfg.parallel} --out {where}"
    return f"python -m cage train --resume --out {where}"


def _completed_metrics(ckpt: dict, out: Path) -> dict | None:
    """The metrics of a checkpoint of a finished run (None when it does not hold them)."""
    saved = ckpt.get("metrics")
    if saved is None and (out / METRICS).is_file():  # a checkpoint from before metrics went in
        on_disk = json.loads((out / METRICS).read_text())
        saved = on_disk if on_disk.get("step") == ckpt["step"] else None
    return saved if saved is not None and saved.get("completed") else None


def _write_metrics(out: Path, m: dict) -> None:
    text = json.dumps(m, indent=2) + "\n"
    path = out / METRICS
    if not path.is_file() or path.read_text() != text:
        _atomic_write(path, lambda tmp: tmp.write_text(text))

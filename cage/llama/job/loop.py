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
``test`` (see ``cage.llama.data``: ``test`` is the held-out split to report, ``val`` the one to tune on).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ...linear import qat_param_groups
from ...optim import CAGEAdamW
from ..data import SPLITS, TextData, load_corpus
from ..model import count_params
from .build import build_model, lr_at
from .checkpoint import (CHECKPOINT, METRICS, PLOT, _atomic_write, _check_resume_config, _checkpoint_threads,
                         load_checkpoint, save_checkpoint)
from .config import TrainConfig
from .machine import autocast_context, choose_threads, environment, resolve_device
from .plots import save_plot


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

def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

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

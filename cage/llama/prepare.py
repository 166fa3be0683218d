"""Tokenize a corpus once into memory-mapped token shards (then: cage train --data DIR).

    python -m cage prepare-data --tokenizer tok.json --out data/mycorpus books/ more.jsonl

INPUTS are text files (one document each), ``.jsonl`` files (one document per line, the string
in ``--field``, default ``text``) and folders of them (read recursively in sorted order; hidden
files skipped; files whose first 8 KiB hold a NUL byte are not text and are skipped). Several
processes tokenize (``--processes``); a progress line goes to stderr every few seconds. The
format, the split by document and how the job reads it: ``cage.llama.shards``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .. import __version__
from . import shards
from .tokenizer import load_tokenizer

JSONL_CHUNK_BYTES = 2 << 20  # a work unit: lines of about this many bytes (what a process holds at once)
PROGRESS_SECONDS = 5.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="text files, .jsonl files or folders of them")
    p.add_argument("--out", required=True, help="folder to write the shards and index.json into")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (default) or a tokenizer.json / tokenizer folder")
    p.add_argument("--eos-token", default=None, help="the token that ends a document (default: the tokenizer's EOS)")
    p.add_argument("--field", default="text", help="the field of a .jsonl line that holds the text (default text)")
    p.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1),
                   help="tokenizing processes (default min(4, cores))")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file at most (default 2**28)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split by document (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared corpus already in --out")


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def _files(inputs: list[str]) -> list[Path]:
    found = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"prepare-data: the input {spec!r} does not exist")
        if path.is_file():
            found.append(path)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    found.append(Path(dirpath) / name)
    files = [f for f in found if f.suffix == ".jsonl" or _is_text(f)]
    if not files:
        raise ValueError(f"prepare-data: no text or .jsonl files in {inputs}")
    return files


def _units(files: list[Path]) -> list[tuple[str, int, int, bool]]:
    """(path, first byte, end byte, ends a document) work units in line-aligned chunks: a
    ``.jsonl`` chunk holds whole documents; the chunks of a text file are the pieces of its one
    document, the last of them ending it (so no unit is larger than JSONL_CHUNK_BYTES)."""
    units = []
    for f in files:
        size = f.stat().st_size
        start = 0
        with open(f, "rb") as fh:
            while True:
                fh.seek(min(size, start + JSONL_CHUNK_BYTES))
                fh.readline()  # to the end of the line the cut fell in
                end = min(size, fh.tell()) if start + JSONL_CHUNK_BYTES < size else size
                units.append((str(f), start, end, f.suffix == ".jsonl" or end == size))
                if end >= size:
                    break
                start = end
    return units


_WORKER: dict = {}


def _init_worker(tokenizer_spec: str, eos_token: str | None, field: str) -> None:
    tokenizer = load_tokenizer(tokenizer_spec, eos_token)
    _WORKER.update(tokenizer=tokenizer, field=field, dtype=shards.token_dtype(tokenizer.vocab_size))


def _texts(path: str, start: int, end: int, field: str) -> list[str]:
    with open(path, "rb") as f:
        f.seek(start)
        blob = f.read(end - start)
    if not path.endswith(".jsonl"):  # a piece of one document (cut after a newline: whole characters)
        return [blob.decode("utf-8", errors="replace")]
    texts = []
    for number, line in enumerate(blob.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"prepare-data: {path} (bytes {start}..{end}, line {number} of the chunk) is not "
                             f"JSON: {err}") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"prepare-data: {path}: a line has no string field {field!r} (use --field)")
        texts.append(text)
    return texts


def _tokenize(unit: tuple[str, int, int, bool]) -> tuple[int, list]:
    """(bytes read, [(token ids as an array, whether they end their document)])."""
    tokenizer = _WORKER["tokenizer"]
    path, start, end, ends = unit
    texts = _texts(path, start, end, _WORKER["field"])
    batch = getattr(tokenizer, "encode_batch", None)
    ids = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    arrays = [np.asarray(i, dtype=_WORKER["dtype"]) for i in ids]  # the shards' dtype: no wider copy
    if path.endswith(".jsonl"):
        return end - start, [(a, True) for a in arrays]
    return end - start, [(arrays[0], ends)]


def prepare(inputs: list[str], out: str, tokenizer: str = "bytes", eos_token: str | None = None, field: str = "text",
            processes: int = 1, shard_tokens: int = 1 << 28, split_seed: int = 0, overwrite: bool = False,
            log=print) -> dict:
    """Tokenize ``inputs`` into ``out``; returns the index (also written to ``out/index.json``)."""
    if processes < 1 or shard_tokens < 1:
        raise ValueError("prepare-data: --processes and --shard-tokens must be positive")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (overwrite and shards.is_prepared(out_dir)):
            raise ValueError(f"prepare-data: --out {out!r} is not empty" + (
                "" if shards.is_prepared(out_dir) else " and holds no prepared corpus")
                + ("; add --overwrite to replace the corpus in it" if shards.is_prepared(out_dir) else ""))
        shutil.rmtree(out_dir)
    tok = load_tokenizer(tokenizer, eos_token)  # errors here, before any worker starts
    files = _files(inputs)
    units = _units(files)
    total_bytes = sum(end - start for _, start, end, _ in units)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = shards.ShardWriter(out_dir, shards.token_dtype(tok.vocab_size), tok.separator, shard_tokens, split_seed)
    t0 = last = time.perf_counter()
    done_bytes = 0
    init = (tokenizer, eos_token, field)
    # fork where there is one: a spawned worker would import torch again (seconds); the workers
    # use only numpy and the tokenizer, not torch's thread pools
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(processes, _init_worker, init) if processes > 1 else None
    try:
        if pool is None:
            _init_worker(*init)
            results = map(_tokenize, units)
        else:
            results = pool.imap(_tokenize, units)  # in order: the shards do not depend on timing
        for n_bytes, pieces in results:
            for ids, ends in pieces:
                writer.add(ids, end=ends)
            done_bytes += n_bytes
            now = time.perf_counter()
            if now - last >= PROGRESS_SECONDS:
                last = now
                log(f"prepare-data: {done_bytes / 2**20:,.1f}/{total_bytes / 2**20:,.1f} MiB, "
                    f"{writer.tokens / 1e6:,.1f}M tokens, {writer.tokens / (now - t0) / 1e6:,.2f}M tokens/s", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    docs = writer.close()
    elapsed = time.perf_counter() - t0
    index = {
        "format": shards.FORMAT, "version": shards.VERSION, "cage_version": __version__,
        "tokenizer": tok.describe(), "dtype": writer.dtype.name, "shards": writer.shards,
        "n_documents": len(docs), "n_tokens": writer.tokens,
        "splits": {name: {"documents": int((docs[:, 3] == k).sum()), "tokens": int(docs[docs[:, 3] == k, 2].sum())}
                   for k, name in enumerate(shards.SPLITS)},
        "split_rule": {"seed": split_seed, "cuts": list(shards.SPLIT_CUTS),
                       "rule": "crc32(f'{seed}:{document}') / 2**32 below the cuts: train, val; else test"},
        "inputs": [str(f) for f in files], "field": field,
        "seconds": round(elapsed, 3), "tokens_per_s": round(writer.tokens / elapsed) if elapsed > 0 else None,
    }
    (out_dir / shards.INDEX).write_text(json.dumps(index, indent=2) + "\n")
    log(f"prepare-data: {len(docs):,} documents, {writer.tokens:,} tokens ({writer.dtype.name}) in "
        f"{len(writer.shards)} shard(s), {elapsed:.1f} s ({index['tokens_per_s'] or 0:,} tokens/s); wrote {out_dir}/",
        flush=True)
    return index


def run(args: argparse.Namespace) -> int:
    prepare(args.inputs, args.out, args.tokenizer, args.eos_token, args.field, args.processes, args.shard_tokens,
            args.split_seed, args.overwrite, log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    return 0

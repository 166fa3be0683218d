"""Corpora larger than memory: tokenized once into memory-mapped token shards, read by window.

``python -m cage prepare-data --tokenizer T --out DIR INPUTS...`` (``cage.llama.prepare``) writes:

- ``tokens-NNNNN.bin``: token ids, raw ``uint16`` (vocabularies up to 65536) or ``uint32``; each
  document is followed by the tokenizer's separator (its EOS id, or a blank line for bytes);
- ``documents.npy``: int64 ``[documents, 4]``: shard, first token, length (with the separator),
  split (0 train, 1 val, 2 test);
- ``index.json``: the format, the tokenizer (kind, path, sha256, vocabulary, separator), the
  dtype, the shards and their token counts, the splits' document and token counts, the split
  rule, the inputs, the tool's version.

Splits are by document, fixed when the corpus is prepared: document ``i`` goes to ``train`` when
``crc32(f"{split_seed}:{i}") / 2**32 < 0.90``, else ``val`` below 0.95, else ``test``; the split of
every document is stored. A split is read as its documents in order, one after the other: a
training window is ``seq_len + 1`` consecutive tokens of that stream, at a position drawn from the
run's seeded generator (the whole global batch is drawn on every process, each reads only its own
rows, so a resumed run sees the same batches on any number of processes); evaluation windows are
fixed and evenly spaced. Nothing reads the corpus whole: the shards are memory maps, and a batch
touches only its windows' pages.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import torch

FORMAT = "cage-tokens"
VERSION = 1
INDEX = "index.json"
DOCUMENTS = "documents.npy"
SPLITS = ("train", "val", "test")
SPLIT_CUTS = (0.90, 0.95)  # train below the first, val below the second, test above


def split_of(document: int, seed: int) -> int:
    """0 (train), 1 (val) or 2 (test) for the document numbered ``document``."""
    u = zlib.crc32(f"{seed}:{document}".encode()) / 2**32
    return 0 if u < SPLIT_CUTS[0] else (1 if u < SPLIT_CUTS[1] else 2)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def is_prepared(folder: str | Path) -> bool:
    """Whether ``folder`` holds a prepared corpus (its index)."""
    return (Path(folder) / INDEX).is_file()


class ShardWriter:
    """Appends documents to shards of at most ``shard_tokens`` tokens, recording each one."""

    def __init__(self, out: Path, dtype: np.dtype, separator: list[int], shard_tokens: int, split_seed: int):
        self.out, self.dtype, self.shard_tokens, self.split_seed = out, dtype, shard_tokens, split_seed
        self.separator = np.asarray(separator, dtype=dtype)
        self.documents: list[tuple[int, int, int, int]] = []
        self.shards: list[dict] = []
        self._file = None
        self._filled = 0
        self._open = None  # first token of the document being written
        self.tokens = 0

    def _open_shard(self):
        if self._file is not None:
            self._file.close()
        name = f"tokens-{len(self.shards):05d}.bin"
        self._file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._filled = 0

    def add(self, ids, end: bool = True) -> None:
        """Append ``ids`` to the open document (a new one if none is open); ``end`` closes it
        with the separator. A document stays in the shard it started in."""
        ids = np.asarray(ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(self.dtype).max):
            raise ValueError(f"prepare-data: a token id ({int(ids.max())}) does not fit {self.dtype}")
        if self._open is None:
            if self._file is None or (self._filled and self._filled + ids.size > self.shard_tokens):
                self._open_shard()
            self._open = self._filled
        piece = np.concatenate([ids.astype(self.dtype), self.separator]) if end else ids.astype(self.dtype)
        self._file.write(piece.tobytes())
        self._filled += piece.size
        self.tokens += piece.size
        self.shards[-1]["tokens"] = self._filled
        if end:
            index = len(self.documents)
            self.documents.append((len(self.shards) - 1, self._open, self._filled - self._open,
                                   split_of(index, self.split_seed)))
            self._open = None

    def close(self) -> np.ndarray:
        if self._file is not None:
            self._file.close()
        docs = np.asarray(self.documents, dtype=np.int64).reshape(-1, 4)
        np.save(self.out / DOCUMENTS, docs)
        return docs


class ShardedData:
    """Windows of ``seq_len`` tokens (and their targets) from a prepared corpus, by memory map.

    The same interface as ``cage.llama.data.TextData``: ``train_batch``, ``eval_batches``,
    ``state_dict`` / ``load_state_dict``, ``split_tokens`` (tokens per split)."""

    def __init__(self, folder: str | Path, seq_len: int, seed: int):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"--data: {str(folder)!r} holds no {INDEX} (prepare it with "
                                    "python -m cage prepare-data)")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version", 0) > VERSION:
            raise ValueError(f"--data: {index_path} is not a {FORMAT} index this version reads "
                             f"(format {self.index.get('format')!r}, version {self.index.get('version')!r})")
        dtype = np.dtype(self.index["dtype"])
        self.shards = []
        for shard in self.index["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise ValueError(f"--data: the shard {path} is missing or not {shard['tokens']} tokens of {dtype}")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        docs = np.load(self.folder / DOCUMENTS, mmap_mode="r")
        self.seq_len = seq_len
        self._docs = {}
        for k, name in enumerate(SPLITS):
            rows = np.asarray(docs[docs[:, 3] == k, :3])
            ends = np.cumsum(rows[:, 2]) if len(rows) else np.zeros(0, dtype=np.int64)
            self._docs[name] = (rows, ends)
            total = int(ends[-1]) if len(ends) else 0
            if total < seq_len + 1:
                raise ValueError(f"the prepared corpus {str(folder)!r} is too small: its {name} split has {total} "
                                 f"tokens but one window needs seq_len + 1 = {seq_len + 1}")
        self.split_tokens = {name: int(self._docs[name][1][-1]) for name in SPLITS}
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    def fingerprint(self) -> str:
        """What a resumed run checks: the index, which lists every shard's size and the tokenizer's hash."""
        return hashlib.sha256((self.folder / INDEX).read_bytes()).hexdigest()

    def _window(self, split: str, start: int) -> np.ndarray:
        """``seq_len + 1`` consecutive tokens of the split's stream from position ``start``."""
        rows, ends = self._docs[split]
        need = self.seq_len + 1
        doc = int(np.searchsorted(ends, start, side="right"))
        offset = start - (int(ends[doc - 1]) if doc else 0)
        pieces = []
        while need:
            shard, first, length = (int(v) for v in rows[doc])
            take = min(need, length - offset)
            pieces.append(self.shards[shard][first + offset: first + offset + take])
            need -= take
            doc, offset = doc + 1, 0
        return np.concatenate(pieces).astype(np.int64)

    def _batch(self, split: str, starts, rows=None):
        chosen = starts.tolist() if rows is None else starts[rows].tolist()
        w = torch.from_numpy(np.stack([self._window(split, s) for s in chosen]))
        return w[:, :-1], w[:, 1:]

    def train_batch(self, batch_size: int, rows: slice | None = None):
        """Random windows of the train split from this object's seeded generator: the whole
        batch's positions are drawn (so every process's generator moves alike), and only
        ``rows`` of it are read (all by default)."""
        total = self.split_tokens["train"]
        starts = torch.randint(0, total - self.seq_len, (batch_size,), generator=self.generator)
        return self._batch("train", starts, rows)

    def eval_batches(self, split: str, n_batches: int, batch_size: int):
        """``n_batches`` fixed batches of evenly spaced windows spanning the whole split."""
        if split not in self._docs:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        last = self.split_tokens[split] - self.seq_len - 1
        starts = torch.linspace(0, last, n_batches * batch_size, dtype=torch.float64).round().long()
        for i in range(n_batches):
            yield self._batch(split, starts[i * batch_size:(i + 1) * batch_size])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

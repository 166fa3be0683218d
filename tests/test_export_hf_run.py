"""``cage export`` of a run that trained a Hugging Face Llama (``--hf-config``; review of issues 17-18):
``--format compressed-tensors`` writes the converted LlamaForCausalLM through ``cage.export_ct`` with
the run's tokenizer, and compressed-tensors' own loading gives our converted model's logits (the
bound of tests/test_export_ct.py); a failed export, ``hf`` or ``compressed-tensors``, leaves no half
written folder. The runs are tiny and fast: a 2-layer config.json, the byte tokenizer and the
default corpus, 2 steps."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import cage  # noqa: E402
from cage.llama import cli  # noqa: E402
from cage.llama.export import export_run, load_run_model  # noqa: E402
from cage.llama.job import TrainConfig, train  # noqa: E402

RUN = dict(bits=4, steps=2, batch_size=4, seq_len=32, eval_batches=1, eval_every=2, threads=1, verbose=False)


def hf_run(root, method="quest"):
    root.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    config.to_json_file(str(root / "config.json"))
    m = train(TrainConfig(hf_config=str(root / "config.json"), method=method, out=str(root / "run"), **RUN))
    assert m["completed"]
    return root / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return hf_run(tmp_path_factory.mktemp("hf-run"))


def test_an_hf_run_exports_as_compressed_tensors_and_matches_its_loading(run, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from cage.export_ct import _block
    from tests.test_export_ct import check_folder, check_parity, without_activation_quantization

    out = tmp_path / "ct"
    assert cli.main(["export", "--run", str(run), "--format", "compressed-tensors", "--scheme", "w8a16",
                     "--out", str(out)]) == 0, capsys.readouterr().err
    assert {"config.json", "model.safetensors", "tokenizer.json", "cage_export.json"} <= {f.name for f in out.iterdir()}
    info = json.loads((out / "cage_export.json").read_text())
    assert (info["format"], info["scheme"], info["hf_config"]["hidden_size"]) == ("compressed-tensors", "w8a16", 64)
    reference = cage.convert(load_run_model(run)[0].hf).eval()
    blocks = {_block(m) for m in reference.modules() if isinstance(m, cage.QuantizedLinear)}
    assert len(blocks) == 1 and None not in blocks
    check_folder(out, "w8a16", blocks.pop())
    check_parity(without_activation_quantization(reference), out, "w8a16")
    assert transformers.AutoTokenizer.from_pretrained(str(out))("to be").input_ids


def test_a_bf16_hf_run_is_refused_before_the_folder_is_made(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    run = hf_run(tmp_path / "bf16", method="bf16")
    out = tmp_path / "ct"
    capsys.readouterr()  # the run's own output
    assert cli.main(["export", "--run", str(run), "--format", "compressed-tensors", "--scheme", "w8a16",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the run (bf16) has no quantized layer; export it with --format hf" in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["hf", "compressed-tensors"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "empty"])
def test_a_failed_hf_run_export_leaves_nothing_half_written(run, tmp_path, monkeypatch, fmt, existing):
    # review: _export_hf_run left the folder and what it had written, unlike the main path
    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    from cage import export_ct
    from cage.llama.job import sources

    def half_written(model, *args, folder=None, **kwargs):
        target = args[1] if fmt == "hf" else args[0]
        (target / "model.safetensors").write_bytes(b"half")
        (target / "sub").mkdir()
        (target / "sub" / "part").write_bytes(b"half")
        raise RuntimeError("disk full")
    monkeypatch.setattr(sources if fmt == "hf" else export_ct,
                        "save_hf_run" if fmt == "hf" else "export_compressed_tensors", half_written)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run, out, fmt, scheme="w8a16" if fmt == "compressed-tensors" else None)
    assert (out.is_dir() and not any(out.iterdir())) if existing else not out.exists()

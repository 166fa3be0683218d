"""Sizes read from a file are checked against the tensors it stores before anything is built
(issue 18 item 6).

A model file's header, an HF folder's config.json and a run's checkpoint config each say how big
a model to build; edited, they made `generate` allocate 550 GB (vocab_size 2**31), `from_pretrained`
a 2**20 x 2**20 layer and `export` a dim-32768 Llama. Each test crafts such a file and guards the
builder: building the crafted size anywhere but on the meta device fails the test (so nothing big
is ever allocated, before the fix or after), and the load must end in a ValueError naming the file.
"""

import dataclasses
import json
import shutil

import pytest
import torch

import cage
from cage import serialize
from cage.llama import cli, export, generate
from cage.llama.job import loop
from cage.llama.job.checkpoint import CHECKPOINT, CheckpointError, checkpoint_config
from cage.llama.model import MAX_SEQ_LEN, Llama, LlamaConfig, config_from_preset

RUN = ["--method", "quest", "--bits", "4", "--preset", "tiny", "--steps", "2", "--batch-size", "4",
       "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--threads", "1", "--quiet"]


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def _guard(monkeypatch, module, name, too_big):
    """``module.name`` (a builder) refuses to build what ``too_big(args)`` says off the meta device."""
    real = getattr(module, name)

    def guarded(*args, **kwargs):
        if too_big(*args, **kwargs) and not _on_meta():
            raise AssertionError(f"{name} was about to allocate the crafted size")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, guarded)


# ---- generate: the header's model shape --------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model.pt"
    cfg = config_from_preset("tiny", max_seq_len=32)
    torch.manual_seed(0)
    model = Llama(cfg)
    cage.prepare_qat(model, weight=cage.QuantConfig(4, block_size=64), activation=cage.QuantConfig(4, block_size=64))
    cage.convert(model.eval())
    header = serialize.build_header(model, {export.LLAMA_CONFIG_KEY: dataclasses.asdict(cfg)})
    torch.save({serialize.HEADER_KEY: json.dumps(header), "tensors": serialize._unique_state(model)}, path)
    return path


def _with_llama_config(src, dst, **changes):
    blob = torch.load(src, weights_only=True)
    header = json.loads(blob[serialize.HEADER_KEY])
    header["extra"][export.LLAMA_CONFIG_KEY].update(changes)
    blob[serialize.HEADER_KEY] = json.dumps(header)
    torch.save(blob, dst)
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"vocab_size": 2**31}, r"tok_embeddings\.weight.* \[2147483648, 64\]"),
    ({"dim": 2**16, "n_heads": 2**10}, r"65536 in the model"),
    ({"n_heads": 0}, r"n_heads must be positive"),
    ({"hidden_dim": 2**30}, r"gate_up"),
    ({"n_layers": 10**9}, r"n_layers 1000000000.*holds \d+ tensors"),
    ({"max_seq_len": 2**31}, rf"max_seq_len must be at most {MAX_SEQ_LEN}"),
    ({"vocab_size": "256"}, r"vocab_size must be an integer, got '256'"),
    ({"bogus": 1}, r"unknown field 'bogus'"),
])
def test_generate_checks_the_header_shape_against_the_tensors(model_file, tmp_path, monkeypatch, changes, message):
    path = _with_llama_config(model_file, tmp_path / "crafted.pt", **changes)
    _guard(monkeypatch, generate, "Llama", lambda cfg: cfg != generate.LlamaConfig(**_shape(model_file)))
    with pytest.raises(ValueError, match=message) as err:
        generate.load_model(path)
    assert str(path) in str(err.value)


def _shape(path):
    return serialize.read_header(path)["extra"][export.LLAMA_CONFIG_KEY]


def test_generate_still_loads_the_true_shape(model_file):
    assert generate.load_model(model_file).config == LlamaConfig(**_shape(model_file))


def test_llama_config_states_its_sequence_limit():
    with pytest.raises(ValueError, match=f"max_seq_len must be at most {MAX_SEQ_LEN}"):
        LlamaConfig(max_seq_len=MAX_SEQ_LEN + 1)
    LlamaConfig(max_seq_len=MAX_SEQ_LEN, dim=8, n_heads=1)  # the limit itself is fine


# ---- cage.hf.from_pretrained: config.json and the layer specs -----------------------------

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
import cage.hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    cage.prepare_qat(model, weight=cage.QuantConfig(4, block_size=64), activation=cage.QuantConfig(4, block_size=64))
    cage.hf.save_pretrained(model, out)
    return out


def _edited_hf(src, dst, edit):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _huge_spec(config):
    spec = config["quantization_config"]["layers"]["model.layers.0.mlp.down_proj"]
    spec["in_features"] = spec["out_features"] = 2**20


class GuardedLlama(transformers.LlamaForCausalLM):
    @classmethod
    def from_config(cls, config, **kwargs):
        if (config.hidden_size > 64 or config.num_hidden_layers > 2) and not _on_meta():
            raise AssertionError("from_config was about to allocate the crafted size")
        return transformers.LlamaForCausalLM._from_config(config, **kwargs)


@pytest.mark.parametrize("edit, message", [
    (_huge_spec, r"layer 'model\.layers\.0\.mlp\.down_proj'.*in_features is 1048576 in the file, 128 in the model"),
    (lambda c: c.update(hidden_size=2**14), r"16384 in the model"),
    (lambda c: c.update(num_hidden_layers=10**9), r"num_hidden_layers 1000000000.*hold \d+ tensors"),
])
def test_from_pretrained_checks_sizes_before_building(hf_dir, tmp_path, monkeypatch, edit, message):
    directory = _edited_hf(hf_dir, tmp_path / "crafted", edit)
    _guard(monkeypatch, cage.hf, "layer_from_spec", lambda spec, *a, **k: spec["in_features"] > 2**10)
    with pytest.raises(ValueError, match=message) as err:
        cage.hf.from_pretrained(directory, model_class=GuardedLlama)
    assert str(directory) in str(err.value)


def test_from_pretrained_still_loads(hf_dir):
    model = cage.hf.from_pretrained(hf_dir, model_class=GuardedLlama)
    assert type(model.model.layers[0].mlp.down_proj) is cage.QATLinear


# ---- export and --resume: the checkpoint's TrainConfig ------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["train", *RUN, "--out", str(out)]) == 0
    return out


def _crafted_run(run_dir, tmp_path, **config):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    state = torch.load(run / CHECKPOINT, weights_only=True)
    state["config"].update(config)
    torch.save(state, run / CHECKPOINT)
    return run


def _guard_build(monkeypatch):
    for module in (export, loop):
        _guard(monkeypatch, module, "build_model",
               lambda cfg, device, **_: cfg.dim is not None or cfg.n_layers is not None or cfg.seq_len != 32)


@pytest.mark.parametrize("config, message", [
    ({"dim": 32768, "n_heads": 256}, r"tok_embeddings\.weight as \[256, 32768\]; the stored tensor is \[256, 64\]"),
    ({"n_layers": 10**9}, r"n_layers 1000000000.*holds \d+ model tensors"),
    ({"seq_len": 2**31}, rf"max_seq_len must be at most {MAX_SEQ_LEN}"),
])
def test_export_and_resume_check_the_config_against_the_weights(run_dir, tmp_path, monkeypatch, capsys, config, message):
    run = _crafted_run(run_dir, tmp_path, **config)
    _guard_build(monkeypatch)
    with pytest.raises(CheckpointError, match=message):
        export.load_run_model(run)
    with pytest.raises(CheckpointError, match=message):
        checkpoint_config(str(run))
    assert cli.main(["train", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / CHECKPOINT}:" in err and len(err.strip().splitlines()) == 1


def test_the_true_config_still_exports(run_dir, monkeypatch):
    _guard_build(monkeypatch)
    model, cfg = export.load_run_model(run_dir)
    assert cfg.dim is None or cfg.dim == 64


def test_from_pretrained_quantizes_only_linear_layers_and_reads_only_its_folder(hf_dir, tmp_path):
    def embedding_spec(config):
        layers = config["quantization_config"]["layers"]
        layers["model.embed_tokens"] = layers["model.layers.0.mlp.down_proj"]

    directory = _edited_hf(hf_dir, tmp_path / "embedding", embedding_spec)
    with pytest.raises(ValueError, match=r"layer 'model\.embed_tokens' is a Embedding in the model, not a linear"):
        cage.hf.from_pretrained(directory)
    directory = _edited_hf(hf_dir, tmp_path / "index", lambda c: None)
    (directory / cage.hf.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"lm_head.weight": "../model.safetensors"}}))
    with pytest.raises(ValueError, match=r"names '\.\./model\.safetensors', which is not a file in"):
        cage.hf.from_pretrained(directory)


@pytest.mark.parametrize("absolute", [False, True], ids=["dot-dot", "absolute"])
def test_plain_from_pretrained_reads_no_weights_outside_the_folder(hf_dir, tmp_path, absolute):
    # issue 18 item 9, through the registered quantizer: plain transformers followed an index to
    # weights outside the folder (cage.hf.from_pretrained checked; AutoModelForCausalLM did not)
    from safetensors import safe_open

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(hf_dir / cage.hf.WEIGHTS_FILE, outside)
    directory = tmp_path / "folder"
    directory.mkdir()
    shutil.copy(hf_dir / "config.json", directory)
    with safe_open(str(outside / cage.hf.WEIGHTS_FILE), framework="pt") as f:
        keys = list(f.keys())
    target = str(outside / cage.hf.WEIGHTS_FILE) if absolute else f"../outside/{cage.hf.WEIGHTS_FILE}"
    (directory / cage.hf.WEIGHTS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: target for k in keys}}))
    with pytest.raises(ValueError, match=r"the weights index names '\.\./outside/model\.safetensors', which is not a file in") as err:
        transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert str(directory) in str(err.value)
    # the same files inside the folder load
    shutil.copy(outside / cage.hf.WEIGHTS_FILE, directory / "part.safetensors")
    (directory / cage.hf.WEIGHTS_INDEX).write_text(json.dumps({"metadata": {},
                                                               "weight_map": {k: "part.safetensors" for k in keys}}))
    back = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert type(back.model.layers[0].mlp.down_proj) is cage.QATLinear


@pytest.mark.parametrize("name, loads", [
    ("sub/part.safetensors", True), ("./part.safetensors", True),
    ("../part.safetensors", False), ("sub/../../part.safetensors", False), ("{abs}", False), (".", False), ("", False),
])
def test_both_loaders_apply_one_rule_to_the_index(hf_dir, tmp_path, name, loads):
    # review: cage.hf.from_pretrained took bare file names only, the registered quantizer files of
    # subfolders too; one rule now (cage.hf.check_index_names): a relative path inside the folder
    from safetensors import safe_open

    directory = tmp_path / "folder"
    directory.mkdir()
    shutil.copy(hf_dir / "config.json", directory)
    for place in (directory / "sub", directory, tmp_path):
        place.mkdir(exist_ok=True)
        shutil.copy(hf_dir / cage.hf.WEIGHTS_FILE, place / "part.safetensors")
    name = name.format(abs=tmp_path / "part.safetensors")
    with safe_open(str(hf_dir / cage.hf.WEIGHTS_FILE), framework="pt") as f:
        keys = list(f.keys())
    (directory / cage.hf.WEIGHTS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: name for k in keys}}))
    for load in (cage.hf.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained):
        if loads:
            assert type(load(directory).model.layers[0].mlp.down_proj) is cage.QATLinear
        else:
            with pytest.raises((ValueError, OSError)) as err:  # transformers itself may refuse "." or "" first
                load(directory)
            if name not in (".", ""):
                assert "the weights index names" in str(err.value) and "which is not a file in" in str(err.value)

"""cage.hf: a prepared or converted Hugging Face LlamaForCausalLM (built offline from a config)
survives save_pretrained / from_pretrained with the same logits, through cage.hf.from_pretrained and
through plain transformers (the registered "cage" quantizer), in fp32 and bf16; a loaded QAT model
keeps training under transformers' Trainer; cage imports without transformers."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cage

ROOT = Path(__file__).resolve().parent.parent


def test_cage_and_cage_hf_import_without_transformers():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # makes any import of it fail\n"
        "import cage, cage.hf\n"
        "try:\n"
        "    cage.hf.from_pretrained('.')\n"
        "except ImportError:\n"
        "    print('needs transformers')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "needs transformers"


transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
import cage.hf  # noqa: E402


def _hf_llama(tie=False, seed=0):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    cage.prepare_qat(model, weight=cage.QuantConfig(4, block_size=64), activation=cage.QuantConfig(4, block_size=64))
    return model


IDX = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDX).logits


def test_convert_hf_llama_keeps_logits_identical():
    model = _hf_llama()
    converted = cage.convert(copy.deepcopy(model))
    assert isinstance(converted.model.layers[0].self_attn.q_proj, cage.QuantizedLinear)
    assert torch.equal(_logits(converted), _logits(model))


@pytest.mark.parametrize("converted", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip_restores_outputs(tmp_path, converted, tie):
    model = _hf_llama(tie=tie)
    if converted:
        cage.convert(model)
    ref = _logits(model)
    cage.hf.save_pretrained(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "cage" and len(qc["layers"]) == 14
    kind = "quantized" if converted else "qat"
    assert {spec["kind"] for spec in qc["layers"].values()} == {kind}
    assert qc["layers"]["model.layers.1.mlp.down_proj"]["weight_quant"]["bits"] == 4

    layer_type = cage.QuantizedLinear if converted else cage.QATLinear
    for back in (cage.hf.from_pretrained(tmp_path), transformers.AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(back.model.layers[1].mlp.down_proj) is layer_type and not back.training
        assert torch.equal(_logits(back), ref)
        if tie:
            assert back.lm_head.weight is back.model.embed_tokens.weight


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        cage.hf.from_pretrained(tmp_path)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    plain.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no cage quantization_config"):
        cage.hf.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no QATLinear or QuantizedLinear"):
        cage.hf.save_pretrained(plain, tmp_path)


# ---- the registered quantizer: plain transformers loads, casts, saves and trains -----------


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True).stdout


def test_registration_at_import():
    # import cage registers only when transformers is already imported (it stays light otherwise);
    # import cage.hf always registers
    out = _run(
        "import sys, cage\n"
        "assert 'transformers' not in sys.modules and 'cage.hf' not in sys.modules\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
        "print('cage' in M)\n"
        "import cage.hf\n"
        "print('cage' in M)\n"
    )
    assert out.split() == ["False", "True"]
    out = _run("import transformers, cage\n"
               "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\nprint('cage' in M)\n")
    assert out.split() == ["True"]


def test_without_cage_transformers_drops_the_quantizers(tmp_path):
    # what a reader who never imports cage gets: float nn.Linear layers and a warning
    cage.hf.save_pretrained(_hf_llama(), tmp_path)
    out = _run(
        "import transformers, torch\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(type(m.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    assert out.split() == ["Linear"]


@pytest.mark.parametrize("converted", [False, True])
def test_bf16_load_gives_bf16_layers_and_fp32_scales(tmp_path, converted):
    model = _hf_llama()
    if converted:
        cage.convert(model)
    cage.hf.save_pretrained(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layer = back.model.layers[0].self_attn.k_proj
    if converted:
        assert layer.weight_dtype == torch.bfloat16 and layer.weight_scale.dtype == torch.float32
    else:
        assert layer.weight.dtype == torch.bfloat16
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    # exactly the saved model cast to bf16 (a converted layer's codes and fp32 scales are unchanged);
    # .to() also casts the rotary inv_freq buffer, which from_pretrained keeps in fp32
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16).model.rotary_emb.inv_freq = inv_freq
    assert torch.equal(_logits(back), _logits(model))


def test_save_pretrained_of_a_loaded_model_round_trips(tmp_path):
    model = _hf_llama()
    cage.hf.save_pretrained(model, tmp_path / "qat")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    loaded.save_pretrained(tmp_path / "again")  # plain save_pretrained
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert type(again.model.layers[0].mlp.up_proj) is cage.QATLinear
    assert torch.equal(_logits(again), _logits(model))
    # the config is written from the layers as they are at save time: convert, then save
    cage.convert(loaded)
    loaded.save_pretrained(tmp_path / "converted")
    qc = json.loads((tmp_path / "converted" / "config.json").read_text())["quantization_config"]
    assert {s["kind"] for s in qc["layers"].values()} == {"quantized"} and qc["format_version"] == 2
    served = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert type(served.model.layers[0].mlp.up_proj) is cage.QuantizedLinear
    assert torch.equal(_logits(served), _logits(model))


def test_integer_grid_round_trip_and_version_1_configs(tmp_path):
    model = transformers.LlamaForCausalLM(_hf_llama().config).eval()
    cage.prepare_qat(model, weight=cage.QuantConfig(4, block_size=64, grid="integer"),
                     activation=cage.QuantConfig(4, block_size=64))
    cage.convert(model)
    cage.hf.save_pretrained(model, tmp_path / "int")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "int")
    assert back.model.layers[0].mlp.gate_proj.weight_quant.grid == "integer"
    assert torch.equal(_logits(back), _logits(model))
    # a version 1 config (before the grid existed) loads as the centered grid
    centered = cage.convert(_hf_llama())
    cage.hf.save_pretrained(centered, tmp_path / "v1")
    path = tmp_path / "v1" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format_version"] = 1
    for spec in config["quantization_config"]["layers"].values():
        for field in ("weight_quant", "act_quant"):
            del spec[field]["grid"]
    path.write_text(json.dumps(config))
    old = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v1")
    assert old.model.layers[0].mlp.gate_proj.weight_quant.grid == "centered"
    assert torch.equal(_logits(old), _logits(centered))
    config["quantization_config"]["format_version"] = 99
    path.write_text(json.dumps(config))
    for load in (cage.hf.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="format_version 99; this cage reads versions 1 and 2"):
            load(tmp_path / "v1")


def cage_trainer(model, output_dir, rows, steps, batch, **kwargs):
    """A transformers Trainer with CAGEAdamW on ``rows`` random sequences of 16 tokens, on the CPU,
    quiet, reporting nowhere (TrainingArguments needs accelerate: the hf extra installs it)."""
    ids = torch.randint(0, 96, (rows, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(output_dir), report_to=[], use_cpu=True, disable_tqdm=True,
                                          max_steps=steps, per_device_train_batch_size=batch, **kwargs)
    return transformers.Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(
        cage.CAGEAdamW, {"model": model, "lr": 1e-3, "total_steps": steps}))


def test_trainer_keeps_training_a_loaded_qat_model(tmp_path):
    cage.hf.save_pretrained(_hf_llama(), tmp_path / "qat")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    model.train()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = cage_trainer(model, tmp_path / "out", rows=8, steps=3, batch=4, save_strategy="no", logging_steps=1)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer) is cage.QATLinear and not torch.equal(layer.weight.detach(), before)
    # a converted model holds codes, not weights: Trainer refuses it, as for any purely quantized model
    cage.hf.save_pretrained(cage.convert(_hf_llama()), tmp_path / "converted")
    served = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=served, args=trainer.args, train_dataset=trainer.train_dataset)


@pytest.mark.parametrize("value, message", [
    (float("nan"), "weight_scale holds NaN or Inf"),
    (-0.25, r"weight_scale holds values <= 0 \(the smallest is -0\.25"),
])
def test_a_nan_or_negative_scale_is_refused_naming_the_file_and_layer(tmp_path, value, message):
    # issue 18 item 9: they loaded silently (NaN logits, or a row of the layer with its sign flipped)
    from safetensors.torch import load_file, save_file

    cage.hf.save_pretrained(cage.convert(_hf_llama()), tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.1.mlp.down_proj.weight_scale"
    tensors[key][5] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    for load in (cage.hf.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=rf"layer 'model\.layers\.1\.mlp\.down_proj': {message}") as err:
            load(tmp_path)
        assert str(weights) in str(err.value) and "\n" not in str(err.value)


def test_prepare_qat_on_a_pretrained_model_makes_plain_save_pretrained_carry_the_config(tmp_path):
    # issue 18 item 10: a model made with prepare_qat wrote config.json (and Trainer checkpoints)
    # without a quantization_config, so plain from_pretrained gave back nn.Linear layers
    model = _hf_llama()
    assert model.config.quantization_config.quant_method == "cage"
    model.save_pretrained(tmp_path / "qat")  # plain transformers
    qc = json.loads((tmp_path / "qat" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "cage" and {s["kind"] for s in qc["layers"].values()} == {"qat"}
    assert len(qc["layers"]) == 14
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    assert type(back.model.layers[1].mlp.down_proj) is cage.QATLinear and type(back.lm_head) is torch.nn.Linear
    assert torch.equal(_logits(back), _logits(model))
    # the config describes the layers at save time: converted after prepare_qat, saved converted
    cage.convert(model)
    model.save_pretrained(tmp_path / "converted")
    qc = json.loads((tmp_path / "converted" / "config.json").read_text())["quantization_config"]
    assert {s["kind"] for s in qc["layers"].values()} == {"quantized"}
    served = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert type(served.model.layers[1].mlp.down_proj) is cage.QuantizedLinear
    assert torch.equal(_logits(served), _logits(model))


def test_a_trainer_checkpoint_of_a_prepared_model_loads_with_its_qat_layers(tmp_path):
    model = _hf_llama().train()
    trainer = cage_trainer(model, tmp_path / "out", rows=4, steps=2, batch=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "cage" and len(qc["layers"]) == 14
    back = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    assert type(back.model.layers[0].self_attn.q_proj) is cage.QATLinear
    assert torch.equal(_logits(back), _logits(model.eval()))


def test_prepare_qat_on_a_plain_module_attaches_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    cage.prepare_qat(model, weight=cage.QuantConfig(4, block_size=64))
    assert not hasattr(model, "hf_quantizer") and not hasattr(model, "config")


def test_the_quantizer_fails_closed_without_the_checkpoint_files():
    # review: with a transformers that does not pass checkpoint_files (4.x), the index check was
    # silently off; now that is an error naming the version needed (pyproject's hf extra asks for it)
    from cage.hf_quantizer import MIN_TRANSFORMERS, CageHfQuantizer, CageQuantizationConfig

    model = _hf_llama()
    config = CageQuantizationConfig.from_model(model)
    plain = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(ValueError, match=rf"does not pass the checkpoint's files.*needs transformers >= {MIN_TRANSFORMERS}"):
        CageHfQuantizer(config).preprocess_model(plain)
    CageHfQuantizer(config).preprocess_model(plain, checkpoint_files=None)  # passed, and none: nothing to check
    assert type(plain.model.layers[0].mlp.down_proj) is cage.QATLinear
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"transformers>={MIN_TRANSFORMERS}" in extras["hf"]


def test_the_file_holding_a_scale_is_looked_up_only_for_an_error(tmp_path, monkeypatch):
    # review: it was looked up for every layer of every load (each shard's header opened per layer)
    from cage.hf_quantizer import CageHfQuantizer

    cage.hf.save_pretrained(cage.convert(_hf_llama()), tmp_path)

    def looked_up(*args):
        raise AssertionError("_file_holding called for a checkpoint with good scales")
    monkeypatch.setattr(CageHfQuantizer, "_file_holding", looked_up)
    served = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(served.model.layers[1].mlp.down_proj) is cage.QuantizedLinear

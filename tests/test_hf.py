"""cage.hf: a prepared or converted Hugging Face LlamaForCausalLM (built offline from a config)
survives save_pretrained / from_pretrained with the same logits; cage imports without transformers."""

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

    back = cage.hf.from_pretrained(tmp_path)
    layer_type = cage.QuantizedLinear if converted else cage.QATLinear
    assert type(back.model.layers[1].mlp.down_proj) is layer_type
    assert torch.equal(_logits(back), ref)
    if tie:
        assert back.lm_head.weight is back.model.embed_tokens.weight


def test_plain_from_pretrained_loses_the_quantizers(tmp_path):
    # the problem the issue reports, kept visible: transformers alone rebuilds nn.Linear layers
    model = _hf_llama()
    cage.hf.save_pretrained(model, tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not torch.equal(_logits(plain.eval()), _logits(model))


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

"""cage.convert: the converted layer rebuilds the QAT weight bit for bit, and a converted model's
forward equals the QAT model's."""

import copy

import pytest
import torch
from torch import nn

import cage
from cage import naive
from cage.convert import QuantizedLinear, dequantize_codes, quantize_to_codes
from cage.llama.model import Llama, config_from_preset


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("hadamard", [True, False])
def test_codes_and_scale_rebuild_the_quantizer_output_exactly(bits, hadamard):
    gen = torch.Generator().manual_seed(bits)
    for shape, dtype in (((5, 64), torch.float32), ((3, 256), torch.float32), ((7, 32), torch.bfloat16),
                         ((4, 32), torch.float64)):
        cfg = cage.QuantConfig(bits, hadamard=hadamard, block_size=32)
        w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        w[0] = 0.0  # the eps of an all-zero row
        w[1, :3] = torch.tensor([1.0, -1.0, 0.5])  # outliers clipped to the outermost levels
        codes, scale = quantize_to_codes(w, cfg)
        assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
        assert scale.dtype == naive.compute_dtype(dtype) and scale.shape == (shape[0], 1)
        for rotate_back in (True, False):
            rebuilt = dequantize_codes(codes, scale, cfg, rotate_back, dtype)
            assert torch.equal(rebuilt, naive.quantize(w, cfg, rotate_back)[0]), (shape, dtype, rotate_back)


def test_codes_of_the_extremes_and_of_zero():
    cfg = cage.QuantConfig(3, hadamard=False)
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = -100.0, 100.0  # clipped to -s and s
    codes, scale = quantize_to_codes(w, cfg)
    assert codes[0, :3].tolist() == [0, 7, 3]  # 0 sits on a tie between levels: round half to even, k = 0
    rebuilt = dequantize_codes(codes, scale, cfg, True, torch.float32)
    assert rebuilt[0, 0] == -scale[0, 0] and rebuilt[0, 1] == scale[0, 0]


def _qat_layer(in_f=64, out_f=24, bias=True, act=True, w_block=32, a_block=32, seed=0):
    torch.manual_seed(seed)
    wq = cage.QuantConfig(4, block_size=w_block)
    aq = cage.QuantConfig(4, block_size=a_block) if act else None
    layer = cage.QATLinear(in_f, out_f, bias, weight_quant=wq, act_quant=aq, backend="torch")
    return layer.eval()


@pytest.mark.parametrize("kwargs", [
    dict(),  # shared rotation: the layer multiplies in the rotated domain
    dict(a_block=16),  # different blocks: the weight is rotated back
    dict(act=False),  # weight only
    dict(bias=False),
])
def test_quantized_linear_forward_equals_qat_linear(kwargs):
    layer = _qat_layer(**kwargs)
    new = QuantizedLinear.from_qat(layer)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.equal(new(x), layer(x))
    assert new.packed_weight.shape == (24, 32)  # two 4-bit codes per byte
    assert new.weight_scale.shape == (24, 1)


def test_quantized_linear_without_weight_quant_or_nonfinite_weight_is_refused():
    layer = cage.QATLinear(32, 8, weight_quant=None, act_quant=cage.QuantConfig(4, block_size=32))
    with pytest.raises(ValueError, match="weight_quant=None"):
        QuantizedLinear.from_qat(layer)
    model = nn.Sequential(_qat_layer())
    with torch.no_grad():
        model[0].weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"convert: layer '0'.*non-finite"):
        cage.convert(model)


def _tiny_llama(bits=4, act_bits=4, seed=0):
    torch.manual_seed(seed)
    model = Llama(config_from_preset("tiny", max_seq_len=32))
    aq = cage.QuantConfig(act_bits, block_size=64) if act_bits else None
    cage.prepare_qat(model, weight=cage.QuantConfig(bits, block_size=64), activation=aq)
    return model.eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_convert_llama_gives_identical_logits_in_fp32(bits):
    model = _tiny_llama(bits)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx)[0]
        converted = cage.convert(copy.deepcopy(model))
        assert torch.equal(converted(idx)[0], ref)
    kinds = {type(m) for m in converted.modules()}
    assert cage.QATLinear not in kinds and QuantizedLinear in kinds
    assert type(converted.lm_head) is nn.Linear  # skipped by prepare_qat, left alone
    # the converted model holds no full-precision weight of a quantized layer
    assert not any(k.endswith("qkv.weight") for k in converted.state_dict())


def test_convert_llama_under_bf16_autocast_matches():
    model = _tiny_llama(4)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    converted = cage.convert(copy.deepcopy(model))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = model(idx)[0], converted(idx)[0]
    assert ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_convert_keeps_activation_only_layers():
    torch.manual_seed(0)
    model = Llama(config_from_preset("tiny", max_seq_len=32))
    cage.prepare_qat(model, weight=None, activation=cage.QuantConfig(4, block_size=64))
    cage.convert(model)
    assert isinstance(model.layers[0].attn.qkv, cage.QATLinear)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_to_bfloat16_keeps_the_scale_exact():
    layer = QuantizedLinear.from_qat(_qat_layer())
    scale = layer.weight_scale.clone()
    expected = layer.dequantize_weight().to(torch.bfloat16)
    layer.to(torch.bfloat16)
    assert layer.weight_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert torch.equal(layer.dequantize_weight(), expected)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16

"""Bit packing of grid codes, and save_quantized / load_quantized: bit-exact round trips, sizes,
and clear errors for files that do not fit the model."""

import json
import re

import pytest
import torch

import cage
from cage import serialize
from cage.convert import QuantizedLinear
from cage.llama.model import Llama, config_from_preset
from cage.packing import _pack_bitstream, _unpack_bitstream, pack_codes, packed_row_bytes, unpack_codes

# ---- packing


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_on_all_widths_and_odd_lengths(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 2, 3, 7, 13, 64, 129):
        codes = torch.randint(0, 2**bits, (5, n), generator=gen)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (5, (n * bits + 7) // 8)
        assert torch.equal(unpack_codes(packed, bits, n), codes.to(torch.uint8))
        # rows are independently addressable
        assert torch.equal(unpack_codes(packed[2:3], bits, n), codes[2:3].to(torch.uint8))


@pytest.mark.parametrize("bits", [4, 8])
def test_fast_paths_write_the_same_bit_stream(bits):
    codes = torch.randint(0, 2**bits, (3, 11), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, _pack_bitstream(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, 11), _unpack_bitstream(packed, bits, 11))


def test_packing_layout_little_endian():
    # 3 bits: 5 = 101, 3 = 011, 7 = 111 -> stream (lowest bit first) 1,0,1, 1,1,0, 1,1,1 + padding
    assert pack_codes(torch.tensor([[5, 3, 7]]), 3).tolist() == [[0b11011101, 0b00000001]]
    assert pack_codes(torch.tensor([[0x3, 0xA, 0xF]]), 4).tolist() == [[0xA3, 0x0F]]
    assert packed_row_bytes(640, 4) == 320 and packed_row_bytes(640, 3) == 240


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match=r"codes must lie in 0..7 for bits=3, got values in 0..8"):
        pack_codes(torch.tensor([[0, 8]]), 3)
    with pytest.raises(ValueError, match=r"0..15.*-1..2"):
        pack_codes(torch.tensor([[-1, 2]]), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_codes(torch.tensor([[0.0, 1.0]]), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match=r"bits must be an integer in 1..8, got 9"):
        pack_codes(torch.tensor([[0]]), 9)
    with pytest.raises(ValueError, match="take 5 bytes per row, the packed tensor has 4"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.uint8), 3, 13)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int32), 8, 4)


# ---- save / load


def _prepared(bits=4, dim=64, seed=0, skip=("lm_head",)):
    torch.manual_seed(seed)
    model = Llama(config_from_preset("tiny", dim=dim, max_seq_len=32))
    cage.prepare_qat(model, weight=cage.QuantConfig(bits, block_size=64),
                     activation=cage.QuantConfig(4, block_size=64), skip=skip)
    return model.eval()


def _plain(dim=64):
    return Llama(config_from_preset("tiny", dim=dim, max_seq_len=32)).eval()


IDX = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))


def _check_round_trip(path, converted, skeleton):
    cage.load_quantized(path, skeleton)
    a, b = converted.state_dict(), skeleton.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(skeleton(IDX)[0], converted(IDX)[0])


@pytest.mark.parametrize("skeleton", ["plain", "prepared", "converted"])
def test_save_load_round_trip_is_bit_exact(tmp_path, skeleton):
    pytest.importorskip("safetensors")
    converted = cage.convert(_prepared(3))
    path = tmp_path / "model.safetensors"
    report = cage.save_quantized(converted, path, extra={"note": "w3"})
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte length, then its JSON header
    target = {"plain": _plain, "prepared": lambda: _prepared(3, seed=1),
              "converted": lambda: cage.convert(_prepared(3, seed=1))}[skeleton]()
    _check_round_trip(path, converted, target)
    assert cage.read_header(path)["extra"] == {"note": "w3"}
    assert report["file_bytes"] == path.stat().st_size


def test_torch_save_fallback_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(serialize, "safetensors_installed", lambda: False)
    converted = cage.convert(_prepared(4))
    path = tmp_path / "model.pt"
    cage.save_quantized(converted, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    _check_round_trip(path, converted, _plain())


def test_header_holds_every_quant_config_and_layer_name(tmp_path):
    converted = cage.convert(_prepared(4))
    path = tmp_path / "m.bin"
    cage.save_quantized(converted, path)
    header = cage.read_header(path)
    assert header["format"] == serialize.FORMAT and header["version"] == serialize.FORMAT_VERSION
    names = {n for n, m in converted.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(header["layers"]) == names and len(names) == 12
    spec = header["layers"]["layers.0.mlp.down"]
    assert spec["weight_quant"] == cage.QuantConfig(4, block_size=64).to_dict()
    assert spec["act_quant"]["bits"] == 4 and spec["kind"] == "quantized"
    assert (spec["in_features"], spec["out_features"], spec["weight_dtype"]) == (192, 64, "float32")  # hidden 192 -> dim 64


def test_size_report_counts_packed_codes_and_scales():
    converted = cage.convert(_prepared(4))
    report = cage.size_report(converted)
    layers = [m for m in converted.modules() if isinstance(m, QuantizedLinear)]
    assert report["quantized_bytes"] == sum(m.out_features * (m.in_features // 2 + 4) for m in layers)
    assert report["quantized_bf16_bytes"] == sum(2 * m.out_features * m.in_features for m in layers)
    # the 30M shape's rows (640 and 1792 wide): about 0.26x of bf16 at W4
    wide = QuantizedLinear(640, 8, False, weight_quant=cage.QuantConfig(4))
    ratio = (wide.packed_weight.numel() + 4 * wide.weight_scale.numel()) / (2 * 640 * 8)
    assert 0.25 < ratio < 0.26


def test_a_file_with_other_bits_is_an_error_naming_the_layer(tmp_path):
    path = tmp_path / "m.bin"
    cage.save_quantized(cage.convert(_prepared(4)), path)
    with pytest.raises(ValueError, match=r"layer 'layers\.0\.attn\.proj': weight_quant\.bits is 4 in the file, 3 in the model"):
        cage.load_quantized(path, _prepared(3))
    with pytest.raises(ValueError, match=r"weight_quant\.bits is 4 in the file, 2 in the model"):
        cage.load_quantized(path, cage.convert(_prepared(2)))


def test_a_mismatched_model_is_an_error(tmp_path):
    path = tmp_path / "m.bin"
    cage.save_quantized(cage.convert(_prepared(4)), path)
    with pytest.raises(ValueError, match=r"in_features is 64 in the file, 128 in the model"):
        cage.load_quantized(path, _plain(dim=128))
    with pytest.raises(ValueError, match=r"quantized layer 'lm_head' is not in the file"):
        cage.load_quantized(path, _prepared(4, skip=()))
    deeper = Llama(config_from_preset("tiny", n_layers=4, max_seq_len=32))
    with pytest.raises(ValueError, match=r"layers\.3\..* not in the file|tensors the file lacks"):
        cage.load_quantized(path, cage.prepare_qat(deeper, weight=cage.QuantConfig(4, block_size=64)))
    with pytest.raises(ValueError, match=r"weight_dtype is 'float32' in the file, 'bfloat16' in the model"):
        cage.load_quantized(path, _plain().to(torch.bfloat16))
    half_embedding = _plain()
    half_embedding.tok_embeddings.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"tensor 'tok_embeddings\.weight' is torch\.float32 \[256, 64\] in the file, "
                                         r"torch\.bfloat16 \[256, 64\] in the model"):
        cage.load_quantized(path, half_embedding)
    assert type(half_embedding.layers[0].attn.qkv) is torch.nn.Linear  # a failed load changes nothing


def test_bad_files_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no quantized model file"):
        cage.load_quantized(tmp_path / "absent.bin", _plain())
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.bin"):
        cage.load_quantized(junk, _plain())
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(ValueError, match="not a cage quantized model file"):
        cage.load_quantized(other, _plain())
    monkeypatch.setattr(serialize, "safetensors_installed", lambda: False)
    future = tmp_path / "future.pt"
    cage.save_quantized(cage.convert(_prepared(4)), future)
    blob = torch.load(future, weights_only=True)
    header = json.loads(blob["cage"])
    header["version"] = 99
    torch.save({"cage": json.dumps(header), "tensors": blob["tensors"]}, future)
    with pytest.raises(ValueError, match="format version 99; this cage reads versions 1 and 2"):
        cage.load_quantized(future, _plain())


def test_version_1_files_load_as_the_centered_grid(tmp_path, monkeypatch):
    # version 2 (the integer grid) is what is written; a version 1 file has no grid in its configs
    monkeypatch.setattr(serialize, "safetensors_installed", lambda: False)
    converted = cage.convert(_prepared(4))
    path = tmp_path / "v1.pt"
    cage.save_quantized(converted, path)
    blob = torch.load(path, weights_only=True)
    header = json.loads(blob["cage"])
    assert header["version"] == 2
    header["version"] = 1
    for spec in header["layers"].values():
        for field in ("weight_quant", "act_quant"):
            del spec[field]["grid"]
    torch.save({"cage": json.dumps(header), "tensors": blob["tensors"]}, path)
    skeleton = _plain()
    _check_round_trip(path, converted, skeleton)
    assert skeleton.layers[0].attn.qkv.weight_quant.grid == "centered"


def test_integer_grid_files_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Llama(config_from_preset("tiny", dim=64, max_seq_len=32))
    cage.prepare_qat(model, weight=cage.QuantConfig(4, block_size=64, grid="integer"),
                     activation=cage.QuantConfig(4, block_size=64, grid="integer"))
    converted = cage.convert(model.eval())
    path = tmp_path / "int.bin"
    cage.save_quantized(converted, path)
    assert cage.read_header(path)["layers"]["layers.0.mlp.down"]["weight_quant"]["grid"] == "integer"
    skeleton = _plain()
    _check_round_trip(path, converted, skeleton)
    assert skeleton.layers[0].mlp.down.weight_quant.grid == "integer"


def test_saving_an_unconverted_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"layer 'layers\.0\.attn\.qkv' is a QATLinear .* call cage\.convert"):
        cage.save_quantized(_prepared(4), tmp_path / "m.bin")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        cage.save_quantized(cage.convert(_prepared(4)), tmp_path / "m.bin", extra={"x": object()})


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "torch.save"])
def test_saving_into_a_missing_folder_or_onto_a_folder_is_one_line(tmp_path, monkeypatch, safetensors):
    # issue 18 item 10: a missing folder was safetensors' raw error (torch.save's without it)
    if safetensors:
        pytest.importorskip("safetensors")
    monkeypatch.setattr(serialize, "safetensors_installed", lambda: safetensors)
    converted = cage.convert(_prepared(4))
    missing = tmp_path / "no" / "such" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"save_quantized: path: the folder {re.escape(str(missing.parent))} "
                                                r"does not exist") as err:
        cage.save_quantized(converted, missing)
    assert "\n" not in str(err.value) and not (tmp_path / "no").exists()
    with pytest.raises(ValueError, match=rf"save_quantized: path: {re.escape(str(tmp_path))} is a folder; "
                                         r"give a file path such as .*model\.safetensors") as err:
        cage.save_quantized(converted, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_saving_a_model_with_no_quantized_layer_is_an_error_unless_allowed(tmp_path):
    # issue 18 item 10: it wrote a float file with an empty layer list, silently
    path = tmp_path / "m.bin"
    with pytest.raises(ValueError, match=r"save_quantized: the model \(Llama\) has no QuantizedLinear or QATLinear "
                                         r"layer, so nothing is quantized: prepare it with cage\.prepare_qat.*"
                                         r"allow_unquantized=True") as err:
        cage.save_quantized(_plain(), path)
    assert "\n" not in str(err.value) and not path.exists()
    with pytest.raises(TypeError, match="allow_unquantized must be True or False, got 'yes'"):
        cage.save_quantized(_plain(), path, allow_unquantized="yes")
    plain = _plain()
    report = cage.save_quantized(plain, path, allow_unquantized=True)
    assert report["quantized_layers"] == 0 and cage.read_header(path)["layers"] == {}
    _check_round_trip(path, plain, _plain())


def test_safetensors_without_cage_header_is_an_error(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "plain.safetensors"
    st.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a cage quantized model file"):
        cage.read_header(path)


def test_tied_weights_are_saved(tmp_path):
    converted = cage.convert(_prepared(4))
    converted.lm_head.weight = converted.tok_embeddings.weight  # shared storage
    path = tmp_path / "tied.bin"
    cage.save_quantized(converted, path)
    skeleton = _plain()
    skeleton.lm_head.weight = skeleton.tok_embeddings.weight
    _check_round_trip(path, converted, skeleton)
    assert skeleton.lm_head.weight is skeleton.tok_embeddings.weight

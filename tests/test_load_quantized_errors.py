"""`cage.load_quantized` checks a whole file before it changes the model (issue 18 item 5).

A malformed archive (no "tensors", a non-tensor value, a broken layer spec, a blocked pickle) is a
ValueError naming the file, and the model keeps every module and value it had: no half-converted
model that still returns logits. A row scale that is NaN, Inf or <= 0 (issue 18 item 9: they loaded
silently, and gave NaN or sign-flipped rows) is refused the same way, naming the layer.
"""

import json

import pytest
import torch

import cage
from cage import serialize
from cage.llama.model import Llama, config_from_preset


def _plain():
    return Llama(config_from_preset("tiny", dim=64, max_seq_len=32)).eval()


def _prepared():
    model = _plain()
    cage.prepare_qat(model, weight=cage.QuantConfig(4, block_size=64), activation=cage.QuantConfig(4, block_size=64))
    return model


class Payload:
    def __reduce__(self):
        return exec, ("raise SystemExit('the payload ran')",)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A torch.save archive of a converted tiny Llama (the format without safetensors)."""
    path = tmp_path_factory.mktemp("file") / "model.pt"
    torch.manual_seed(0)
    converted = cage.convert(_prepared())
    header = serialize.build_header(converted)
    torch.save({serialize.HEADER_KEY: json.dumps(header), "tensors": serialize._unique_state(converted)}, path)
    return path


def _edit(blob):
    blob = dict(blob)
    blob["header"] = json.loads(blob[serialize.HEADER_KEY])
    return blob


def no_tensors(b):
    del b["tensors"]


def tensors_not_a_dict(b):
    b["tensors"] = list(b["tensors"].values())


def a_list_for_a_tensor(b):
    b["tensors"]["layers.0.attn.qkv.packed_weight"] = [1, 2, 3]


def a_number_key(b):
    b["tensors"][7] = torch.zeros(1)


def layers_not_a_dict(b):
    b["header"]["layers"] = ["layers.0.attn.qkv"]


def a_spec_without_in_features(b):
    del b["header"]["layers"]["layers.1.mlp.down"]["in_features"]


def a_spec_with_a_word_for_a_config(b):
    b["header"]["layers"]["layers.2.attn.proj"]["weight_quant"] = "four bits"


def a_string_for_a_size(b):
    b["header"]["layers"]["layers.2.attn.proj"]["out_features"] = "64"


def a_blocked_pickle(b):
    b["tensors"]["layers.0.attn.qkv.packed_weight"] = Payload()


def _scale(b, value):
    scale = b["tensors"]["layers.1.mlp.down.weight_scale"].clone()
    scale[3] = value
    b["tensors"]["layers.1.mlp.down.weight_scale"] = scale


def a_nan_scale(b):
    _scale(b, float("nan"))


def an_inf_scale(b):
    _scale(b, float("inf"))


def a_negative_scale(b):
    _scale(b, -0.5)


def a_zero_scale(b):
    _scale(b, 0.0)


CASES = {
    no_tensors: "no 'tensors'",
    tensors_not_a_dict: "'tensors' is a list",
    a_list_for_a_tensor: r"'layers\.0\.attn\.qkv\.packed_weight' is a list, not a tensor",
    a_number_key: "tensor name 7",
    layers_not_a_dict: "'layers' is not a dict",
    a_spec_without_in_features: r"layer 'layers\.1\.mlp\.down'.*in_features",
    a_spec_with_a_word_for_a_config: r"layer 'layers\.2\.attn\.proj'.*weight_quant",
    a_string_for_a_size: r"layer 'layers\.2\.attn\.proj'.*out_features",
    a_blocked_pickle: "refused",
    a_nan_scale: r"layer 'layers\.1\.mlp\.down': weight_scale holds NaN or Inf",
    an_inf_scale: r"layer 'layers\.1\.mlp\.down': weight_scale holds NaN or Inf",
    a_negative_scale: r"layer 'layers\.1\.mlp\.down': weight_scale holds values <= 0 \(the smallest is -0\.5",
    a_zero_scale: r"layer 'layers\.1\.mlp\.down': weight_scale holds values <= 0",
}


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make", [_plain, _prepared], ids=["plain", "prepared"])
@pytest.mark.parametrize("damage", list(CASES), ids=[f.__name__ for f in CASES])
def test_a_malformed_archive_changes_nothing(archive, tmp_path, make, damage):
    blob = _edit(torch.load(archive, weights_only=True))
    damage(blob)
    header = blob.pop("header")
    blob[serialize.HEADER_KEY] = json.dumps(header)
    path = tmp_path / "bad.pt"
    torch.save(blob, path)
    model = make()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=CASES[damage]) as err:
        cage.load_quantized(path, model)
    assert str(path) in str(err.value)
    after = _snapshot(model)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in before[1])


def test_any_failure_while_loading_puts_the_layers_back(archive, monkeypatch):
    model = _plain()
    before = _snapshot(model)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(model, "load_state_dict", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cage.load_quantized(archive, model)
    assert _snapshot(model)[0] == before[0]


def test_the_untouched_archive_loads(archive):
    model = cage.load_quantized(archive, _plain())
    assert isinstance(model.layers[0].attn.qkv, cage.QuantizedLinear)


def test_an_unknown_backend_is_refused_before_the_file_is_read(archive):
    model = _plain()
    with pytest.raises(ValueError, match=r"load_quantized: backend must be one of .*'bogus'"):
        cage.load_quantized(archive, model, backend="bogus")
    assert type(model.layers[0].attn.qkv) is torch.nn.Linear

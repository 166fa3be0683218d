"""``prepare_qat`` as a newcomer uses it (issue 18 item 10): an automatic Hadamard block for
narrow layers, a second call that does not silently keep the first call's configs, a model
without nn.Linear, and the skip list working by name (the last layer of an nn.Sequential)."""

import warnings

import pytest
import torch
from torch import nn

import cage
from cage import QATLinear, QuantConfig, prepare_qat


def odd_widths():
    return nn.Sequential(nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 200), nn.ReLU(), nn.Linear(200, 10))


def test_block_size_auto_fits_each_layer():
    with pytest.raises(ValueError, match=r"layer '0'.*\(96\).*block_size \(128\).*block_size='auto'"):
        prepare_qat(odd_widths(), weight=QuantConfig(4), activation=QuantConfig(4))
    model = prepare_qat(odd_widths(), weight=QuantConfig(4), activation=QuantConfig(4), block_size="auto")
    blocks = {name: (m.weight_quant.block_size, m.act_quant.block_size)
              for name, m in model.named_modules() if isinstance(m, QATLinear)}
    # the largest power of two <= 128 that divides each layer's in_features, the same on both sides
    assert blocks == {"0": (32, 32), "2": (32, 32), "4": (8, 8)}
    assert all(m._shares_rotation() for m in model.modules() if isinstance(m, QATLinear))
    assert model(torch.randn(5, 96)).shape == (5, 10)
    # a smaller block in the config is the upper limit; unrotated configs are left alone
    model = prepare_qat(odd_widths(), weight=QuantConfig(4, block_size=16), activation=QuantConfig(4, hadamard=False),
                        block_size="auto")
    assert [m.weight_quant.block_size for m in model.modules() if isinstance(m, QATLinear)] == [16, 16, 8]
    assert all(m.act_quant == QuantConfig(4, hadamard=False) for m in model.modules() if isinstance(m, QATLinear))
    # the optimizer groups follow the per-layer configs (one group per distinct config)
    groups = cage.qat_param_groups(model, 0.1)
    assert sorted(g["quant"].block_size for g in groups if g["quant"] is not None) == [8, 16]
    with pytest.raises(ValueError, match="block_size must be None or 'auto'"):
        prepare_qat(odd_widths(), weight=QuantConfig(4), block_size=64)


def test_block_size_auto_is_the_job_s_choice_on_the_llama():
    from cage.llama.job import TrainConfig
    from cage.llama.model import Llama

    cfg = TrainConfig(preset="tiny")
    model = prepare_qat(Llama(cfg.model_config()), weight=QuantConfig(4), activation=QuantConfig(4),
                        block_size="auto")
    assert {m.weight_quant.block_size for m in model.modules() if isinstance(m, QATLinear)} == {cfg.hadamard_block()}


def test_a_second_prepare_qat_with_other_configs_is_an_error():
    model = prepare_qat(nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128)), weight=QuantConfig(4),
                        activation=QuantConfig(4), skip=("1",))
    before = [(type(m), getattr(m, "weight_quant", None)) for m in model]
    with pytest.raises(ValueError, match=r"layer '0' is already a QATLinear with weight W4/H128/trust.*W3/H128/trust"):
        prepare_qat(model, weight=QuantConfig(3), activation=QuantConfig(3), skip=())
    assert [(type(m), getattr(m, "weight_quant", None)) for m in model] == before  # nothing changed
    # the same configs again: converts what is left (layer 1 now); layer 0 is kept as it was
    first = model[0]
    prepare_qat(model, weight=QuantConfig(4), activation=QuantConfig(4), skip=(), matmul="int8")
    assert all(isinstance(m, QATLinear) and m.weight_quant == QuantConfig(4) for m in model)
    assert model[0] is first and first.matmul == "auto" and model[1].matmul == "int8"


def test_a_model_without_linear_layers_is_an_error_and_all_skipped_a_warning():
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        prepare_qat(nn.Sequential(nn.Conv1d(4, 4, 1), nn.ReLU()), weight=QuantConfig(4))
    with pytest.warns(UserWarning, match="every nn.Linear of the model is skipped"):
        prepare_qat(nn.Sequential(nn.Linear(128, 8)), weight=QuantConfig(4), skip=lambda name, m: True)


def test_the_skip_list_works_by_name():
    # an nn.Sequential's layers are named "0", "1", ...: none is called lm_head, so its last
    # layer is quantized unless skipped by its name (documented; not guessed)
    model = prepare_qat(nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 10)), weight=QuantConfig(4))
    assert isinstance(model[1], QATLinear)
    model = prepare_qat(nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 10)), weight=QuantConfig(4), skip=("1",))
    assert type(model[1]) is nn.Linear and isinstance(model[0], QATLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model with an lm_head converts without a warning
        from cage.llama.model import Llama, config_from_preset

        llama = prepare_qat(Llama(config_from_preset("tiny")), weight=QuantConfig(4), block_size="auto")
    assert type(llama.lm_head) is nn.Linear

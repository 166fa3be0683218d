"""The Llama model: shapes, causality, rotary embedding, parameter counts, init, QAT preparation."""

import math

import pytest
import torch

import cage
from cage.llama.model import (
    PRESETS,
    LlamaConfig,
    Llama,
    apply_rotary,
    config_from_preset,
    count_params,
    rotary_tables,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from more threads, and lose a lot when the CPU is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw):
    torch.manual_seed(0)
    return Llama(config_from_preset("tiny", max_seq_len=32, **kw))


def test_forward_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 256) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    # At init the prediction is nearly uniform over the 256 bytes.
    assert abs(loss.item() - math.log(256)) < 0.1


def assert_causal(model, cut: int, shift: int) -> None:
    """Changing the tokens from ``cut`` on leaves the logits before ``cut`` unchanged."""
    idx = torch.randint(0, 256, (2, 20))
    changed = idx.clone()
    changed[:, cut:] = (changed[:, cut:] + shift) % 256
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-6)
    assert (a[:, cut] - b[:, cut]).abs().max() > 1e-3  # and the changed positions do change


def test_causal_future_tokens_do_not_change_earlier_logits():
    assert_causal(tiny().eval(), cut=12, shift=7)


def test_causal_after_prepare_qat():
    # Activation quantization is per token, so it must not leak information across positions.
    q = cage.QuantConfig(4, block_size=64)
    assert_causal(cage.prepare_qat(tiny(), weight=q, activation=q).eval(), cut=15, shift=1)


def test_rotary_depends_only_on_relative_position():
    head_dim = 16
    cos, sin = rotary_tables(head_dim, 64)
    torch.manual_seed(1)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def rotated_at(vec, pos):
        seq = torch.zeros(1, 1, pos + 1, head_dim)
        seq[0, 0, pos] = vec
        return apply_rotary(seq, cos, sin)[0, 0, pos]

    def score(m, n):
        return torch.dot(rotated_at(q, m), rotated_at(k, n))

    for m, n, shift in [(5, 2, 10), (0, 0, 30), (7, 20, 13)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-5, atol=1e-5)
    assert (score(5, 2) - score(5, 3)).abs() > 1e-4  # different offsets give different scores
    # Rotation keeps norms, and position 0 is the identity.
    torch.testing.assert_close(rotated_at(q, 9).norm(), q.norm())
    torch.testing.assert_close(rotated_at(q, 0), q)


def test_preset_param_counts():
    # The paper's names count non-embedding parameters (SPEC 3); build on the meta device.
    expected = {"30M": 30.48e6, "50M": 49.56e6, "100M": 102.78e6, "200M": 203.19e6}
    for name, n in expected.items():
        with torch.device("meta"):
            model = Llama(config_from_preset(name))
        assert abs(count_params(model, non_embedding=True) - n) < 0.01e6, name
    cfg = config_from_preset("30M")
    assert cfg.ffn_dim == 1792 and cfg.ffn_dim % 256 == 0 and cfg.head_dim == 128
    # Exact count of the tiny preset: embedding + head + per layer (qkv, proj, gate_up, down, 2 norms) + norm.
    model = tiny()
    d, h, L = 64, model.config.ffn_dim, 3
    assert h == 192
    assert count_params(model) == 2 * 256 * d + L * (3 * d * d + d * d + 2 * d * h + h * d + 2 * d) + d
    assert 0.1e6 < count_params(model) < 0.3e6


def test_cpu_presets_fit_the_hadamard_block():
    for name in ("cpu", "cpu-small"):
        cfg = config_from_preset(name)
        assert cfg.dim % 128 == 0 and cfg.ffn_dim % 128 == 0, name


def test_init_scales_and_no_biases():
    model = tiny()
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.lm_head.weight is not model.tok_embeddings.weight  # untied
    qkv = model.layers[0].attn.qkv.weight
    proj = model.layers[0].attn.proj.weight
    assert abs(qkv.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 3)) < 0.002
    assert torch.all(model.norm.weight == 1)


def test_prepare_qat_skips_head_and_quantizes_blocks():
    model = cage.prepare_qat(tiny(), weight=cage.QuantConfig(4, block_size=64))
    assert type(model.lm_head) is torch.nn.Linear
    qat = [n for n, m in model.named_modules() if isinstance(m, cage.QATLinear)]
    assert len(qat) == 4 * 3  # qkv, proj, gate_up, down in each of 3 layers


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        LlamaConfig(dim=64, n_heads=5)
    with pytest.raises(ValueError, match="unknown model preset"):
        config_from_preset("3B")
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_presets_listed():
    assert {"tiny", "cpu", "cpu-small", "30M", "50M", "100M", "200M", "430M", "800M"} <= set(PRESETS)

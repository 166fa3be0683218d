"""The job's adapter around a Hugging Face LlamaForCausalLM (cage.llama.hf_model): the HF class
runs as it is (GQA, Llama-3 RoPE scaling, a separate head_dim, tied embeddings), and the loss is
taken against the job's already-shifted targets."""

import pytest
import torch
import torch.nn.functional as F
import transformers  # the hf extra, installed in CI: a missing one fails here

from cage import QATLinear, QuantConfig, prepare_qat
from cage.llama.hf_model import HF_SKIP, hf_block_size, hf_model_from_config, load_hf_model


def tiny_config(**overrides):
    options = dict(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    options.update(overrides)
    return transformers.LlamaConfig(**options)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


def test_the_adapter_gives_hfs_logits_and_the_loss_of_the_shifted_targets(saved):
    folder, reference = saved
    model = load_hf_model(folder)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    logits, loss = model(x, y)
    expected = reference(input_ids=x).logits
    assert torch.allclose(logits, expected)
    torch.testing.assert_close(loss, F.cross_entropy(expected.flatten(0, 1), y.flatten()))
    assert len(model.layers) == 2 and model.vocab_size == 300


def test_prepared_for_qat_the_projections_are_quantized_and_the_head_and_embedding_are_not(saved):
    model = load_hf_model(saved[0])
    block = hf_block_size(model.config)
    q = QuantConfig(4, block_size=block)
    prepare_qat(model, weight=q, activation=q, skip=HF_SKIP)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QATLinear)]
    assert len(quantized) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in quantized)
    _, loss = model(torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8)))
    loss.backward()
    assert model.hf.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_a_config_file_starts_a_model_from_scratch_and_checkpointing_runs(tmp_path):
    tiny_config().to_json_file(tmp_path / "config.json")
    a = hf_model_from_config(tmp_path / "config.json", seed=1, gradient_checkpointing=True)
    b = hf_model_from_config(tmp_path / "config.json", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # seeded
    a.train()
    x = torch.randint(0, 300, (2, 8))
    _, loss = a(x, x)
    loss.backward()
    assert a.hf.is_gradient_checkpointing


def test_not_a_llama_or_no_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load_hf_model(tmp_path)
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="not a Llama"):
        hf_model_from_config(tmp_path / "config.json", seed=0)

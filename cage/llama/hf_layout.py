"""The job's Llama in the Hugging Face layout: a standard ``transformers.LlamaForCausalLM``.

The job fuses the query/key/value projections into one ``qkv`` layer and the SwiGLU gate and up
projections into ``gate_up`` (:mod:`cage.llama.model`); Hugging Face keeps them apart. The weight
quantizer works per output row and the parts of a fused layer read the same input, so splitting the
rows changes nothing: each part keeps its rows' codes and scales (a ``QuantizedLinear``), its rows of
the latent weight (a ``QATLinear``) or its rows of the weight (an ``nn.Linear``), and its activation
quantizer sees the same input rows. The job's rotary embedding already rotates the two halves of a
head (``rotate_half``, as transformers' Llama), so no permutation of q/k rows is needed.

What still differs is rounding: transformers computes the rotary tables in fp32 (the job in fp64,
then rounds), and its attention may take another kernel path. ``tests/test_hf_export.py`` states the
bound; under activation quantization such a difference may move a value across a rounding boundary
of the activation grid ("a flipped code"), which the test counts and bounds too.

The tokenizer is the job's byte tokenizer (ids 0..255 are the UTF-8 bytes, no special tokens),
written as a byte-level BPE ``tokenizer.json`` without merges, so ``AutoTokenizer`` gives the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..convert import QuantizedLinear
from ..linear import QATLinear
from .model import Llama, LlamaConfig

# the job's module name -> Hugging Face's, per decoder layer; fused layers map to their parts
LAYER_RENAMES = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.proj": "self_attn.o_proj",
    "mlp.down": "mlp.down_proj",
}
FUSED = {
    "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
}
TOP_RENAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}


def hf_config(cfg: LlamaConfig):
    """The ``transformers.LlamaConfig`` of the same model (untied head, no biases, SiLU, rotate-half RoPE,
    as many key/value heads as query heads). The byte vocabulary has no special tokens."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def split_rows(layer: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """``layer`` cut into layers of ``sizes`` consecutive output rows (new tensors), each of the same
    kind: a QuantizedLinear keeps its rows' packed codes and scales, a QATLinear its rows of the latent
    weight, an nn.Linear its rows of the weight; configs, backend and matmul are kept."""
    if sum(sizes) != layer.out_features:
        raise ValueError(f"split_rows: parts {sizes} do not add up to the layer's {layer.out_features} rows")
    parts, start = [], 0
    with torch.no_grad():
        for n in sizes:
            rows = slice(start, start + n)
            has_bias = layer.bias is not None
            if isinstance(layer, QuantizedLinear):
                part = QuantizedLinear(layer.in_features, n, has_bias, weight_quant=layer.weight_quant,
                                       act_quant=layer.act_quant, weight_dtype=layer.weight_dtype,
                                       backend=layer.backend, matmul=layer.matmul, device=layer.packed_weight.device)
                part.packed_weight.copy_(layer.packed_weight[rows])
                part.weight_scale.copy_(layer.weight_scale[rows])
            elif isinstance(layer, QATLinear):
                part = QATLinear(layer.in_features, n, has_bias, weight_quant=layer.weight_quant,
                                 act_quant=layer.act_quant, backend=layer.backend, matmul=layer.matmul,
                                 device=layer.weight.device, dtype=layer.weight.dtype)
                part.weight.copy_(layer.weight[rows])
            elif type(layer) is nn.Linear:
                part = nn.Linear(layer.in_features, n, has_bias, device=layer.weight.device, dtype=layer.weight.dtype)
                part.weight.copy_(layer.weight[rows])
            else:
                raise TypeError(f"split_rows: a {type(layer).__name__} is not a linear layer this export knows")
            if has_bias:
                part.bias.copy_(layer.bias[rows])
            part.train(layer.training)
            parts.append(part)
            start += n
    return parts


def _rename(name: str) -> str:
    """The Hugging Face name of a non-fused module of the job's Llama."""
    head, _, rest = name.partition(".")
    if head == "layers":
        index, _, sub = rest.partition(".")
        return f"model.layers.{index}.{LAYER_RENAMES.get(sub, sub)}"
    return TOP_RENAMES.get(head, head) + (f".{rest}" if rest else "")


@torch.no_grad()
def to_hf(model: Llama):
    """A ``transformers.LlamaForCausalLM`` with ``model``'s function and layers of the same kinds
    (plain, QATLinear or QuantizedLinear), q/k/v and gate/up split by rows; new tensors, in eval mode
    when ``model`` is. ``model`` is not changed."""
    import transformers

    if not isinstance(model, Llama):
        raise TypeError(f"to_hf: expected the job's Llama (cage.llama.model.Llama), got {type(model).__name__}")
    cfg = model.config
    config = hf_config(cfg)
    with torch.device("meta"):  # nothing allocated: every tensor is replaced below
        hf = transformers.LlamaForCausalLM(config)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)  # its non-persistent tables, on the CPU
    for i, block in enumerate(model.layers):
        for fused, names in FUSED.items():
            layer = block.get_submodule(fused)
            for name, part in zip(names, split_rows(layer, [layer.out_features // len(names)] * len(names))):
                hf.get_submodule(f"model.layers.{i}").set_submodule(name, part)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantizedLinear)) and not any(name.endswith("." + f) for f in FUSED):
            hf.set_submodule(_rename(name), split_rows(module, [module.out_features])[0])
    job_linear = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    others = {}
    for key, tensor in model.state_dict().items():
        module, _, param = key.rpartition(".")
        if module not in job_linear:  # embeddings and norms
            others[f"{_rename(module)}.{param}"] = tensor.detach().clone()
    hf.load_state_dict(others, strict=False, assign=True)
    left = [k for k, t in {**dict(hf.named_parameters()), **dict(hf.named_buffers())}.items() if t.is_meta]
    if left:
        raise RuntimeError(f"to_hf: tensors of the Hugging Face model were not filled: {left[:5]}")
    hf.train(model.training)
    return hf


# ---- the byte tokenizer as a tokenizer.json -----------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable character for each byte (the byte-level pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_byte_tokenizer(directory, model_max_length: int) -> None:
    """``tokenizer.json`` (byte-level BPE without merges: token id = byte value) and
    ``tokenizer_config.json`` for the job's byte tokenizer, so that ``AutoTokenizer`` encodes text
    to its UTF-8 bytes and decodes them back. No special tokens (the job has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory = Path(directory)
    vocab = {char: b for b, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
    }, indent=2) + "\n")


def save_hf(hf, directory) -> dict:
    """Write a model from :func:`to_hf` to ``directory``: ``save_pretrained`` (with the ``"cage"``
    quantization_config when it has QATLinear or QuantizedLinear layers) and the byte tokenizer.
    Returns ``{"quantized_layers": n, "kind": "plain" | "qat" | "quantized"}``."""
    kinds = {"qat" if isinstance(m, QATLinear) else "quantized" for m in hf.modules()
             if isinstance(m, (QATLinear, QuantizedLinear))}
    n = sum(isinstance(m, (QATLinear, QuantizedLinear)) for m in hf.modules())
    if kinds:
        from .. import hf as cage_hf

        cage_hf.save_pretrained(hf, str(directory))
    else:
        hf.save_pretrained(str(directory))
    write_byte_tokenizer(directory, hf.config.max_position_embeddings)
    return {"quantized_layers": n, "kind": "/".join(sorted(kinds)) or "plain"}

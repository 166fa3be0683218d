"""Sample text from a converted model file (written by ``python -m cage export``).

The model reads and writes bytes (cage.llama.data's tokenizer); the continuation is printed after
the prompt. Temperature 0 picks the most likely byte at every step.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ..serialize import check_quantized, load_quantized, read_tensor_shapes
from .data import decode, encode
from .export import LLAMA_CONFIG_KEY
from .model import Llama, LlamaConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FILE", help="a file written by `cage export`")
    p.add_argument("--prompt", required=True, help="text to continue (at least one byte)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="bytes to sample (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="> 0 samples, 0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")


_INT_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len")


def _llama_config(fields, path, n_tensors: int) -> LlamaConfig:
    """The header's model shape as a LlamaConfig: known fields of the right types, and no more
    layers than the file has tensors (a skeleton of n_layers blocks is built to check the rest)."""
    if not isinstance(fields, dict):
        raise ValueError(f"--model: {path}: {LLAMA_CONFIG_KEY!r} is not a dict of LlamaConfig fields")
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    for name, value in fields.items():
        if name not in known:
            raise ValueError(f"--model: {path}: {LLAMA_CONFIG_KEY!r} has an unknown field {name!r}")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if (name in _INT_FIELDS or (name == "hidden_dim" and value is not None)) and not is_int:
            raise ValueError(f"--model: {path}: {LLAMA_CONFIG_KEY}: {name} must be an integer, got {value!r}")
        if name in ("norm_eps", "rope_theta") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"--model: {path}: {LLAMA_CONFIG_KEY}: {name} must be a number, got {value!r}")
    n_layers = fields.get("n_layers", 1)
    if n_layers > n_tensors:
        raise ValueError(f"--model: {path}: {LLAMA_CONFIG_KEY} says n_layers {n_layers}, but the file holds "
                         f"{n_tensors} tensors (every layer has several)")
    try:
        return LlamaConfig(**fields)
    except ValueError as err:
        raise ValueError(f"--model: {path}: {LLAMA_CONFIG_KEY}: {err}") from None


def load_model(path) -> Llama:
    """The converted Llama stored in ``path``, in eval mode. The header's model shape is checked
    against the stored tensors on a meta-device skeleton before the model is built."""
    header, stored = read_tensor_shapes(path)
    extra = header.get("extra", {})
    if LLAMA_CONFIG_KEY not in extra:
        raise ValueError(f"--model: {path} has no model shape ({LLAMA_CONFIG_KEY!r}); write it with `cage export`")
    cfg = _llama_config(extra[LLAMA_CONFIG_KEY], path, len(stored))
    with torch.device("meta"):
        skeleton = Llama(cfg)
    check_quantized(path, skeleton, contents=(header, stored))
    return load_quantized(path, Llama(cfg)).eval()


@torch.no_grad()
def sample(model: Llama, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
           generator: torch.Generator) -> list[int]:
    """``ids`` continued by ``max_new_tokens`` sampled tokens (the context is cut to max_seq_len)."""
    check_sampling(max_new_tokens, temperature, top_k)
    out = list(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-model.config.max_seq_len:]])
        logits = model(context)[0][0, -1].float()
        if temperature == 0:
            out.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k is not None and top_k < logits.numel():
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return out


def run(args: argparse.Namespace) -> int:
    check_sampling(args.max_new_tokens, args.temperature, args.top_k)
    ids = encode(args.prompt)
    if not ids:
        raise ValueError("--prompt must not be empty")
    model = load_model(args.model)
    generator = torch.Generator().manual_seed(args.seed)
    print(decode(sample(model, ids, args.max_new_tokens, args.temperature, args.top_k, generator)))
    return 0

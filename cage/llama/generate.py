"""Sample text from a converted model file (written by ``python -m cage export``).

The model reads and writes bytes (cage.llama.data's tokenizer); the continuation is printed after
the prompt. Temperature 0 picks the most likely byte at every step.
"""

from __future__ import annotations

import argparse

import torch

from ..serialize import load_quantized, read_header
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


def load_model(path) -> Llama:
    """The converted Llama stored in ``path``, in eval mode."""
    extra = read_header(path).get("extra", {})
    if LLAMA_CONFIG_KEY not in extra:
        raise ValueError(f"--model: {path} has no model shape ({LLAMA_CONFIG_KEY!r}); write it with `cage export`")
    model = Llama(LlamaConfig(**extra[LLAMA_CONFIG_KEY]))
    return load_quantized(path, model).eval()


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

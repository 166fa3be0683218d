"""Parameter shapes of Llama-style models, as a function of a preset name.

The optimizer benchmark only needs the list of tensors (name, shape, optimizer group); it does
not build a model. Shapes follow the usual Llama layout with separate projections: per layer
q, k, v, o, gate, up, down matrices and two RMSNorm vectors; then the final norm, the token
embedding and the (untied) output head. Only the attention and MLP matrices are quantized
(SPEC 2: not embeddings, the output head or norms).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class LlamaShapes:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    note: str = ""

    @property
    def kv_dim(self) -> int:
        return self.dim // self.n_heads * self.n_kv_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """``(name, shape, group)`` with group ``quant`` (quantized matrices), ``decay`` (the other
        matrices: embedding and head) or ``no_decay`` (norm vectors)."""
        out = []
        d, f, kv = self.dim, self.ffn_dim, self.kv_dim
        for i in range(self.n_layers):
            p = f"layers.{i}."
            out += [
                (p + "attn_norm", (d,), "no_decay"),
                (p + "q", (d, d), "quant"),
                (p + "k", (kv, d), "quant"),
                (p + "v", (kv, d), "quant"),
                (p + "o", (d, d), "quant"),
                (p + "mlp_norm", (d,), "no_decay"),
                (p + "gate", (f, d), "quant"),
                (p + "up", (f, d), "quant"),
                (p + "down", (d, f), "quant"),
            ]
        out += [
            ("norm", (d,), "no_decay"),
            ("tok_embeddings", (self.vocab_size, d), "decay"),
            ("lm_head", (self.vocab_size, d), "decay"),
        ]
        return out

    def numel(self, group: str | None = None) -> int:
        return sum(math.prod(s) for _, s, g in self.tensors() if group is None or g == group)

    def quant_block_size(self, largest: int = 128) -> int:
        """Largest power of two <= ``largest`` dividing every quantized row length (dim, ffn_dim)."""
        b = largest
        while b > 1 and (self.dim % b or self.ffn_dim % b):
            b //= 2
        return b


def _from_cage_preset(name: str, vocab_size: int = 32000) -> LlamaShapes:
    from cage.llama.model import config_from_preset

    cfg = config_from_preset(name)
    return LlamaShapes(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_heads, cfg.ffn_dim, vocab_size,
                       note=f"cage.llama.model preset {name} (SPEC 3 size), vocab {vocab_size}")


# "1B" is TinyLlama-1.1B's published shape (Llama 2 architecture, grouped-query attention with
# 4 key/value heads, vocab 32000): a real ~1B Llama.
PRESETS: dict[str, LlamaShapes] = {
    "tiny": LlamaShapes(64, 1, 4, 2, 128, 256, note="CPU/interpreter smoke size"),
    "small": LlamaShapes(256, 4, 4, 4, 768, 2048, note="CPU benchmark size (~4.3M)"),
    "1B": LlamaShapes(2048, 22, 32, 4, 5632, 32000, note="TinyLlama-1.1B shapes"),
}
for _name in ("100M", "200M", "430M", "800M"):
    PRESETS[_name] = None  # filled lazily from cage.llama.model (imports stay cheap)


def shapes_for(preset: str) -> LlamaShapes:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if PRESETS[preset] is None:
        PRESETS[preset] = _from_cage_preset(preset)
    return PRESETS[preset]

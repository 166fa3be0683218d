"""A compact Llama-style decoder (SPEC 3): RMSNorm, rotary embedding, SwiGLU, untied head.

The model only uses plain ``nn.Linear`` layers, so ``cage.prepare_qat`` can swap them for
quantized ones; the output head is called ``lm_head`` so that the default ``skip`` keeps it in
high precision, and the token embedding is an ``nn.Embedding`` (never quantized).

The query/key/value projections are one ``nn.Linear`` (``qkv``) and the SwiGLU gate and up
projections are another (``gate_up``). That is the same function as separate layers (the weight
quantizer works per output row, and all of them read the same input), but it quantizes each
activation once instead of three or two times, which matters a lot on CPU.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# The longest sequence a LlamaConfig may declare: the rotary tables are allocated up front
# (2 x max_seq_len x head_dim/2 fp32 values: 32 MiB at head_dim 128), and no stored tensor bounds
# them, so a size read from a file cannot be checked otherwise.
MAX_SEQ_LEN = 65536


@dataclasses.dataclass
class LlamaConfig:
    """Shape of the model. ``hidden_dim=None`` means 8/3 of ``dim`` rounded up to ``multiple_of``."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int | None = None
    multiple_of: int = 256
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"the head dimension dim/n_heads = {self.dim // self.n_heads} must be even "
                "for the rotary embedding"
            )
        if self.max_seq_len > MAX_SEQ_LEN:
            raise ValueError(f"max_seq_len must be at most {MAX_SEQ_LEN}, got {self.max_seq_len} (the rotary tables are allocated up front)")

    @property
    def ffn_dim(self) -> int:
        """Width of the SwiGLU hidden layer."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = math.ceil(8 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# The paper's sizes (SPEC 3; the name counts the non-embedding parameters) and small CPU presets.
# Peak learning rates for the paper's sizes are in PRESET_LR.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=3, n_heads=4, multiple_of=64),  # ~0.2M: unit tests
    "cpu-small": dict(dim=128, n_layers=2, n_heads=4, multiple_of=128),  # ~0.5M
    "cpu": dict(dim=128, n_layers=4, n_heads=4, multiple_of=128),  # ~0.9M: the default job
    "30M": dict(dim=640, n_layers=6, n_heads=5),
    "50M": dict(dim=768, n_layers=7, n_heads=6),
    "100M": dict(dim=1024, n_layers=8, n_heads=8),
    "200M": dict(dim=1280, n_layers=10, n_heads=10),
    "430M": dict(dim=1664, n_layers=13, n_heads=13),
    "800M": dict(dim=2048, n_layers=16, n_heads=16),
}

PRESET_LR: dict[str, float] = {
    "30M": 1.2e-3,
    "50M": 1.2e-3,
    "100M": 6e-4,
    "200M": 3e-4,
    "430M": 1.5e-4,
    "800M": 7.5e-5,
}


def config_from_preset(name: str, **overrides) -> LlamaConfig:
    """A LlamaConfig for a preset name, with fields overridden (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaConfig(**fields)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 autocast would otherwise lose precision in the mean square).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0):
    """cos and sin tables, each [max_seq_len, head_dim/2], for the rotary embedding."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) of ``x`` [B, H, T, d] by the position angles.

    Rotating query and key at positions m and n by m*w and n*w makes their dot product depend
    only on m - n (the relative position), which is the point of the rotary embedding.
    """
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.hidden = cfg.ffn_dim
        self.gate_up = nn.Linear(cfg.dim, 2 * self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# Output projections of each residual branch; their init is scaled down by sqrt(2 * n_layers)
# (GPT-2 / nanoGPT) so the residual stream's variance does not grow with depth.
RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.down.weight")


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so they stay out of checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(RESIDUAL_PROJECTIONS):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: [B, T] token ids. Returns (logits [B, T, vocab], mean cross-entropy or None)."""
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Number of parameters; ``non_embedding=True`` leaves out the token embedding and the output
    head, which is how the paper's size names (30M, 50M, ...) count."""
    total = 0
    for name, p in model.named_parameters():
        if non_embedding and (name.startswith("tok_embeddings.") or name.startswith("lm_head.")):
            continue
        total += p.numel()
    return total

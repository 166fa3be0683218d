"""What a run is made of: its learning-rate schedule, its quantizers and its prepared model."""

from __future__ import annotations

import math

import torch

from ...config import QuantConfig
from ...linear import prepare_qat
from ..model import Llama
from .config import FULL_PRECISION_BITS, TrainConfig


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.1, final_frac: float = 0.1) -> float:
    """Learning rate of the optimizer step with 0-based index ``step`` of ``total``: linear
    warm-up over ``warmup_frac`` of the steps (reaching ``peak`` at its last step), then a cosine
    from ``peak`` down to ``final_frac * peak`` at the last step."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    final = final_frac * peak
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def quant_configs(cfg: TrainConfig, block_size: int) -> tuple[QuantConfig | None, QuantConfig | None]:
    """(weight, activation) quantizers of the run's method, on its grid."""
    if cfg.method == "bf16":
        return None, None

    def make(bits):
        if bits == FULL_PRECISION_BITS:
            return None
        if cfg.method == "ste":
            return QuantConfig(bits, hadamard=False, grad_mask="none", grid=cfg.grid)
        return QuantConfig(bits, hadamard=True, block_size=block_size, grad_mask="trust", grid=cfg.grid)

    return make(cfg.weight_bits), make(cfg.act_bits)


def build_hf_model(cfg: TrainConfig, pretrained: bool = True):
    """The run's HF Llama (``cage.llama.hf_model.HFCausalLM``), not yet prepared: an --hf-model
    folder's pretrained weights (``pretrained=False``: its architecture only, for a checkpoint's
    weights to be loaded into), or an --hf-config's from ``cfg.seed``. The architecture is the
    run's saved config.json (``cfg.hf_config_dict``) when it has one, else the file's."""
    from ..hf_model import hf_model_from_config, load_hf_model
    from .sources import hf_config_file

    if cfg.hf_model is not None and pretrained:
        return load_hf_model(cfg.hf_model, gradient_checkpointing=cfg.gradient_checkpointing)
    source = cfg.hf_config_dict if cfg.hf_config_dict is not None else hf_config_file(cfg)
    return hf_model_from_config(source, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing)


def prepare_model(cfg: TrainConfig, model, device: torch.device):
    """``model`` prepared for the run's method (in place; an HF model keeps lm_head and the
    embedding in full precision) and moved to ``device``; and the quantizers."""
    wq, aq = quant_configs(cfg, cfg.hadamard_block())
    if wq is not None or aq is not None:
        if cfg.is_hf:
            from ..hf_model import HF_SKIP

            prepare_qat(model, weight=wq, activation=aq, skip=HF_SKIP, backend=cfg.backend, matmul=cfg.matmul)
        else:
            prepare_qat(model, weight=wq, activation=aq, backend=cfg.backend, matmul=cfg.matmul)
    return model.to(device), wq, aq


def build_model(cfg: TrainConfig, device: torch.device, pretrained: bool = True):
    """The model of the run (initialised from ``cfg.seed``, or an --hf-model's pretrained weights
    unless ``pretrained=False``), prepared for QAT; and its quantizers."""
    if cfg.is_hf:
        return prepare_model(cfg, build_hf_model(cfg, pretrained), device)
    mcfg = cfg.model_config()
    wq, aq = quant_configs(cfg, cfg.hadamard_block())
    torch.manual_seed(cfg.seed)
    model = Llama(mcfg)
    if wq is not None or aq is not None:
        prepare_qat(model, weight=wq, activation=aq, backend=cfg.backend, matmul=cfg.matmul)
    return model.to(device), wq, aq

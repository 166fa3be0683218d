"""Bytes a transformer block saves for its backward per quantized-linear input element.

    python -m benchmarks.bench_saved_memory              # one block of the 30M and 800M shapes
    python -m benchmarks.bench_saved_memory --no-write

What is counted: every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` while a
``QATLinear`` (or, for bf16, the ``nn.Linear`` it replaces) runs its forward, under bf16 autocast,
with the Triton backend's launchers as a GPU run plans them (their kernels stubbed out: sizes,
not values, are measured; the triton backend stores the mask bit-packed). Each block runs at two
sequence lengths, and the difference of the bytes over the difference of the linear layers'
input elements is the per-element figure: the weights' share (their codes or q, the same at any
length) drops out.

Rows: ``bf16`` (no quantizer: F.linear saves its bf16 input), ``quest`` (today's dequantized
product: F.linear saves q(x) and the quantizer its mask) and ``quest-int8`` (``matmul="int8"``:
the int8 codes, one fp32 d/2 per row and the packed mask). Goal (issue 20): <= 1.2 B per element.
"""

from __future__ import annotations

import sys

import torch

from . import common
from .bench_host import stubbed_launches

GOAL_BYTES = 1.2
SEQ_LENS = (48, 96)


def _block(preset: str, method: str):
    from cage import QuantConfig, prepare_qat
    from cage.llama.model import Block, config_from_preset, rotary_tables

    cfg = config_from_preset(preset)
    torch.manual_seed(0)
    block = Block(cfg)
    if method != "bf16":
        q = QuantConfig(4)
        prepare_qat(block, weight=q, activation=q, backend="triton", matmul="int8" if method == "quest-int8" else "dequant")
    cos, sin = rotary_tables(cfg.head_dim, max(SEQ_LENS))
    return cfg, block, cos, sin


def saved_bytes_per_input_element(preset: str, method: str) -> dict:
    cfg, block, cos, sin = _block(preset, method)
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    counts = {}
    for seq in SEQ_LENS:
        saved, inputs = [], []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        contexts = []

        def enter(module, args):
            inputs.append(args[0].numel())
            contexts.append(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            contexts[-1].__enter__()

        def leave(module, args, output):
            contexts.pop().__exit__(None, None, None)

        handles = [h for m in linears for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
        x = torch.randn(1, seq, cfg.dim, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            block(x, cos[:seq], sin[:seq])
        for h in handles:
            h.remove()
        counts[seq] = (sum(saved), sum(inputs))
    (b1, e1), (b2, e2) = counts[SEQ_LENS[0]], counts[SEQ_LENS[1]]
    return {"preset": preset, "method": method, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
            "linears": len(linears), "bytes_per_element": (b2 - b1) / (e2 - e1),
            f"saved_bytes_seq{SEQ_LENS[1]}": b2, f"input_elements_seq{SEQ_LENS[1]}": e2}


COLUMNS = [("preset", "block of"), ("method", "method"), ("dim", "dim"), ("ffn_dim", "ffn"),
           ("bytes_per_element", "B saved per input element"), (f"saved_bytes_seq{SEQ_LENS[1]}", f"B saved at T={SEQ_LENS[1]}"),
           ("status", "goal <= 1.2")]


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], "30M", {"30M": None, "800M": None})
    p.add_argument("--presets", default="30M,800M", help="comma list of model presets (one block each)")
    args = p.parse_args(argv)
    env = common.environment(torch.device("cpu"))
    rows = []
    with stubbed_launches():
        for preset in common.comma_choices(p, args.presets, ("tiny", "cpu", "30M", "50M", "100M", "200M", "430M", "800M"), "preset"):
            for method in ("bf16", "quest", "quest-int8"):
                row = saved_bytes_per_input_element(preset, method)
                if method == "quest-int8":
                    row["status"] = "met" if row["bytes_per_element"] <= GOAL_BYTES else "MISSED"
                rows.append(row)
                print(f"  {preset} {method}: {row['bytes_per_element']:.3f} B/element", file=sys.stderr)
    sections = [{
        "title": "Saved for backward per quantized-linear input element (bf16 autocast, triton backend's layout)",
        "text": (f"Difference between sequence lengths {SEQ_LENS[0]} and {SEQ_LENS[1]} (batch 1), so the weights' "
                 "share drops out; W4A4, Hadamard 128; kernel launches stubbed (sizes, not values)."),
        "rows": rows, "columns": COLUMNS,
    }]
    return common.finish("saved-memory", env, sections, args, rows, {"seq_lens": SEQ_LENS})


if __name__ == "__main__":
    main()

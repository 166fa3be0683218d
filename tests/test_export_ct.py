"""compressed-tensors export (issue 17 items 3 and 5): each scheme's folder, loaded by a third party
(transformers' compressed-tensors loader and compressed-tensors' own decompression into a plain
LlamaForCausalLM, then compressed-tensors' `input` transforms only, as vLLM runs them; nothing of
ours in that path), gives the logits of our converted model run with activation quantization off.

Bounds:
- w8a16, w4a16: the weights are exact (integer codes times an fp32 scale), so only the order of the
  fp32 sums differs (x H against W = q(W_h) H, attention, rotary tables): max |logit difference|
  <= 1e-5 * max(1, max |logit|); measured <= 4.3e-7 at logits of 1.1 (tiny models).
- w8a8: the served model also rounds each Linear's rotated input per token to int8. Each element
  moves by at most half a step, amax_t / 254 (compressed-tensors' step is amax / 127.5, vLLM's
  amax / 127). To first order a logit z moves by at most B = sum over layers, tokens and elements
  of |dz / dx_h| * amax_t / 254 (the worst case, every rounding aligned); the second-order terms are
  of relative size 1/254. Checked for the 16 logits that moved most; measured |dz| / B <= 0.12.
"""

import json

import pytest
import torch

compressed_tensors = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from compressed_tensors.transform import TransformConfig, apply_transform_config  # noqa: E402
from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix  # noqa: E402

import cage  # noqa: E402
from cage.export_ct import export_compressed_tensors  # noqa: E402
from cage.llama import cli  # noqa: E402
from cage.llama.export import load_run_model  # noqa: E402
from cage.llama.hf_layout import to_hf  # noqa: E402
from cage.llama.job import TrainConfig, train  # noqa: E402

ROUNDING = 1e-5
IDX = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
RUN = dict(steps=2, preset="tiny", batch_size=4, seq_len=32, eval_batches=1, threads=1, verbose=False)
CASES = [("w8a16", "centered"), ("w8a8", "centered"), ("w4a16", "integer")]


def hf_model(grid="centered", bits=4, block=32, bias=False, skip=None, seed=0):
    """A converted 2-layer LlamaForCausalLM (GQA: 4 heads, 2 kv heads), random weights."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attention_bias=bias)
    model = transformers.LlamaForCausalLM(config).eval()
    q = dict(bits=bits, block_size=block, grid=grid)
    cage.prepare_qat(model, weight=cage.QuantConfig(**q), activation=cage.QuantConfig(**q),
                     **({} if skip is None else {"skip": skip}))
    return cage.convert(model)


def without_activation_quantization(model):
    for m in model.modules():
        if isinstance(m, cage.QuantizedLinear):
            m.act_quant = None
    return model


def served(folder, locations=("input",)):
    """The folder as a third party runs it: transformers' compressed-tensors loader, compressed-tensors'
    decompression, then the checkpoint's transforms at ``locations`` (vLLM: the online ``input`` ones;
    ``weight_input`` is already folded into the stored weights)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.hf_quantizer.compressor.decompress_model(model)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]["transform_config"]
    for group in config["config_groups"].values():
        group["apply"] = [a for a in group["apply"] if a["location"] in locations]
    if locations:
        apply_transform_config(model, TransformConfig.model_validate(config))
    return model


def logits(model, idx=IDX):
    with torch.no_grad():
        return model(idx).logits


def rotate(x, block):
    h = deterministic_hadamard_matrix(block, torch.float32) / block ** 0.5
    return (x.unflatten(-1, (-1, block)) @ h).flatten(-2)


def int8_activation_bound(reference, flat_index):
    """B above for each logit in ``flat_index`` (into reference(IDX).logits.flatten())."""
    layers = [(n, m) for n, m in reference.named_modules() if isinstance(m, cage.QuantizedLinear)]
    inputs, perturb, hooks = {}, {}, []
    for name, layer in layers:
        def hook(module, args, name=name):
            perturb[name] = torch.zeros_like(args[0], requires_grad=True)
            inputs[name] = args[0].detach()
            return (args[0] + perturb[name],)
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        z = reference(IDX).logits.flatten()
    finally:
        for h in hooks:
            h.remove()
    blocks = {n: m.weight_quant.block_size for n, m in layers}
    half_step = {n: rotate(inputs[n], blocks[n]).abs().amax(-1, keepdim=True) / 254 for n, _ in layers}
    bounds = []
    for k in flat_index.tolist():
        grads = torch.autograd.grad(z[k], [perturb[n] for n, _ in layers], retain_graph=True)
        bounds.append(sum(float((rotate(g, blocks[n]).abs() * half_step[n]).sum()) for (n, _), g in zip(layers, grads)))
    return torch.tensor(bounds)


def check_parity(reference, folder, scheme):
    ref, got = logits(reference), logits(served(folder))
    diff = (got - ref).abs()
    scale = max(1.0, float(ref.abs().max()))
    if scheme == "w8a8":
        assert float(diff.max()) > ROUNDING * scale  # the int8 activation rounding is there
        worst = diff.flatten().topk(16).indices
        bound = int8_activation_bound(reference, worst)
        assert bool((diff.flatten()[worst] <= bound).all()), (diff.flatten()[worst], bound)
    else:
        assert float(diff.max()) <= ROUNDING * scale, float(diff.max())


def check_folder(folder, scheme, block):
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    assert config["format"] == ("int-quantized" if scheme == "w8a8" else "pack-quantized")
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"]) == (int(scheme[1]), "channel", True)
    activations = config["config_groups"]["group_0"]["input_activations"]
    assert (activations is not None) == (scheme == "w8a8")
    (group,) = config["transform_config"]["config_groups"].values()
    assert group["type"] == "hadamard" and group["head_dim"] == block and not group["randomize"]
    assert sorted((a["location"], a["inverse"]) for a in group["apply"]) == [("input", False), ("weight_input", True)]
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    stored = [v for k, v in tensors.items() if k.endswith("_input.weight")]
    # what vLLM loads as the transform (its fallback divides it by sqrt(B)); hadacore uses Sylvester order too
    assert stored and all(torch.equal(t, deterministic_hadamard_matrix(block, torch.float32)) for t in stored)


@pytest.mark.parametrize("scheme, grid", CASES)
def test_an_hf_model_export_matches_compressed_tensors(scheme, grid, tmp_path):
    model = hf_model(grid)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_compressed_tensors(model, tmp_path / "ct", scheme)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not changed
    assert report["quantized_layers"] == 14 and report["transform_blocks"] == [32]
    check_folder(tmp_path / "ct", scheme, 32)
    check_parity(without_activation_quantization(model), tmp_path / "ct", scheme)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for key, extra in (("centered", {}), ("integer", {"grid": "integer"}), ("bf16", {})):
        folder = tmp_path_factory.mktemp(key)
        method = "bf16" if key == "bf16" else "quest"
        train(TrainConfig(method=method, out=str(folder), **({} if key == "bf16" else {"bits": 4}), **extra, **RUN))
        out[key] = folder
    return out


@pytest.mark.parametrize("scheme, grid", CASES)
def test_a_run_exported_from_the_cli_matches_compressed_tensors(scheme, grid, runs, tmp_path):
    out = tmp_path / "ct"
    assert cli.main(["export", "--run", str(runs[grid]), "--format", "compressed-tensors", "--scheme", scheme,
                     "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "cage_export.json"} <= {f.name for f in out.iterdir()}
    qat, _ = load_run_model(runs[grid])
    check_folder(out, scheme, 64)
    check_parity(without_activation_quantization(to_hf(cage.convert(qat)).eval()), out, scheme)


def test_plain_loading_without_the_input_transforms_is_wrong(tmp_path):
    """What plain transformers gives (it ignores transform_config; checked with 5.24), and the trap of
    applying the whole transform config after loading (weight_input rotates the weights a second time)."""
    model = hf_model("centered")
    export_compressed_tensors(model, tmp_path / "ct", "w8a16")
    ref = logits(without_activation_quantization(model))
    scale = float(ref.abs().max())
    for locations in ((), ("input", "weight_input")):
        assert float((logits(served(tmp_path / "ct", locations)) - ref).abs().max()) > 0.1 * scale, locations


def test_a_bf16_scale_keeps_the_codes(tmp_path):
    """A bf16 scale (relative rounding <= 2**-9 per row) keeps every code, |C| * 2**-9 < 1/2, and moves
    each output row by its scale's rounding only: no longer fp32-exact, but close."""
    model = hf_model("centered")
    export_compressed_tensors(model, tmp_path / "ct", "w8a8", scale_dtype=torch.bfloat16)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["scale_dtype"] == "torch.bfloat16"
    ref = logits(without_activation_quantization(model))
    assert float((logits(served(tmp_path / "ct")) - ref).abs().max()) < 0.05 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("kwargs, scheme, message", [
    (dict(grid="centered"), "w4a16", "--scheme w4a16 needs the integer grid, and layer"),
    (dict(grid="integer", bits=8), "w4a16", "do not fit int4; use --scheme w8a16 or w8a8"),
    (dict(bits=8), "w8a16", "an 8-bit centered grid has no int8 form"),
    (dict(bias=True), "w8a16", "has a bias, and vLLM runs the online Hadamard transform only on layers without one"),
    (dict(skip=lambda name, m: name.endswith(("k_proj", "lm_head"))), "w8a8", "but its parts differ: q_proj block 32, "
     "k_proj not quantized, v_proj block 32"),
    (dict(), "w4a4", "--scheme must be one of ['w4a16', 'w8a16', 'w8a8'], got 'w4a4'"),
])
def test_what_vllm_cannot_run_is_refused_in_one_line(kwargs, scheme, message, tmp_path):
    model = hf_model(**kwargs)
    with pytest.raises(ValueError) as err:
        export_compressed_tensors(model, tmp_path / "ct", scheme)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ct").exists()


def test_the_codes_fit_rule_is_the_configs(monkeypatch):
    # review: check_exportable repeated QuantConfig.codes_fit_int8's rule; both ask QuantConfig.codes_fit_int
    for grid in ("centered", "integer"):
        for bits in range(1 if grid == "centered" else 2, 9):
            cfg = cage.QuantConfig(bits, grid=grid)
            assert cfg.codes_fit_int(8) == cfg.codes_fit_int8 == (bits <= (8 if grid == "integer" else 7))
            assert cfg.codes_fit_int(4) == (bits <= (4 if grid == "integer" else 3))
    from cage.export_ct import check_exportable

    model = hf_model("integer")
    assert len(check_exportable(model, "w4a16")) == 14
    monkeypatch.setattr(cage.QuantConfig, "codes_fit_int", lambda self, bits: False)
    with pytest.raises(ValueError, match="which do not fit int4"):
        check_exportable(model, "w4a16")

def test_two_block_sizes_get_one_transform_scheme_each(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    cage.prepare_qat(model, weight=cage.QuantConfig(4), activation=cage.QuantConfig(4), block_size="auto")
    cage.convert(model)  # block 64 for the layers reading the 64-wide stream, 128 for down_proj
    export_compressed_tensors(model, tmp_path / "ct", "w8a16")
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["transform_config"]
    assert sorted(g["head_dim"] for g in groups["config_groups"].values()) == [64, 128]  # vLLM: one block per scheme
    check_parity(without_activation_quantization(model), tmp_path / "ct", "w8a16")


@pytest.mark.parametrize("run, argv, message", [
    ("centered", ["--scheme", "w4a16"], "--scheme w4a16 needs the integer grid, and layer 'model.layers.0.self_attn."
     "q_proj' has the centered grid"),
    ("bf16", ["--scheme", "w8a16"], "the run (bf16) has no quantized layer; export it with --format hf"),
    ("centered", [], "--format compressed-tensors needs --scheme (one of w8a16, w8a8, w4a16)"),
])
def test_cli_refusals_are_one_line(run, argv, message, runs, tmp_path, capsys):
    out = tmp_path / "ct"
    assert cli.main(["export", "--run", str(runs[run]), "--format", "compressed-tensors", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_missing_compressed_tensors_is_one_line(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "compressed_tensors", None)
    assert cli.main(["export", "--run", str(runs["integer"]), "--format", "compressed-tensors", "--scheme", "w4a16",
                     "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[compressed-tensors]'" in err and err.count("\n") == 1, err

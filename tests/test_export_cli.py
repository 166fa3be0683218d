"""`python -m cage export` turns a training run into a packed model file with the run's outputs;
`python -m cage generate` samples from it; both fail clearly on bad input."""

import pytest
import torch

import cage
from cage.llama import cli
from cage.llama.export import LLAMA_CONFIG_KEY, load_run_model
from cage.llama.generate import load_model, sample
from cage.llama.job import TrainConfig, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(method="quest", bits=3, steps=3, preset="tiny", batch_size=4, seq_len=32, eval_batches=1,
                      threads=1, verbose=False, out=str(out)))
    return out


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    assert cli.main(["export", "--run", str(run_dir), "--out", str(path)]) == 0
    return path


def test_export_keeps_the_run_models_outputs(run_dir, exported, capsys):
    qat, cfg = load_run_model(run_dir)
    converted = load_model(exported)
    assert isinstance(converted.layers[0].attn.qkv, cage.QuantizedLinear)
    assert converted.layers[0].attn.qkv.weight_quant.bits == 3
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(idx)[0], qat(idx)[0])
    header = cage.read_header(exported)
    assert header["extra"][LLAMA_CONFIG_KEY]["dim"] == 64
    assert header["extra"]["train_config"]["method"] == "quest"


def test_export_prints_the_size_table(run_dir, tmp_path, capsys):
    assert cli.main(["export", "--run", str(run_dir), "--out", str(tmp_path / "m.bin")]) == 0
    out = capsys.readouterr().out
    assert "| quantized layers (12) |" in out and "stored / bf16" in out and "file on disk" in out


def test_generate_samples_text_reproducibly(exported, capsys):
    args = ["generate", "--model", str(exported), "--prompt", "To be", "--max-new-tokens", "12", "--seed", "4"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("To be") and len(first.rstrip("\n").encode()) >= len("To be")
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first


def test_greedy_sampling_follows_the_argmax(exported):
    model = load_model(exported)
    ids = sample(model, [84, 111], 3, 0.0, None, torch.Generator())
    with torch.no_grad():
        expected = int(model(torch.tensor([ids[:2]]))[0][0, -1].argmax())
    assert len(ids) == 5 and ids[2] == expected


def test_top_k_1_is_greedy(exported):
    model = load_model(exported)
    greedy = sample(model, [84], 6, 0.0, None, torch.Generator())
    assert sample(model, [84], 6, 1.5, 1, torch.Generator().manual_seed(9)) == greedy


@pytest.mark.parametrize("argv, message", [
    (["export", "--run", "{tmp}/absent", "--out", "{tmp}/m.bin"], "--run: no run folder"),
    (["export", "--run", "{tmp}", "--out", "{tmp}/m.bin"], "--run: no checkpoint in"),
    (["export", "--run", "{run}", "--out", "{tmp}/no/such/m.bin"], "--out: the folder"),
    (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["generate", "--model", "{model}", "--prompt", "x", "--top-k", "0"], "--top-k must be at least 1"),
    (["generate", "--model", "{model}", "--prompt", ""], "--prompt must not be empty"),
    (["generate", "--model", "{tmp}/absent.bin", "--prompt", "x"], "no quantized model file"),
])
def test_cli_errors_are_clear(argv, message, tmp_path, run_dir, exported, capsys):
    argv = [a.format(tmp=tmp_path, run=run_dir, model=exported) for a in argv]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_export_to_a_folder_is_one_line_and_leaves_nothing(run_dir, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    assert cli.main(["export", "--run", str(run_dir), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--out: {folder} is a folder, and --format cage writes one file" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"] and not any(folder.iterdir())


def test_generate_refuses_a_file_without_the_model_shape(tmp_path, capsys):
    model = torch.nn.Sequential(cage.QATLinear(32, 8, weight_quant=cage.QuantConfig(4, block_size=32)))
    path = tmp_path / "bare.bin"
    cage.save_quantized(cage.convert(model), path)
    assert cli.main(["generate", "--model", str(path), "--prompt", "x"]) == 2
    assert "has no model shape" in capsys.readouterr().err


def test_a_bf16_run_exports_its_float_model(tmp_path, capsys):
    run = tmp_path / "bf16"
    train(TrainConfig(method="bf16", steps=2, preset="tiny", batch_size=4, seq_len=32, eval_batches=1,
                      threads=1, verbose=False, out=str(run)))
    path = tmp_path / "bf16.safetensors"
    assert cli.main(["export", "--run", str(run), "--out", str(path)]) == 0
    model, _ = load_run_model(run)
    loaded = load_model(path)
    assert not any(isinstance(m, (cage.QuantizedLinear, cage.QATLinear)) for m in loaded.modules())
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert cli.main(["generate", "--model", str(path), "--prompt", "To be", "--max-new-tokens", "4"]) == 0

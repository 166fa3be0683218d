"""The training job reads nothing back to the host in a training step, with the settings it
uses on a GPU; a NaN/Inf gradient norm skips the step on the device and the host learns of it at
the next flush (a run whose last --max-skipped-steps steps were all skipped stops there); an
evaluation reads the host once; a CUDA run makes its device the current one.

Host reads are caught two ways, as in test_no_sync.py: (a) a TorchDispatchMode counts
``aten._local_scalar_dense`` (what ``.item()``, ``bool()``, ``float()`` and ``int()`` of a tensor
dispatch to); (b) the step runs on the ``meta`` device, where ``.item()``, ``.tolist()``,
``.cpu()`` and ``bool()`` raise. The Triton launches are stubbed (a kernel reads nothing back;
under the interpreter it would run on the host): what is checked is the host code around them.
CUDA is mocked where the device choice is tested (no GPU here).
"""

import csv
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cage_kernels.launch as launch
from cage import backend as backend_mod
from cage.llama import cli
from cage.llama.job import TrainConfig, evaluate, train
from cage.llama.job import build as build_mod
from cage.llama.job import distributed as dist_mod
from cage.llama.job import loop as loop_mod
from cage.llama.job import machine as machine_mod
from cage.llama.data import TextData, load_corpus

SMALL = dict(preset="tiny", batch_size=4, seq_len=32, eval_batches=2, threads=1, verbose=False)


class ScalarReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def stubbed_launches(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.Launch, "__call__", lambda self, *args, **kwargs: calls.append(self.name))
    return calls


@pytest.fixture(scope="module")
def hf_config(tmp_path_factory):
    """A tiny Llama config.json for --hf-config (GQA, tied embeddings), as the job's HF runs take it."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "config.json"
    transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                             tie_word_embeddings=True).to_json_file(str(path))
    return str(path)


def gpu_config(backend: str, **kw) -> TrainConfig:
    """The job's settings on a GPU, spelt out: what dtype "auto" and backend "auto" resolve to
    there (checked below); the optimizer is make_optimizer's on every device."""
    return TrainConfig(**{**SMALL, "method": "cage", "steps": 4, "silence_ratio": 0.5, "dtype": "bf16",
                          "backend": backend, **kw})


def test_the_gpu_settings_are_the_defaults_on_cuda():
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _no_warning():
        name, amp = machine_mod.autocast_context(TrainConfig(), torch.device("cuda"))
    assert name == "bf16" and isinstance(amp, torch.autocast)
    if backend_mod.triton_installed():
        assert backend_mod.resolve("auto", torch.device("cuda")) == "triton"
    core, _, _ = build_mod.build_model(TrainConfig(**SMALL), torch.device("cpu"))
    assert loop_mod.make_optimizer(TrainConfig(**SMALL), core).check_finite is False


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step_parts(cfg: TrainConfig, device: torch.device):
    """The model, optimizer, autocast and batches of the job, on ``device``. Autocast is the
    job's for a CPU run of ``cfg`` (bf16 here, as on a GPU); on meta it is the same context (it
    casts nothing there, and reads nothing either way)."""
    core, _, _ = build_mod.build_model(cfg, device)
    optimizer = loop_mod.make_optimizer(cfg, core)
    _, amp = machine_mod.autocast_context(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, cfg.batch_size, cfg.seq_len), generator=gen) for _ in range(cfg.steps)]
    return core, optimizer, amp, [(b[0], b[1]) for b in batches]


def test_the_counter_sees_what_a_host_read_dispatches():
    # the count below must be able to fail
    t = torch.ones(2)
    for read in (lambda: t[0].item(), lambda: bool(t[0]), lambda: float(t.sum()), lambda: int(t[1])):
        with ScalarReads() as mode:
            read()
        assert mode.reads == 1, read
    # and it sees what the job's step did before: clip_grad_norm_(..., error_if_nonfinite=True)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 2.0])
    with ScalarReads() as mode:
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert mode.reads == 1
    with ScalarReads() as mode:
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=False)
    assert mode.reads == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_job_step_reads_nothing_back_to_the_host(backend, grad_accum, stubbed_launches):
    check_step_reads_nothing(gpu_config(backend, grad_accum=grad_accum), backend, stubbed_launches)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_step_of_an_hf_llama_reads_nothing_back_to_the_host(grad_accum, hf_config, stubbed_launches):
    # a Hugging Face LlamaForCausalLM (--hf-config), W4A4 cage: transformers' own mask code reads
    # the host once per forward unless the model is given its causal mask (HFCausalLM.causal_mask)
    check_step_reads_nothing(gpu_config("torch", grad_accum=grad_accum, hf_config=hf_config, preset="cpu"), "torch",
                             stubbed_launches)


def check_step_reads_nothing(cfg, backend, stubbed_launches):
    device = torch.device("cpu")
    core, optimizer, amp, batches = step_parts(cfg, device)
    par = dist_mod.Parallel()
    with ScalarReads() as mode:  # every step counted, the first (which plans) included
        for x, y in batches:
            values = loop_mod.train_step(core, optimizer, par.micro_batches(x, y, cfg.grad_accum), device=device,
                                         amp=amp, grad_clip=cfg.grad_clip, parallel=par)
    assert mode.reads == 0
    assert isinstance(values, loop_mod.StepValues) and values.found_inf.shape == (1,)
    assert optimizer.last_found_inf is values.found_inf  # the job's flag, not the optimizer's own
    assert all(int(s["step"]) == cfg.steps for s in optimizer.state.values())
    if backend == "triton":  # the fused paths ran (their outputs are garbage: launches stubbed)
        assert {"_adamw_cage_kernel", "_fake_quant_fwd_kernel", "_fake_quant_bwd_kernel"} <= set(stubbed_launches)
    else:  # the real step: finite, taken, and the model learned something
        assert float(optimizer.skipped_steps) == 0 and math.isfinite(float(values.loss))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_job_step_runs_on_meta_tensors(backend, stubbed_launches):
    # on meta every .item(), .tolist(), .cpu() or bool() raises: a step that finishes read nothing
    cfg = gpu_config(backend)
    device = torch.device("meta")
    core, optimizer, amp, batches = step_parts(cfg, device)
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(next(core.parameters()).sum())  # the premise
    with pytest.raises((RuntimeError, NotImplementedError)):
        next(core.parameters()).sum().cpu()
    for x, y in batches:
        values = loop_mod.train_step(core, optimizer, [(x, y)], device=device, amp=amp, grad_clip=cfg.grad_clip)
    assert values.loss.device.type == values.grad_norm.device.type == values.found_inf.device.type == "meta"
    assert optimizer.skipped_steps.device.type == "meta"
    assert all(int(s["step"]) == cfg.steps for s in optimizer.state.values())


@pytest.mark.parametrize("model", ["llama", "hf"])
def test_the_loop_reads_the_host_only_at_progress_lines_and_evaluations(model, request):
    # the whole loop of train() with the GPU settings (torch backend: real numbers): as many reads
    # for 3 steps as for 9 with the same progress lines and evaluations, so none is per step
    extra = {} if model == "llama" else {"hf_config": request.getfixturevalue("hf_config"), "preset": "cpu"}

    def reads(steps):
        cfg = gpu_config("torch", steps=steps, log_every=steps, eval_every=steps, **extra)
        with ScalarReads() as mode:
            m = train(cfg)
        assert m["completed"] and m["skipped_steps"] == 0
        return mode.reads

    few, many = reads(3), reads(9)
    assert few == many
    assert few <= 3 + 2  # 3 evaluations (one read each) and the grid distance of the one progress line


@pytest.mark.parametrize("model", ["llama", "hf"])
def test_an_evaluation_reads_the_host_once(model, request):
    cfg = TrainConfig(**SMALL) if model == "llama" else TrainConfig(
        **{**SMALL, "preset": "cpu", "hf_config": request.getfixturevalue("hf_config"), "backend": "torch"})
    core, _, _ = build_mod.build_model(cfg, torch.device("cpu"))
    data = TextData(load_corpus(None), cfg.seq_len, 0)
    with ScalarReads() as mode:
        loss = evaluate(core, data, "val", 3, 4, torch.device("cpu"), _no_warning())
    assert mode.reads == 1
    # the same number as a sum of the batches' losses on the host (what it did before)
    total = 0.0
    with torch.no_grad():
        for x, y in data.eval_batches("val", 3, 4):
            total += core(x, y)[1].item()
    assert loss == total / 3


def test_the_hf_causal_mask_gives_the_unmasked_logits_without_a_host_read(hf_config):
    # transformers' own causal attention (no mask: its packed-sequence check reads the host) and
    # the mask HFCausalLM passes give the same logits, sdpa and eager; the mask is built once
    from cage.llama.hf_model import hf_model_from_config

    model = hf_model_from_config(hf_config, seed=0).eval()
    idx = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    for impl in ("sdpa", "eager"):
        model.hf.config._attn_implementation = impl
        with torch.no_grad(), ScalarReads() as unmasked:
            want = model.hf(input_ids=idx, use_cache=False).logits
        assert unmasked.reads >= 1  # what the mask avoids (the count can fail)
        with torch.no_grad(), ScalarReads() as mode:
            got, _ = model(idx)
            model(idx[:2])  # another batch size: the same cached mask, expanded
        assert mode.reads == 0 and torch.equal(got, want), impl
    assert len(model._masks) == 2  # one per (seq_len, device, dtype): bool for sdpa, float32 for eager


class FakeBatch:
    """Records how a CPU batch is moved (a real CUDA copy needs a GPU)."""

    def __init__(self, pinned=False):
        self.device, self.pinned, self.moves = torch.device("cpu"), pinned, []

    def pin_memory(self):
        return FakeBatch(pinned=True)

    def to(self, device, non_blocking=False):
        self.moves.append((torch.device(device), non_blocking, self.pinned))
        return self


def test_a_batch_goes_to_a_gpu_from_pinned_memory_without_a_sync():
    # a pageable host-to-GPU copy waits for the stream (cudaStreamSynchronize); pinned + non_blocking does not
    moved = machine_mod.to_device(FakeBatch(), torch.device("cuda", 0))
    assert moved.moves == [(torch.device("cuda", 0), True, True)]
    t = torch.ones(2)
    assert machine_mod.to_device(t, torch.device("cpu")) is t
    assert machine_mod.to_device(t, torch.device("meta")).device.type == "meta"


def test_the_step_and_the_evaluation_move_batches_with_to_device(monkeypatch):
    moves = []
    real = machine_mod.to_device
    monkeypatch.setattr(loop_mod, "to_device", lambda t, device: moves.append(device) or real(t, device))
    cfg = gpu_config("torch", steps=1, grad_accum=2)
    core, optimizer, amp, batches = step_parts(cfg, torch.device("cpu"))
    x, y = batches[0]
    loop_mod.train_step(core, optimizer, dist_mod.Parallel().micro_batches(x, y, 2), device=torch.device("cpu"),
                        amp=amp, grad_clip=1.0)
    assert len(moves) == 4  # x and y of each micro-batch
    evaluate(core, TextData(load_corpus(None), cfg.seq_len, 0), "val", 2, 4, torch.device("cpu"), amp)
    assert len(moves) == 8


# ---- skipped steps


def nan_gradients_at(monkeypatch, bad_steps, snapshots=None):
    """Make the gradient of one weight NaN at the (1-based) ``bad_steps``; with ``snapshots``,
    record every parameter after each step."""
    real_build, real_step = build_mod.build_model, loop_mod.train_step
    counter = {"backward": 0}

    def build(cfg, device):
        model, wq, aq = real_build(cfg, device)

        def hook(grad):
            counter["backward"] += 1
            return grad * float("nan") if counter["backward"] in bad_steps else grad

        model.lm_head.weight.register_hook(hook)
        return model, wq, aq

    def step(model, optimizer, *args, **kwargs):
        values = real_step(model, optimizer, *args, **kwargs)
        if snapshots is not None:
            snapshots.append([p.detach().clone() for p in model.parameters()])
        return values

    monkeypatch.setattr(loop_mod, "build_model", build)
    monkeypatch.setattr(loop_mod, "train_step", step)


def csv_rows(out):
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    snapshots = []
    nan_gradients_at(monkeypatch, {2, 5, 6}, snapshots)
    out = tmp_path / "run"
    m = train(TrainConfig(method="cage", steps=8, silence_ratio=0.5, log_every=4, eval_every=4, max_skipped_steps=3,
                          out=str(out), **SMALL))
    assert m["completed"] and m["skipped_steps"] == 3 and m["skipped_at"] == [2, 5, 6]
    same = [all(torch.equal(a, b) for a, b in zip(snapshots[i], snapshots[i - 1])) for i in range(1, 8)]
    assert same == [True, False, False, True, True, False, False]  # steps 2..8: 2, 5, 6 changed nothing
    assert all(torch.isfinite(p).all() for p in snapshots[-1])
    r = csv_rows(out)
    assert [int(x["skipped"]) for x in r] == [0, 1, 0, 0, 1, 1, 0, 0]
    assert all(math.isnan(float(x["grad_norm"])) == bool(int(x["skipped"])) for x in r)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["history"]["skipped"] == [2, 5, 6]
    assert all(int(s["step"]) == 8 for s in ckpt["optimizer"]["state"].values())  # a skipped step counts


def test_a_run_of_skipped_steps_stops_at_the_next_progress_line(tmp_path, monkeypatch, capsys):
    nan_gradients_at(monkeypatch, set(range(5, 100)))
    out = tmp_path / "run"
    rc = cli.main(["train", "--method", "bf16", "--preset", "tiny", "--steps", "12", "--batch-size", "4",
                   "--seq-len", "32", "--eval-batches", "2", "--threads", "1", "--quiet", "--log-every", "2",
                   "--eval-every", "4", "--max-skipped-steps", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    # steps 5 and 6 (progress line at 6: 2 in a row), then 7 and 8: stopped at 8, before its evaluation
    assert err.startswith("cage train: error: step 8: the last 4 steps (5 to 8) were all skipped")
    assert "--max-skipped-steps 3" in err
    assert err.rstrip().endswith(f"the last checkpoint in {out} is of step 4")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4  # not overwritten
    assert [int(x["skipped"]) for x in csv_rows(out)] == [0] * 4 + [1] * 4


def test_the_message_says_when_there_is_no_checkpoint(tmp_path, monkeypatch):
    nan_gradients_at(monkeypatch, set(range(1, 100)))
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        train(TrainConfig(method="bf16", steps=20, log_every=1, eval_every=10, max_skipped_steps=2, out=str(out),
                          **SMALL))
    assert str(err.value).startswith("step 2: the last 2 steps (1 to 2) were all skipped")
    assert str(err.value).endswith(f"{out} holds no checkpoint of this run (the first is written at step 10): "
                                   "run again without --resume to start it over there")
    assert not (out / "checkpoint.pt").exists()


def test_a_streak_shorter_than_the_limit_does_not_stop_the_run(tmp_path, monkeypatch):
    nan_gradients_at(monkeypatch, {3, 4})
    m = train(TrainConfig(method="bf16", steps=6, log_every=1, max_skipped_steps=3, **SMALL))
    assert m["completed"] and m["skipped_at"] == [3, 4]
    assert loop_mod.skip_streak([3, 4], 4) == 2 and loop_mod.skip_streak([3, 4], 5) == 0
    assert loop_mod.skip_streak([], 1) == 0 and loop_mod.skip_streak([1, 2, 3], 3) == 3


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_skipped_steps_is_a_positive_integer(value):
    with pytest.raises(ValueError, match="--max-skipped-steps must be an integer >= 1"):
        TrainConfig(max_skipped_steps=value, **SMALL).validate()
    assert "max_skipped_steps" in TrainConfig.RESUMABLE_CHANGES  # it changes no weight


# ---- the device of a CUDA run (CUDA mocked)


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = {"set_device": [], "current": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls["current"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    return calls


def test_a_single_process_cuda_run_makes_its_device_current(fake_cuda):
    par, device = dist_mod.setup(TrainConfig(device="cuda:1"))
    assert not par.distributed and device == torch.device("cuda", 1)
    assert fake_cuda["set_device"] == [torch.device("cuda", 1)]
    fake_cuda["set_device"].clear()
    _, device = dist_mod.setup(TrainConfig(device="cuda"))  # the current device, named
    assert device == torch.device("cuda", 1) and fake_cuda["set_device"] == [device]


def test_a_cpu_run_sets_no_cuda_device(fake_cuda):
    _, device = dist_mod.setup(TrainConfig(device="cpu"))
    assert device == torch.device("cpu") and fake_cuda["set_device"] == []


def test_under_torchrun_each_process_takes_cuda_local_rank(fake_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_mod._distributed_device("cuda") == torch.device("cuda", 1)
    assert fake_cuda["set_device"] == [torch.device("cuda", 1)]


@pytest.mark.parametrize("local_rank", ["2", "7"])
def test_a_local_rank_past_the_gpu_count_is_one_clear_error(fake_cuda, monkeypatch, local_rank):
    for k, v in {"WORLD_SIZE": "8", "RANK": local_rank, "LOCAL_RANK": local_rank, "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError) as err:
        dist_mod.setup(TrainConfig(parallel="ddp", device="cuda"))
    msg = str(err.value)
    assert msg.startswith(f"LOCAL_RANK={local_rank}: ") and "2 CUDA device(s)" in msg and "\n" not in msg
    assert fake_cuda["set_device"] == []  # before any device is touched or a process group started


def test_a_local_rank_that_is_not_a_number_is_refused(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer >= 0"):
        dist_mod._distributed_device("cuda")

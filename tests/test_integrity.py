"""A damaged checkpoint is an error naming the file, not a silent resume (issue 18 item 4).

`checkpoint.pt` and `checkpoint/state.pt` are zip archives (torch.save) with a CRC-32 per entry,
checked while streaming before they load; a DCP folder's files are summed (size and CRC-32) when
the checkpoint is written, into `state.pt`, and checked before they are read. A flipped bit in a
tensor's bytes loads silently under torch.load, so each test flips one and expects the error.
"""

import os
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cage.llama import cli
from cage.llama.job import checkpoint as ckpt_mod
from cage.llama.job.checkpoint import CHECKPOINT, DCP_DIR, DCP_STATE, CheckpointError

REPO = Path(__file__).resolve().parents[1]
RUN = ["--method", "cage", "--bits", "4", "--preset", "tiny", "--steps", "2", "--batch-size", "4",
       "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert cli.main(["train", *RUN, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dcp") / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "cage", "train", *RUN, "--parallel", "ddp", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _flip(path: Path, offset: int, bit: int = 6) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _entry_data_offset(path: Path, suffix: str) -> int:
    """Where the bytes of the largest zip entry whose name ends with ``suffix`` start."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if i.filename.endswith(suffix)), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def _cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _export(run: Path, tmp_path: Path) -> list[str]:
    return ["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")]


# ---- checkpoint.pt ------------------------------------------------------------------------


def test_a_flipped_bit_in_checkpoint_pt_is_an_error(one_run, tmp_path, capsys):
    run = _copy(one_run, tmp_path)
    path = run / CHECKPOINT
    _flip(path, _entry_data_offset(path, ""))
    torch.load(path, weights_only=True)  # torch itself loads it without a word
    for argv in (["train", "--resume", "--out", str(run)], _export(run, tmp_path)):
        code, err = _cli(argv, capsys)
        assert code == 2 and f"{path}: damaged" in err and "CRC" in err, err
        assert len(err.strip().splitlines()) == 1


def test_a_truncated_checkpoint_pt_is_an_error(one_run, tmp_path):
    run = _copy(one_run, tmp_path)
    path = run / CHECKPOINT
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged: not a readable archive"):
        ckpt_mod.find_checkpoint(run)


def test_an_intact_checkpoint_is_checked_once_per_change(one_run, tmp_path, monkeypatch):
    run = _copy(one_run, tmp_path)
    calls = []
    real = zipfile.ZipFile.testzip
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda self: calls.append(1) or real(self))
    for _ in range(3):  # the CLI reads the checkpoint several times on --resume
        ckpt_mod.find_checkpoint(run)
    assert len(calls) == 1


# ---- a DCP folder -------------------------------------------------------------------------


def _dcp_folder(run: Path) -> Path:
    return run / DCP_DIR / torch.load(run / DCP_DIR / DCP_STATE, weights_only=True)["dcp"]


def test_the_dcp_state_records_every_files_size_and_crc(dcp_run):
    folder = _dcp_folder(dcp_run)
    sums = torch.load(dcp_run / DCP_DIR / DCP_STATE, weights_only=True)["dcp_files"]
    assert sorted(sums) == sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sums == ckpt_mod.dcp_file_sums(folder)


def test_a_flipped_bit_in_a_distcp_file_is_an_error(dcp_run, tmp_path, capsys):
    run = _copy(dcp_run, tmp_path)
    shard = _dcp_folder(run) / "__1_0.distcp"
    _flip(shard, shard.stat().st_size // 2)
    for argv in (["train", "--resume", "--out", str(run)], _export(run, tmp_path)):
        code, err = _cli(argv, capsys)
        assert code == 2 and f"{shard}: damaged" in err and "CRC" in err, err
        assert len(err.strip().splitlines()) == 1


def test_a_missing_or_extra_dcp_file_is_an_error(dcp_run, tmp_path):
    run = _copy(dcp_run, tmp_path)
    folder = _dcp_folder(run)
    (folder / "__0_0.distcp").rename(tmp_path / "away")
    with pytest.raises(CheckpointError, match="__0_0.distcp: missing"):
        ckpt_mod.load_model_state(run)
    (tmp_path / "away").rename(folder / "__0_0.distcp")
    (folder / "__2_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match="__2_0.distcp: not one of the files the checkpoint wrote"):
        ckpt_mod.load_model_state(run)


def test_a_flipped_bit_in_the_dcp_state_is_an_error(dcp_run, tmp_path):
    run = _copy(dcp_run, tmp_path)
    path = run / DCP_DIR / DCP_STATE
    _flip(path, _entry_data_offset(path, ""))
    with pytest.raises(CheckpointError, match=f"{path}: damaged"):
        ckpt_mod.find_checkpoint(run)


def test_under_torchrun_every_process_stops_on_a_damaged_shard(dcp_run, tmp_path):
    # rank 1 checks __0_0.distcp; rank 0 learns of it through the agreement and stops too
    run = _copy(dcp_run, tmp_path)
    shard = _dcp_folder(run) / "__0_0.distcp"
    _flip(shard, shard.stat().st_size // 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "cage", "train", "--resume", "--parallel", "ddp", "--out", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"cage train: error: {shard}: damaged" in proc.stderr
    assert "another process found a file that fails its check" in proc.stderr


def test_a_state_file_from_before_the_sums_still_loads(dcp_run, tmp_path):
    run = _copy(dcp_run, tmp_path)
    path = run / DCP_DIR / DCP_STATE
    state = torch.load(path, weights_only=True)
    del state["dcp_files"]
    torch.save(state, path)
    assert ckpt_mod.load_model_state(run).keys() == ckpt_mod.load_model_state(dcp_run).keys()

"""Loading a run folder runs no code from it (issue 18 item 1).

`cage export --run` and `cage train --resume` read the checkpoint of a run folder, which may come
from anyone. The single-file checkpoint goes through `torch.load(weights_only=True)`; a DCP folder
(a torchrun run's `checkpoint/step-N/`) has two pickle paths of its own: `.metadata` (read with
plain `pickle.load` by `FileSystemReader`) and every non-tensor item of a `.distcp` file (read with
`torch.load(weights_only=False)` by `DefaultLoadPlanner`). Each test plants a `__reduce__` payload
that would create a marker file, shows the payload is live (the plain torch path runs it), and
that the cage commands refuse the folder with a clear error and never run it.
"""

import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cage.llama import cli
from cage.llama.job import checkpoint as ckpt_mod
from cage.llama.job.checkpoint import CHECKPOINT, DCP_DIR, DCP_STATE

REPO = Path(__file__).resolve().parents[1]
RUN = ["--method", "cage", "--bits", "4", "--preset", "tiny", "--steps", "2", "--batch-size", "4",
       "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--threads", "1", "--quiet"]


class Payload:
    """Unpickling this creates ``path`` (what a real attack would replace by any call)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory) -> Path:
    """A finished 2-process DDP run: its checkpoint is a DCP folder (two shard files)."""
    out = tmp_path_factory.mktemp("dcp") / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "cage", "train", *RUN, "--parallel", "ddp", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert cli.main(["train", *RUN, "--out", str(out)]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _dcp_folder(run: Path) -> Path:
    state = torch.load(run / DCP_DIR / DCP_STATE, weights_only=True)
    return run / DCP_DIR / state["dcp"]


def _metadata(folder: Path):
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)  # our own, untampered file


def _write_metadata(folder: Path, metadata) -> None:
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    _reseal(folder)


def _reseal(folder: Path) -> None:
    """Record the tampered files' sums in state.pt, as an attacker who controls the whole folder
    would: the integrity check (item 4) passes, and the loaders themselves must refuse."""
    if not hasattr(ckpt_mod, "dcp_file_sums"):
        return
    state_path = folder.parent / DCP_STATE
    state = torch.load(state_path, weights_only=True)
    state["dcp_files"] = ckpt_mod.dcp_file_sums(folder)
    torch.save(state, state_path)


def _plant_in_metadata(run: Path, marker: Path) -> Path:
    folder = _dcp_folder(run)
    metadata = _metadata(folder)
    metadata.storage_meta.modules = [Payload(marker)]
    _write_metadata(folder, metadata)
    return folder


BYTES_ITEM = "optimizer.param_groups.0.lr"


def _plant_in_bytes_item(run: Path, marker: Path) -> Path:
    """Replace the saved learning rate of group 0 (a non-tensor item) by the payload, appended to
    its .distcp file, and point the metadata at it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    folder = _dcp_folder(run)
    metadata = _metadata(folder)
    (index,) = [i for i in metadata.storage_data if i.fqn == BYTES_ITEM]
    info = metadata.storage_data[index]
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    shard = folder / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(buf.getvalue()))
    _write_metadata(folder, metadata)
    return folder


def _run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


# ---- the payloads are live: torch's own DCP readers run them ------------------------------


def test_a_metadata_payload_runs_under_torchs_reader(dcp_run, tmp_path):
    run, marker = _copy(dcp_run, tmp_path), tmp_path / "ran"
    folder = _plant_in_metadata(run, marker)
    from torch.distributed.checkpoint import FileSystemReader

    FileSystemReader(str(folder)).read_metadata()
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_bytes_item_payload_runs_under_torchs_planner(dcp_run, tmp_path):
    run, marker = _copy(dcp_run, tmp_path), tmp_path / "ran"
    folder = _plant_in_bytes_item(run, marker)
    import torch.distributed.checkpoint as dcp

    state = {BYTES_ITEM: 0.0}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    assert marker.exists()


# ---- cage export and cage train --resume refuse them ---------------------------------------


@pytest.mark.parametrize("command", ["export", "resume"])
def test_a_metadata_payload_is_refused(dcp_run, tmp_path, capsys, command):
    run, marker = _copy(dcp_run, tmp_path), tmp_path / "ran"
    _plant_in_metadata(run, marker)
    argv = (["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")] if command == "export"
            else ["train", "--resume", "--out", str(run)])
    code, err = _run_cli(argv, capsys)
    assert not marker.exists()
    assert code == 2 and ".metadata" in err and "exec" in err and "refused" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_bytes_item_payload_is_refused_by_resume(dcp_run, tmp_path, capsys):
    run, marker = _copy(dcp_run, tmp_path), tmp_path / "ran"
    _plant_in_bytes_item(run, marker)
    code, err = _run_cli(["train", "--resume", "--out", str(run)], capsys)
    assert not marker.exists()
    assert code == 2 and BYTES_ITEM in err and "refused" in err and "exec" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_export_never_unpickles_the_optimizers_items(dcp_run, tmp_path, capsys):
    # export reads the model alone: the planted optimizer item is neither run nor needed
    run, marker = _copy(dcp_run, tmp_path), tmp_path / "ran"
    _plant_in_bytes_item(run, marker)
    code, err = _run_cli(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert not marker.exists()
    assert code == 0, err


def test_a_metadata_pointing_outside_its_folder_is_refused(dcp_run, tmp_path, capsys):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    run = _copy(dcp_run, tmp_path)
    folder = _dcp_folder(run)
    metadata = _metadata(folder)
    index = next(iter(metadata.storage_data))
    info = metadata.storage_data[index]
    (tmp_path / "elsewhere.distcp").write_bytes((folder / info.relative_path).read_bytes())
    metadata.storage_data[index] = _StorageInfo("../../../elsewhere.distcp", info.offset, info.length)
    _write_metadata(folder, metadata)
    code, err = _run_cli(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 2 and "outside" in err and ".metadata" in err, err


# ---- the single-file formats: weights_only, and a clear error --------------------------------


def test_a_payload_in_checkpoint_pt_is_refused(one_run, tmp_path, capsys):
    run, marker = _copy(one_run, tmp_path), tmp_path / "ran"
    state = torch.load(run / CHECKPOINT, weights_only=True)
    state["history"]["note"] = Payload(marker)
    torch.save(state, run / CHECKPOINT)
    for argv in (["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")],
                 ["train", "--resume", "--out", str(run)]):
        code, err = _run_cli(argv, capsys)
        assert not marker.exists()
        assert code == 2 and CHECKPOINT in err and "refused" in err and "exec" in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_a_payload_in_the_dcp_state_file_is_refused(dcp_run, tmp_path, capsys):
    run, marker = _copy(dcp_run, tmp_path), tmp_path / "ran"
    state = torch.load(run / DCP_DIR / DCP_STATE, weights_only=True)
    state["history"]["note"] = Payload(marker)
    torch.save(state, run / DCP_DIR / DCP_STATE)
    code, err = _run_cli(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert not marker.exists()
    assert code == 2 and DCP_STATE in err and "refused" in err, err


def test_untampered_folders_still_export_and_resume(dcp_run, tmp_path, capsys):
    run = _copy(dcp_run, tmp_path)
    code, err = _run_cli(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 0, err
    code, err = _run_cli(["train", "--resume", "--out", str(run)], capsys)
    assert code == 0, err


# ---- the metadata unpickler itself ------------------------------------------------------------

_BUILD_ON_A_CLASS = (  # setattr(Metadata, "x", 1): plain pickle monkeypatches the class
    b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\nN}X\x01\x00\x00\x00xK\x01s\x86b."
)


@pytest.mark.parametrize("blob, refused", [
    (pickle.dumps(Payload("never")), "exec"),
    (pickle.dumps(os.getcwd), "posix.getcwd"),
    (pickle.dumps(torch.load), "torch.serialization.load"),
    (_BUILD_ON_A_CLASS, "sets the state of a type"),
])
def test_the_metadata_unpickler_allows_only_dcp_types(tmp_path, blob, refused):
    (tmp_path / ".metadata").write_bytes(blob)
    with pytest.raises(ckpt_mod.CheckpointError, match=f"refused: .*{refused}"):
        ckpt_mod.read_dcp_metadata(tmp_path)
    assert not Path("never").exists()
    from torch.distributed.checkpoint.metadata import Metadata

    assert not hasattr(Metadata, "x")


# ---- sizes declared in .metadata (issue 18 item 6) ----------------------------------------------


def test_a_size_declared_in_the_metadata_must_be_stored(dcp_run, tmp_path, capsys):
    # loading allocates each tensor as declared: a declared size needs its bytes in the shards
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    run = _copy(dcp_run, tmp_path)
    folder = _dcp_folder(run)
    metadata = _metadata(folder)
    entry = metadata.state_dict_metadata["model.tok_embeddings.weight"]
    entry.size = torch.Size([2**22, 64])
    entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2**22, 64]))]
    _write_metadata(folder, metadata)
    for argv in (["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")],
                 ["train", "--resume", "--out", str(run)]):
        code, err = _run_cli(argv, capsys)
        assert code == 2 and f"{folder / '.metadata'}: tensor 'model.tok_embeddings.weight' is declared " \
            "[4194304, 64] (1073741824 bytes), but its stored items hold" in err, err


def test_a_dcp_runs_config_must_describe_its_stored_model(dcp_run, tmp_path, capsys):
    run = _copy(dcp_run, tmp_path)
    state_path = run / DCP_DIR / DCP_STATE
    state = torch.load(state_path, weights_only=True)
    state["config"].update(dim=32768, n_heads=256)
    torch.save(state, state_path)
    code, err = _run_cli(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 2 and "describes tok_embeddings.weight as [256, 32768]; the stored tensor is [256, 64]" in err, err

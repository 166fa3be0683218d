"""A run's files: the checkpoint (model, optimizer, data order, RNG, and the metrics it stands
for), written atomically.

Two formats. One process (``--parallel none``) writes the single file ``checkpoint.pt``. Several
(``ddp``/``fsdp2``) write ``checkpoint/``: a ``torch.distributed.checkpoint`` folder
``checkpoint/step-<step>/`` (model and optimizer, each process its shards, through
``get_state_dict``) and ``checkpoint/state.pt``, the rest of the run's state, written by rank 0
after every shard is on disk. ``state.pt`` names the folder it belongs to, so writing it is the
moment the checkpoint counts; older folders are deleted after it. A DCP checkpoint loads into
any number of processes, one included (``--parallel none`` reads it, and from then on writes
``checkpoint.pt``); whichever format holds the later step is the run's checkpoint.

Loading runs no code from the run folder: the single files load with ``torch.load(weights_only=True)``;
a DCP folder's ``.metadata`` is read by an unpickler that knows only DCP's own metadata types
(``torch.distributed.checkpoint`` itself uses plain ``pickle.load``), and its non-tensor items
(the optimizer's ``param_groups``) with ``torch.load(weights_only=True)`` (DCP's planner: ``False``).
A refusal is a :class:`CheckpointError` naming the file.

A damaged checkpoint is an error naming the file, never a silent load: the two single files are
zip archives (torch.save) whose entries' CRC-32s are checked, streaming, before they load (once
per change of the file); a DCP folder's files are summed (size, CRC-32) as the checkpoint is
written, each process its share, into ``state.pt``, and checked the same way before it is read.
Either check reads the checkpoint once more, at about 2 GB/s.

Completion is one fact: the checkpoint carries the metrics of its step, ``completed`` included,
and ``metrics.json`` is a copy of them (a resumed complete run rewrites a missing or stale copy).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
import zlib
from pathlib import Path

import torch

from ..data import TextData
from .config import TrainConfig

CHECKPOINT = "checkpoint.pt"

DCP_DIR = "checkpoint"  # the multi-process format's folder

DCP_STATE = "state.pt"  # in DCP_DIR: everything but the model and optimizer

METRICS = "metrics.json"

PLOT = "loss.png"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (unsafe, damaged or inconsistent); the message
    names the file. A ValueError, so the CLI prints it as one line."""


def _refusal(err: Exception) -> str:
    """What torch's weights_only unpickler refused, in a few words."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it calls {found.group(1)}, which weights_only loading does not allow"
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return found.group(1).strip() if found else text.strip().splitlines()[0]


_VERIFIED: set = set()  # (path, inode, size, mtime) of archives whose CRCs were checked


def verify_archive(path: Path) -> None:
    """Every entry of the zip archive ``path`` (a torch.save file) against its CRC-32, read in
    chunks; a CheckpointError naming the file if one fails or the archive cannot be read."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()
    except Exception as err:  # noqa: BLE001: BadZipFile, EOFError, zlib.error... of a damaged file
        raise CheckpointError(
            f"{path}: damaged: not a readable archive ({type(err).__name__}: {err}); the file is truncated or corrupt"
        ) from None
    if failed is not None:
        raise CheckpointError(
            f"{path}: damaged: its entry {failed!r} fails its CRC-32 check (the bytes changed since "
            "they were written); the checkpoint cannot be used"
        )
    _VERIFIED.add(key)


def _torch_load(path: Path):
    """``torch.load(path, weights_only=True)`` of a checked archive, with a one-line
    CheckpointError when it refuses."""
    verify_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: {_refusal(err)} (checkpoints load with torch.load(weights_only=True); "
            "nothing from the file ran)"
        ) from None


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file and rename it, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def run_state(data: TextData, step: int, cfg, history: dict, corpus_sha256: str, metrics: dict | None) -> dict:
    """What a checkpoint holds besides the model and the optimizer."""
    return {
        "corpus_sha256": corpus_sha256,
        "threads": torch.get_num_threads(),
        "data": data.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "config": cfg.to_dict(),
        "history": history,
        # as JSON has them (plain types: weights_only loads them, and metrics.json is a copy)
        "metrics": None if metrics is None else json.loads(json.dumps(metrics)),
    }


def save_checkpoint(path: Path, model, optimizer, data: TextData, step: int, cfg, history: dict,
                    corpus_sha256: str, metrics: dict | None = None) -> None:
    """The single-file checkpoint of a one-process run."""
    state = {
        **run_state(data, step, cfg, history, corpus_sha256, metrics),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    _atomic_write(path, lambda tmp: torch.save(state, tmp))
    remove_stale(path.parent, keep=None)


def save_distributed_checkpoint(out: Path, model, optimizer, parallel, state: dict, committed: str | None) -> str:
    """A DCP checkpoint, written by every process (a collective); returns its folder's name.

    The name differs from ``committed`` (the folder the current ``state.pt`` names), so a
    checkpoint is never written over the one that counts, even twice at the same step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step-{state['step']:08d}"
    if name == committed:
        name += "-b"
    target = out / DCP_DIR / name
    if parallel.is_main and target.exists():  # left by a session that died before committing it
        shutil.rmtree(target)
    parallel.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # dcp.save returns after every process's shards and rank 0's .metadata are written
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(target))
    sums = _gather_sums(dcp_file_sums(target, parallel.rank, parallel.world), parallel)
    if parallel.is_main:
        _atomic_write(out / DCP_DIR / DCP_STATE,
                      lambda tmp: torch.save({**state, "dcp": name, "dcp_files": sums}, tmp))
        remove_stale(out, keep=name)
    return name


def remove_stale(out: Path, keep: str | None) -> None:
    """After a checkpoint is committed: drop the other format and the DCP folders but ``keep``."""
    if keep is not None:
        (out / CHECKPOINT).unlink(missing_ok=True)
    folder = out / DCP_DIR
    if not folder.is_dir():
        return
    if keep is None:
        shutil.rmtree(folder)
        return
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name != keep:
            shutil.rmtree(entry)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (run without --resume first)")
    return _torch_load(path)


def find_checkpoint(out: Path) -> dict | None:
    """The run's checkpoint in ``out`` (the later step of the two formats), or None. A DCP
    checkpoint comes as its state without the model and optimizer, with ``"dcp"`` naming its
    folder; load those with ``restore_weights``."""
    found = []
    if (out / CHECKPOINT).is_file():
        found.append(((out / CHECKPOINT).stat().st_mtime, load_checkpoint(out / CHECKPOINT)))
    side = out / DCP_DIR / DCP_STATE
    if side.is_file():
        found.append((side.stat().st_mtime, _torch_load(side)))
    if not found:
        return None
    return max(found, key=lambda f: (f[1]["step"], f[0]))[1]


def has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINT).is_file() or (out / DCP_DIR / DCP_STATE).is_file()


def resume_checkpoint(out: Path) -> dict:
    ckpt = find_checkpoint(out)
    if ckpt is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint at {out / CHECKPOINT} or {out / DCP_DIR / DCP_STATE} (run without --resume first)"
        )
    return ckpt


def restore_weights(out: Path, ckpt: dict, model, optimizer, parallel) -> None:
    """Load the checkpoint's model and optimizer state into this session's (a collective for
    a DCP checkpoint under torchrun; DCP reshards to any number of processes)."""
    if "dcp" in ckpt:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        folder = dcp_folder(out, ckpt)
        verify_dcp_files(folder, ckpt, parallel)
        metadata = read_dcp_metadata(folder)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        _dcp_load(state, folder, metadata, _safe_dcp()["planner"](), distributed=parallel.distributed)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    elif parallel.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        # every process read the whole file: hand its full tensors over, each keeps its shards
        set_state_dict(
            model, optimizer, model_state_dict=ckpt["model"],
            optim_state_dict=_optimizer_state_by_name(ckpt["optimizer"], optimizer, parallel.unwrapped(model)),
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])


def _optimizer_state_by_name(saved: dict, optimizer, model) -> dict:
    """``optimizer.state_dict()`` of a one-process run (keyed by position) keyed by parameter
    name instead, as ``set_state_dict`` takes it; positions follow this ``optimizer``'s groups."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    positions = [i for g in saved["param_groups"] for i in g["params"]]
    if len(positions) != len(names):
        raise ValueError(f"--resume: the checkpoint's optimizer holds {len(positions)} parameters, the model {len(names)}")
    by_position = dict(zip(positions, names))
    return {
        "state": {by_position[i]: state for i, state in saved["state"].items()},
        "param_groups": [{**g, "params": [by_position[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def load_model_state(out: Path, ckpt: dict | None = None) -> dict | None:
    """The model weights of ``out``'s checkpoint as full tensors keyed like
    ``Llama.state_dict()`` (either format), or None without a checkpoint. ``ckpt``: what
    ``find_checkpoint(out)`` returned, when the caller has it already."""
    ckpt = find_checkpoint(out) if ckpt is None else ckpt
    if ckpt is None:
        return None
    if "dcp" not in ckpt:
        return ckpt["model"]
    folder = dcp_folder(out, ckpt)
    verify_dcp_files(folder, ckpt)
    metadata = read_dcp_metadata(folder)
    state: dict = {}
    # the model alone: the optimizer's items are never read
    _dcp_load(state, folder, metadata, _safe_dcp()["empty_planner"](keys={"model"}), distributed=False)
    if "model" not in state:
        raise CheckpointError(f"{folder / '.metadata'}: the checkpoint holds no model")
    return state["model"]


# ---- a DCP folder's sums ----------------------------------------------------------------


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def dcp_file_sums(folder: Path, rank: int = 0, world: int = 1) -> dict[str, list[int]]:
    """``{file name: [size, CRC-32]}`` of this process's share (every ``world``-th file, in name
    order, from the ``rank``-th) of the files of a DCP folder."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return {n: [(folder / n).stat().st_size, _file_crc(folder / n)] for n in names[rank::world]}


def _gather_sums(mine: dict, parallel) -> dict:
    """Every process's sums, on rank 0 (a collective under torchrun)."""
    if not parallel.distributed or parallel.world == 1:
        return mine
    import torch.distributed as dist

    shares = [None] * parallel.world
    dist.all_gather_object(shares, mine, group=parallel.flag_group)
    return {name: s for share in shares for name, s in share.items()}


def verify_dcp_files(folder: Path, ckpt: dict, parallel=None, names=None) -> None:
    """The files of a DCP folder against the sums its state file recorded (this process's share;
    under torchrun the processes agree, so every one raises); a CheckpointError naming the
    first damaged, missing or foreign file. A state file written before sums were recorded has
    nothing to check against. ``names``: only these files (in one process)."""
    sums = ckpt.get("dcp_files")
    if sums is None:
        return
    state_file = folder.parent / DCP_STATE
    if not isinstance(sums, dict) or not all(
        isinstance(k, str) and _plain_name(k) and isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)
        for k, v in sums.items()
    ):
        raise CheckpointError(f"{state_file}: its dcp_files entry is not a table of file sums")
    rank, world = (parallel.rank, parallel.world) if parallel is not None and parallel.distributed else (0, 1)
    problem = None
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    foreign = [n for n in present if n not in sums]
    if foreign:
        problem = f"{folder / foreign[0]}: not one of the files the checkpoint wrote (its sums are in {state_file})"
    for name in sorted(sums)[rank::world] if names is None else [n for n in names if n in sums]:
        if problem is not None:
            break
        path = folder / name
        size, crc = sums[name]
        if not path.is_file():
            problem = f"{path}: missing (the checkpoint wrote it; its sums are in {state_file})"
        elif path.stat().st_size != size:
            problem = f"{path}: damaged: {path.stat().st_size} bytes, {size} when written"
        elif _file_crc(path) != crc:
            problem = f"{path}: damaged: its CRC-32 differs from the one recorded when it was written (in {state_file})"
    if names is None and parallel is not None and parallel.distributed and parallel.world > 1:
        # a MAX over the processes (the stop signal's host-side collective)
        if parallel.agreed_signal(int(problem is not None)) and problem is None:
            problem = f"{folder}: damaged: another process found a file that fails its check (its error names it)"
    if problem is not None:
        raise CheckpointError(problem)


# ---- reading a DCP folder without running code from it -----------------------------------

METADATA = ".metadata"  # a DCP folder's index: a pickle


def dcp_folder(out: Path, ckpt: dict) -> Path:
    """The DCP folder that ``ckpt`` (the state file's contents) names, inside ``out/checkpoint/``."""
    name = ckpt["dcp"]
    if not isinstance(name, str) or not _plain_name(name):
        raise CheckpointError(f"{out / DCP_DIR / DCP_STATE}: names the folder {name!r}, which is not one inside {out / DCP_DIR}")
    return out / DCP_DIR / name


def _plain_name(name: str) -> bool:
    """A file name within its folder: no separator, not '.' or '..'."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


@functools.cache
def _safe_dcp() -> dict:
    """The restricted unpickler, reader and planners (built on first use: importing
    torch.distributed.checkpoint takes time the other commands need not spend)."""
    import pathlib

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    classes = (md.Metadata, md.MetadataIndex, md.StorageMeta, md.TensorProperties, md.TensorStorageMetadata,
               md.BytesStorageMetadata, md.ChunkStorageMetadata, _StorageInfo)
    callables = {
        **{(c.__module__, c.__qualname__): c for c in classes},
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): md._MEM_FORMAT_ENCODING,
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        **{("pathlib", n): getattr(pathlib, n) for n in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
    }
    buildable = classes + (pathlib.PurePath, __import__("collections").OrderedDict)

    class MetadataUnpickler(pickle._Unpickler):
        """Plain data and DCP's metadata types; anything else (a function, another class, a
        persistent id, a BUILD on a class) is an UnpicklingError before it is called."""

        dispatch = dict(pickle._Unpickler.dispatch)

        def find_class(self, module, name):
            found = callables.get((module, name))
            if found is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                found = getattr(torch, name)
            if found is None:
                raise pickle.UnpicklingError(f"it calls {module}.{name}, which is not a DCP metadata type")
            return found

        def _build(self):
            target = self.stack[-2]  # the object; the state is on top
            if isinstance(target, type) or not isinstance(target, buildable):
                raise pickle.UnpicklingError(f"it sets the state of a {type(target).__name__}, which is not a DCP metadata type")
            pickle._Unpickler.load_build(self)

        dispatch[pickle.BUILD[0]] = _build

    class Reader(FileSystemReader):
        """DCP's file reader (tensors load with weights_only=True) that hands over the metadata
        read and checked beforehand instead of unpickling ``.metadata`` itself."""

        def __init__(self, folder, metadata):
            super().__init__(str(folder))
            self._checked = metadata

        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise FileNotFoundError("only the folder's global .metadata is read")
            if self._checked.storage_meta is None:
                self._checked.storage_meta = md.StorageMeta()
            self._checked.storage_meta.load_id = self.load_id
            return self._checked

    class SafeBytes:
        """``load_bytes`` with ``torch.load(weights_only=True)`` (DCP's own: False); what it refuses
        is recorded and raised once the load returns (an error inside DCP's read is wrapped)."""

        refused: list

        def load_bytes(self, read_item, value):
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001: the refusal is raised after the load
                self.refused.append((read_item, err))
                return
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    class Planner(SafeBytes, DefaultLoadPlanner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.refused = []

    class EmptyPlanner(SafeBytes, _EmptyStateDictLoadPlanner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.refused = []

    return {"unpickler": MetadataUnpickler, "reader": Reader, "planner": Planner, "empty_planner": EmptyPlanner,
            "md": md, "storage_info": _StorageInfo}


def read_dcp_metadata(folder: Path):
    """The ``.metadata`` of a DCP folder, read without running code and checked: DCP's own types
    only, every item in a file of this folder and within its size."""
    path = folder / METADATA
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {METADATA} (not a complete DCP checkpoint)")
    safe = _safe_dcp()
    try:
        with open(path, "rb") as f:
            metadata = safe["unpickler"](f).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: {err} (DCP metadata is read with an unpickler that allows only its own "
            "types; nothing from the file ran)"
        ) from None
    except Exception as err:  # noqa: BLE001: any other failure of a malformed pickle
        raise CheckpointError(f"{path}: not a readable DCP metadata file ({type(err).__name__}: {err})") from None
    _check_metadata(metadata, folder, path)
    return metadata


def _check_metadata(metadata, folder: Path, path: Path) -> None:
    safe = _safe_dcp()
    md, storage_info = safe["md"], safe["storage_info"]

    def bad(what):
        raise CheckpointError(f"{path}: {what}")

    if not isinstance(metadata, md.Metadata):
        bad(f"holds a {type(metadata).__name__}, not DCP Metadata")
    items = metadata.state_dict_metadata
    if not isinstance(items, dict) or not all(isinstance(k, str) for k in items):
        bad("its state_dict_metadata is not a dict of names")
    for fqn, entry in items.items():
        if isinstance(entry, md.TensorStorageMetadata):
            props = entry.properties
            if not isinstance(props, md.TensorProperties) or not isinstance(props.dtype, torch.dtype):
                bad(f"tensor {fqn!r} has no dtype")
            if not isinstance(entry.size, torch.Size) or not isinstance(entry.chunks, list) or not all(
                isinstance(c, md.ChunkStorageMetadata) and isinstance(c.offsets, torch.Size)
                and isinstance(c.sizes, torch.Size) for c in entry.chunks
            ):
                bad(f"tensor {fqn!r} has a malformed size or chunk list")
        elif not isinstance(entry, md.BytesStorageMetadata):
            bad(f"item {fqn!r} is a {type(entry).__name__}")
    mappings = metadata.planner_data
    if mappings is not None and (not isinstance(mappings, dict) or not all(
        k in mappings and isinstance(mappings[k], tuple) and all(isinstance(p, (str, int)) for p in mappings[k])
        for k in items
    )):
        bad("its planner_data does not map every item to a key path")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        bad("its storage_data is not a dict")
    sizes: dict[str, int] = {}  # of the files
    stored: dict[str, int] = {}  # bytes stored per item
    for index, info in storage.items():
        if not isinstance(index, md.MetadataIndex) or not isinstance(info, storage_info) or index.fqn not in items:
            bad("its storage_data names an unknown item")
        name = info.relative_path
        if not isinstance(name, str) or not _plain_name(name):
            bad(f"item {index.fqn!r} is stored at {name!r}, outside the checkpoint's folder")
        if name not in sizes:
            file = folder / name
            if not file.is_file():
                bad(f"item {index.fqn!r} is stored in {name}, which is missing")
            sizes[name] = file.stat().st_size
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and 0 <= info.offset
                and 0 <= info.length and info.offset + info.length <= sizes[name]):
            bad(f"item {index.fqn!r} lies outside its file {name} ({sizes[name]} bytes)")
        if info.transform_descriptors:
            bad(f"item {index.fqn!r} is stored with transforms {info.transform_descriptors!r}, which cage does not read")
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
    for fqn, entry in items.items():  # a declared size is allocated when loaded: it must be stored
        if isinstance(entry, md.TensorStorageMetadata):
            declared = entry.size.numel() * entry.properties.dtype.itemsize
            if declared > stored.get(fqn, 0):
                bad(f"tensor {fqn!r} is declared {list(entry.size)} ({declared} bytes), but its stored items "
                    f"hold {stored.get(fqn, 0)} bytes")


def _dcp_load(state: dict, folder: Path, metadata, planner, distributed: bool) -> None:
    """``torch.distributed.checkpoint`` load of ``state`` from ``folder`` through the safe reader
    and ``planner``; an item the planner refused is a CheckpointError naming it and its file."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = _safe_dcp()["reader"](folder, metadata)
    if isinstance(planner, _safe_dcp()["empty_planner"]):
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    else:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=not distributed)
    if planner.refused:
        item, err = planner.refused[0]
        where = metadata.storage_data[item.storage_index].relative_path
        raise CheckpointError(
            f"{folder / where}: item {item.dest_index.fqn!r} refused: {_refusal(err)} (DCP items load "
            "with torch.load(weights_only=True); nothing from the file ran)"
        )


def _checkpoint_threads(out: str | None) -> int | None:
    ckpt = find_checkpoint(Path(out or "."))
    return ckpt.get("threads") if ckpt else None


def checkpoint_config(out: str) -> TrainConfig:
    """The TrainConfig saved in ``out``'s checkpoint (the CLI resumes from it), once the model it
    describes is checked against the stored weights (:func:`check_model_config`)."""
    ckpt = resume_checkpoint(Path(out))
    check_model_config(Path(out), ckpt)
    return TrainConfig.from_dict(ckpt["config"])


def _stored_model_shapes(out: Path, ckpt: dict) -> tuple[Path, dict[str, tuple]]:
    """The checkpoint file that holds the model, and the stored model tensors' shapes."""
    if "dcp" not in ckpt:
        where, model = out / CHECKPOINT, ckpt.get("model")
        if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in model.items()):
            raise CheckpointError(f"{where}: its 'model' is not a dict of named tensors")
        return where, {k: tuple(t.shape) for k, t in model.items()}
    folder = dcp_folder(out, ckpt)
    verify_dcp_files(folder, ckpt, names=[METADATA])  # the small index only; the shards when they are read
    metadata = read_dcp_metadata(folder)
    md = _safe_dcp()["md"]
    return folder / METADATA, {
        fqn.removeprefix("model."): tuple(entry.size) for fqn, entry in metadata.state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(entry, md.TensorStorageMetadata)
    }


def check_model_config(out: Path, ckpt: dict) -> None:
    """The model that the checkpoint's config describes has the stored tensors' names and shapes
    (a CheckpointError naming the file if not). Checked on a meta-device model, before anything
    is built: a config edited to dim 32768 would otherwise allocate that model first."""
    from .build import build_model

    where, stored = _stored_model_shapes(out, ckpt)
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        n_layers = cfg.model_config().n_layers
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{where}: its config does not describe a model: {err}") from None
    if n_layers > len(stored):
        raise CheckpointError(f"{where}: its config says n_layers {n_layers}, but the checkpoint holds "
                              f"{len(stored)} model tensors (every layer has several)")
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build_model(cfg, torch.device("meta"), pretrained=False)[0]
            expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    except (TypeError, ValueError, OverflowError) as err:
        raise CheckpointError(f"{where}: its config does not describe a model: {err}") from None
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: the model its config describes has other tensors than it stores "
                              f"(not stored: {missing[:3]}, not in the model: {extra[:3]})")
    for key, shape in expected.items():
        if stored[key] != shape:
            raise CheckpointError(f"{where}: its config describes {key} as {list(shape)}; the stored tensor is "
                                  f"{list(stored[key])} (the config does not match the weights)")


def _check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in cfg.to_dict().items()
        if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != v
    ]
    if diffs:
        raise ValueError(
            "--resume: the run's settings differ from the checkpoint's, so it would not continue "
            "the same run:\n  " + "\n  ".join(diffs)
        )

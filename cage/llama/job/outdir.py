"""A run's output folder: may the run write there, and what it removes first.

- A folder holding a run (a checkpoint, or the metrics of one) is refused unless the run
  resumes it (``--resume``) or replaces it (``--overwrite``: its run files are deleted).
- A folder left by a run that stopped before its first checkpoint (killed, out of memory,
  diverged: a ``train_log.csv``, a ``loss.png``, TensorBoard events, a DCP folder without its
  ``state.pt``, but no checkpoint and no metrics) holds nothing to continue: ``--resume`` says
  so, and a plain run starts afresh there, replacing those files (it says which).
- One run at a time: a run holds an exclusive ``fcntl.flock`` on the folder itself (no lock
  file) from before it looks at the folder until it returns; a second run on the same folder is
  refused with the holder's process id. The kernel drops the lock when the holder's process
  ends, however it ends (SIGKILL, out of memory), so a dead run never blocks the folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

from .checkpoint import CHECKPOINT, DCP_DIR, METRICS, PLOT, has_checkpoint
from .config import TrainConfig
from .records import TENSORBOARD_DIR, TRAIN_LOG
from .sources import HF_DIR, TOKENIZER_DIR

# Everything a run writes into its folder (and its half-written ``.tmp`` twins): what marks the
# folder as holding a run, and what --overwrite deletes. Other files there are left alone.
# (HF_DIR: the LlamaForCausalLM folder an --hf-model/--hf-config run writes at its end;
# TOKENIZER_DIR: its tokenizer's files, copied there at its start)
RUN_OUTPUTS = (CHECKPOINT, DCP_DIR, METRICS, PLOT, TRAIN_LOG, TENSORBOARD_DIR, HF_DIR, TOKENIZER_DIR)

# what only a run that saved something leaves (a complete checkpoint comes with its metrics)
SAVED_OUTPUTS = (CHECKPOINT, METRICS)


def existing_run_outputs(out: Path) -> list[Path]:
    names = [*RUN_OUTPUTS, *(name + ".tmp" for name in RUN_OUTPUTS)]
    return [out / name for name in names if (out / name).exists()]


def unsaved_run_outputs(out: Path) -> list[Path]:
    """The files of a run that stopped before its first checkpoint ([] when ``out`` holds none,
    or holds a run that saved something: a checkpoint of either format, or metrics)."""
    if not out.is_dir() or has_checkpoint(out) or any((out / name).exists() for name in SAVED_OUTPUTS):
        return []
    return existing_run_outputs(out)


def check_out_path(cfg: TrainConfig) -> None:
    """ValueError unless ``cfg.out`` is a folder or a path that can become one."""
    if not cfg.out:
        return
    out = Path(cfg.out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" ({path} is a file)"
                raise ValueError(f"--out {cfg.out} is not a folder{where}; name a folder for the run's files")
            break


def _lock_holder(folder: Path) -> int | None:
    """The process id holding a flock on ``folder``, from /proc/locks (Linux); None if unknown."""
    try:
        st = folder.stat()
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(inode), int(major, 16), int(minor, 16)) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
                return int(fields[4])
        except ValueError:
            continue
    return None


def _in_use_error(cfg: TrainConfig, out: Path) -> ValueError:
    holder = _lock_holder(out)
    who = "" if holder is None else " (in this process)" if holder == os.getpid() else f" (process {holder})"
    return ValueError(
        f"--out {cfg.out} is in use by another run{who}: wait for it to finish or stop it, or name another "
        "--out (a run that was killed releases the folder at once)"
    )


def check_not_in_use(cfg: TrainConfig) -> None:
    """The ValueError of lock_out_dir if another run holds ``cfg.out`` now (nothing is created
    or kept: for a check before the folder is read, as --resume reads its checkpoint)."""
    if not cfg.out or fcntl is None or not Path(cfg.out).is_dir():
        return
    fd = os.open(cfg.out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use_error(cfg, Path(cfg.out)) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock_out_dir(cfg: TrainConfig):
    """Hold the run's exclusive lock on ``cfg.out`` (created if missing) for the block; a
    ValueError naming the holder when another process (or another call) has it. A folder this
    created and left empty (the run failed before writing) is removed again. Under torchrun
    rank 0 holds it for the job; without ``out`` or without fcntl nothing is locked."""
    if not cfg.out or fcntl is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    check_out_path(cfg)
    out = Path(cfg.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use_error(cfg, out) from None
        try:
            yield
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if empty
            raise
    finally:
        os.close(fd)  # releases the lock


def check_out_dir(cfg: TrainConfig) -> list[Path]:
    """ValueError unless ``cfg.out`` can take this run: a folder (or a path that can become one)
    that holds no earlier run, unless the run resumes it (``resume``, which needs a checkpoint
    there: FileNotFoundError) or replaces it (``overwrite``). Returns the files to delete before
    the run starts: the earlier run's with ``overwrite``, those of a run that stopped before its
    first checkpoint for a plain run."""
    if not cfg.out:
        return []
    check_out_path(cfg)
    out = Path(cfg.out)
    if cfg.resume:
        if not has_checkpoint(out):
            raise FileNotFoundError(no_checkpoint_message(out))
        return []
    if not out.is_dir():
        return []
    if cfg.overwrite:
        return existing_run_outputs(out)
    unsaved = unsaved_run_outputs(out)
    if unsaved:
        return unsaved
    found = existing_run_outputs(out)
    if found:
        raise ValueError(
            f"--out {cfg.out} already holds a run ({', '.join(p.name for p in found)}): add --resume "
            "to continue it, --overwrite to replace it, or name another --out"
        )
    return []


def no_checkpoint_message(out: Path) -> str:
    """What ``--resume`` says when ``out`` holds no checkpoint, and what to do instead."""
    if not out.exists():
        return f"--resume: no checkpoint in {out}: the folder does not exist (start the run without --resume)"
    if unsaved_run_outputs(out):
        return (f"--resume: no checkpoint in {out}: its run stopped before its first checkpoint, so there is "
                "nothing to continue; run the same command without --resume to start it again there "
                "(it replaces that run's files)")
    return (f"--resume: no checkpoint in {out} ({CHECKPOINT} or {DCP_DIR}/): start the run without --resume "
            "(or name the run's --out)")


def clear_run_outputs(cfg: TrainConfig, found: list[Path]) -> list[Path]:
    """Delete ``found`` (what check_out_dir returned) in ``cfg.out``; returns them. Under
    torchrun only rank 0 deletes (the others would race it)."""
    if not (found and cfg.out) or int(os.environ.get("RANK", "0")) != 0:
        return []
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return found

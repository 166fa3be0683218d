"""benchmarks/gpu_session.sh, dry-run on the CPU (Triton's interpreter, tiny sizes, a temporary
$OUT): what would come back from the GPU machine fits its rules (at most 8 files, 16 MiB each,
at most two folders down, plain names), holds the results, and still comes back when a part
fails, hangs past its timeout, or the whole command is stopped.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
MAX_FILES, MAX_BYTES, MAX_FOLDERS = 8, 16 * 2**20, 2
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")

# variables of the session script a caller's environment must not leak into a test
SESSION_VARS = ("GPU_SESSION_PARTS", "GPU_SESSION_FAIL", "GPU_SESSION_HANG", "GPU_SESSION_PART_BYTES",
                "GPU_SESSION_FILE_CAP", "KERNEL_TESTS", "SESSION_BUDGET_S", "DRY_RUN", "STUDY_MINUTES")


def session_env(out: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SESSION_VARS and not k.startswith("CAP_")}
    env.update(OUT=str(out), PYTHON=sys.executable, **{k: str(v) for k, v in extra.items()})
    return env


def run_session(out: Path, *args, timeout=400, **extra) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=session_env(out, **extra),
                          capture_output=True, text=True, timeout=timeout)


def returned_files(out: Path) -> list[Path]:
    """The files the machine would bring back, checked against its rules."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= MAX_FILES, files
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) - 1 <= MAX_FOLDERS, rel
        assert all(NAME_OK.match(part) for part in rel.parts), rel
        assert p.stat().st_size <= MAX_BYTES, (rel, p.stat().st_size)
        assert not p.is_symlink()
    return files


def open_tarball(out: Path) -> tarfile.TarFile:
    """The one tarball, put back together from its pieces when it was split."""
    files = sorted(returned_files(out))
    whole = [p for p in files if p.name.endswith(".tar.gz")]
    pieces = [p for p in files if re.search(r"\.tar\.gz\.part\d$", p.name)]
    assert len(whole) + (1 if pieces else 0) == 1 and len(whole) + len(pieces) == len(files), files
    data = whole[0].read_bytes() if whole else b"".join(p.read_bytes() for p in pieces)
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")


def member_text(tar: tarfile.TarFile, name: str) -> str:
    return tar.extractfile(f"gpu-session/{name}").read().decode()


def parts_table(tar: tarfile.TarFile) -> dict[str, dict]:
    lines = member_text(tar, "parts.tsv").splitlines()
    keys = lines[0].split("\t")
    return {row[0]: dict(zip(keys, row)) for row in (line.split("\t") for line in lines[1:])}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    results = ROOT / "benchmarks" / "results"

    def interpreter_results():  # what the dry run's benchmarks would write there by default
        return {p.name: p.stat().st_mtime for p in results.glob("*-cpu-interpreter.*")}

    before = interpreter_results()
    t0 = time.monotonic()
    proc = run_session(out, DRY_RUN=1)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return out, proc, seconds, interpreter_results() == before


def test_the_dry_run_brings_back_one_tarball_within_the_machines_rules(dry_run):
    out, proc, seconds, results_untouched = dry_run
    files = returned_files(out)
    assert [p.name for p in files] == ["gpu-session-all-dry.tar.gz"]
    assert results_untouched  # nothing written into the checkout's benchmarks/results
    assert "results: gpu-session-all-dry.tar.gz" in proc.stdout
    print(f"dry run: {seconds:.0f} s")


def test_the_tarball_holds_the_junit_the_benchmarks_and_the_environment(dry_run):
    out = dry_run[0]
    with open_tarball(out) as tar:
        names = set(tar.getnames())
        parts = parts_table(tar)
        assert list(parts) == ["env", "sync", "host", "kernels", "optimizer", "fake_quant", "dequant_matmul", "int8_linear",
                               "train_step"]
        assert all(p["status"] == "ok" and p["rc"] == "0" for p in parts.values()), parts
        # the parts' timeouts fit the session's budget, which fits the device's 10 minutes
        assert sum(int(p["timeout_s"]) for p in parts.values()) <= 450

        junit = ET.fromstring(member_text(tar, "junit/kernels.xml"))
        suite = junit if junit.tag == "testsuite" else junit[0]
        assert int(suite.get("tests")) > 0 and suite.get("failures") == "0" and suite.get("errors") == "0"

        for bench in ("optimizer", "fake_quant", "train_step", "host"):
            data = json.loads(member_text(tar, f"bench/{bench}-cpu-interpreter.json"))
            assert data["env"]["gpu_result"] is False and data["env"]["triton_interpret"] is True
        optimizer = json.loads(member_text(tar, "bench/optimizer-cpu-interpreter.json"))
        rows = {r["method"]: r for r in optimizer["sections"][0]["rows"]}
        assert rows["cage-triton-default"]["status"] == rows["cage-triton-found-inf"]["status"] == "ok"
        assert rows["cage-triton-found-inf"]["check"] == "found_inf passed"

        env = json.loads(member_text(tar, "environment.json"))
        assert {"device_name", "torch", "triton", "python", "packages", "session"} <= set(env)
        assert env["session"]["dry_run"] is True and env["packages"]["torch"]

        sync = json.loads(member_text(tar, "sync/sync_debug.json"))
        required = [c for c in sync["checks"] if c["required"]]
        assert len(required) == 2 and all(c["ok"] for c in required), required
        assert {"gpu-session/summary.txt", "gpu-session/logs/kernels.log", "gpu-session/sync/sync_debug.py"} <= names


def test_a_failure_and_a_timeout_still_come_back(tmp_path):
    """One part fails, one hangs past its timeout, the next still runs; the tarball (split into
    pieces here, with a file cut to its end) says so; the exit status is not 0."""
    t0 = time.monotonic()
    proc = run_session(tmp_path, "--dry-run", timeout=120, GPU_SESSION_PARTS="sync,host,dequant_matmul",
                       GPU_SESSION_FAIL="host", GPU_SESSION_HANG="sync", CAP_sync=2,
                       GPU_SESSION_PART_BYTES=300, GPU_SESSION_FILE_CAP=100)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 100  # the hang ended at its timeout
    files = returned_files(tmp_path)
    assert 2 <= len(files) <= 4 and all(p.name.startswith("gpu-session-all-dry.tar.gz.part") for p in files)
    with open_tarball(tmp_path) as tar:
        parts = parts_table(tar)
        assert parts["sync"]["status"] == "timed out" and parts["sync"]["rc"] == "124"
        assert parts["host"]["status"] == "failed" and parts["host"]["rc"] == "3"
        assert parts["dequant_matmul"]["status"] == "ok"  # the parts after a failure still run
        assert "failing on purpose" in member_text(tar, "logs/host.log")
        cut = member_text(tar, "cut-files.txt")
        assert "logs/dequant_matmul.log" in cut
        assert len(member_text(tar, "logs/dequant_matmul.log").encode()) == 100


def test_a_kernel_test_timeout_keeps_the_junit_of_the_tests_that_ran(tmp_path):
    tests = tmp_path / "hang" / "test_hang.py"
    tests.parent.mkdir()
    tests.write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_hangs():\n    time.sleep(300)\n")
    proc = run_session(tmp_path / "out", "--dry-run", timeout=120, GPU_SESSION_PARTS="kernels",
                       KERNEL_TESTS=str(tests), CAP_kernels=8)
    assert proc.returncode != 0
    with open_tarball(tmp_path / "out") as tar:
        assert parts_table(tar)["kernels"]["status"] == "timed out"
        junit = member_text(tar, "junit/kernels.xml")
        assert 'name="test_quick"' in junit  # pytest got SIGINT and wrote what it had


def test_a_stopped_session_packs_what_it_has(tmp_path):
    """SIGTERM to the script (what a caller's timeout sends): the running part is stopped, the
    tarball is packed, the exit status says so."""
    out = tmp_path
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=session_env(out, GPU_SESSION_PARTS="sync,host", GPU_SESSION_HANG="sync"))
    try:
        for line in proc.stdout:
            if "sync: start" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "TERM received" in rest
    with open_tarball(out) as tar:
        parts = parts_table(tar)
        assert parts["sync"]["status"] == "interrupted (TERM)"
        assert "host" not in parts  # nothing started after the signal
        assert parts["session"]["status"] == "interrupted (TERM)"


@pytest.mark.slow
def test_the_study_brings_back_cells_and_report_in_the_tarball(tmp_path):
    proc = run_session(tmp_path, "study", "--dry-run", timeout=300, GPU_SESSION_PARTS="study")
    assert proc.returncode == 0, proc.stdout[-4000:]
    files = returned_files(tmp_path)
    assert [p.name for p in files] == ["gpu-session-study-dry.tar.gz"]
    with open_tarball(tmp_path) as tar:
        names = set(tar.getnames())
    cell = "gpu-session/study-tiny/cells/quest-w4-s0/"
    assert {cell + "metrics.json", cell + "cell.json", cell + "train_log.csv",
            "gpu-session/study-tiny/results/accuracy-tiny.json"} <= names
    assert not any(n.endswith(".pt") for n in names)  # checkpoints stay behind

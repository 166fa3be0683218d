"""The source distribution: it carries the license it declares, and what its own tests need."""

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SOURCES = ("pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "cage", "cage_kernels", "tests", "benchmarks")


def test_sdist_has_the_license_the_tests_and_the_benchmarks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building writes an .egg-info folder next to pyproject.toml
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    build = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
        cwd=src, capture_output=True, text=True, timeout=120,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    log = build.stdout + build.stderr
    assert "deprecated" not in log.lower(), log[-2000:]
    with tarfile.open(tmp_path / build.stdout.strip().splitlines()[-1]) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    expected = {"LICENSE", *(str(p.relative_to(ROOT)) for d in ("tests", "benchmarks") for p in (ROOT / d).glob("*.py"))}
    assert expected <= names, sorted(expected - names)
    assert "License-Expression: Apache-2.0" in pkg_info and "License-File: LICENSE" in pkg_info
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()

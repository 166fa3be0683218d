"""The package's layers: cage_kernels imports nothing from cage, and the runtime (cage) never
imports the application (cage.llama), by import statement or at run time."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}
    return names


def _violations(files, forbidden: str) -> list[str]:
    return [
        f"{f.relative_to(ROOT)} imports {m}"
        for f in files
        for m in sorted(_imported_modules(f))
        if m == forbidden or m.startswith(forbidden + ".")
    ]


def test_runtime_files_never_import_the_application():
    runtime = [f for f in (ROOT / "cage").rglob("*.py") if "llama" not in f.relative_to(ROOT).parts
               and f.name != "__main__.py"]
    assert len(runtime) >= 8
    assert _violations(runtime, "cage.llama") == []


def test_kernels_never_import_cage():
    files = list((ROOT / "cage_kernels").rglob("*.py"))
    assert _violations(files, "cage") == []


def test_the_checker_sees_a_relative_import_of_the_application(tmp_path):
    # the check above must be able to fail: a runtime-level file importing ``.llama``
    fake = ROOT / "cage" / "_layering_probe.py"
    fake.write_text("from .llama.job import train\n")
    try:
        assert _violations([fake], "cage.llama") == ["cage/_layering_probe.py imports cage.llama.job",
                                                    "cage/_layering_probe.py imports cage.llama.job.train"]
    finally:
        fake.unlink()


def test_importing_the_runtime_loads_no_application_module():
    code = (
        "import sys, cage, cage.optim, cage.linear, cage.functional, cage.ops.fake_quant, cage.ops.adamw_cage, cage.ops.packed_linear, cage.testing\n"
        "bad = sorted(m for m in sys.modules if m.startswith('cage.llama'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

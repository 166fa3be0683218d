"""The README's "Train your own Llama" commands run as written from a fresh folder, offline (issue 19's
done-when), with fewer steps: the assets, prepare-data, the fine-tune of the saved model, the export,
and the Python that loads the export."""

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("\n## Train your own Llama\n")
    return text[start: text.index("\n## ", start + 1)]


def test_the_three_commands_and_the_load_run_from_a_fresh_folder(tmp_path):
    bash = re.findall(r"```bash\n(.*?)```", section(), flags=re.S)
    assert len(bash) == 1
    lines = [line for line in bash[0].splitlines() if line.strip()]
    assert [shlex.split(line)[1:4] for line in lines[1:]] == [
        ["-m", "cage", "prepare-data"], ["-m", "cage", "train"], ["-m", "cage", "export"]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for line in lines:
        argv = shlex.split(line.replace("--steps 40", "--steps 4"))
        assert argv[0] == ".venv/bin/python"
        extra = ["--threads", "1", "--eval-batches", "2"] if argv[1:4] == ["-m", "cage", "train"] else []
        proc = subprocess.run([sys.executable, *argv[1:], *extra], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0, line + "\n" + proc.stdout + proc.stderr
        if "cage train" in line.replace("-m cage train", "cage train"):
            assert "the pretrained model (unquantized) had val" in proc.stdout
    assert (tmp_path / "runs" / "tiny-llama" / "hf" / "config.json").is_file()
    python = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?) *```", section(), flags=re.S)]
    assert len(python) == 1
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(python[0], str(README), "exec"), scope)
    finally:
        os.chdir(cwd)
    import cage

    model = scope["model"]
    assert any(isinstance(m, cage.QuantizedLinear) for m in model.modules())
    assert scope["tokenizer"].eos_token == "<|endoftext|>"

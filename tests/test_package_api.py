"""The package as a newcomer meets it (issue 18 item 10): ``import cage`` stays light and
``cage.hf`` works without an import of its own."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True,
                          text=True).stdout


def test_cage_hf_is_a_lazy_attribute():
    out = _run(
        "import sys, cage\n"
        "assert 'cage.hf' not in sys.modules and 'transformers' not in sys.modules\n"
        "f = cage.hf.from_pretrained\n"
        "assert callable(f) and cage.hf is sys.modules['cage.hf'] and 'hf' in dir(cage)\n"
        "try:\n    cage.nope\nexcept AttributeError as e:\n    print('ERR', e)\n"
    )
    assert "ERR module 'cage' has no attribute 'nope'" in out

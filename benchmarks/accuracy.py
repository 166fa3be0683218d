"""Accuracy study (issue 5): a thin wrapper around ``python -m cage sweep``.

    python benchmarks/accuracy.py --preset cpu            # the CPU matrix + ablation (~45-60 min, 2 cores)
    python benchmarks/accuracy.py --preset cpu --report-only
    python benchmarks/accuracy.py --preset 30M            # GPU preset (paper's 30M shape)

Results go to benchmarks/results/accuracy-<preset>.{json,md,png} (the committed ones; ``cage sweep``
alone writes them under its --out folder unless given --results-dir); see cage/llama/sweep/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cage.llama.cli import main  # noqa: E402

if __name__ == "__main__":
    given = sys.argv[1:]
    results = [] if any(a.startswith("--results-dir") for a in given) else [
        "--results-dir", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main(["sweep", *given, *results]))

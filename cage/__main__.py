"""``python -m cage <subcommand>``: see cage/llama/cli.py."""

import sys

from .llama.cli import main

sys.exit(main())

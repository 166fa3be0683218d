"""``python -m cage <subcommand>``: see cage/cli.py."""

import sys

from .cli import main

sys.exit(main())

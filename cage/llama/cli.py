"""The ``cage`` command line: ``cage <subcommand> ...`` or ``python -m cage <subcommand> ...``.

Subcommands are modules listed in SUBCOMMANDS (``cage.llama.job.cli`` and ``cage.llama.sweep.cli`` are examples).
To add one, say ``export``, write a module that defines

    add_arguments(parser: argparse.ArgumentParser) -> None   # its options
    run(args: argparse.Namespace) -> int                     # does the work, returns the exit code

with a module docstring whose first line is the subcommand's one-line help, and add
``"export": "cage.llama.export"`` to SUBCOMMANDS. Errors the user can fix (ValueError,
FileNotFoundError, FloatingPointError) are printed as one message with exit code 2; anything
else keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that defines add_arguments(parser) and run(args)
SUBCOMMANDS: dict[str, str] = {
    "train": "cage.llama.job.cli",
    "sweep": "cage.llama.sweep.cli",
    "export": "cage.llama.export",
    "generate": "cage.llama.generate",
    "prepare-data": "cage.llama.prepare",
}

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cage",
        description="CAGE quantization-aware training: train a Llama model with bf16, ste, quest or cage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run, command = args._run, args.command
    del args._run, args.command
    try:
        return run(args)
    except USER_ERRORS as err:
        print(f"cage {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

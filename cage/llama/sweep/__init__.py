"""The accuracy sweep (``python -m cage sweep``): plan, run the cells, statistics, report."""

from .cells import cell_status, collect, launch, prepare_cell, run_cell, weight_grid_error
from .cli import preset_from_args
from .plan import (DEFAULT_LAMBDA, DEFAULT_SILENCE, METHODS, PLAYS_PLUS_STDLIB, SWEEP_PRESETS, Cell,
                   assemble_plays_plus_stdlib, plan_cells, train_config_dict)
from .report import markdown, plot, write_report
from .stats import aggregate, common_recovered_fraction, paired, recovered_fraction, summarize

__all__ = [
    "Cell", "DEFAULT_LAMBDA", "DEFAULT_SILENCE", "METHODS", "PLAYS_PLUS_STDLIB", "SWEEP_PRESETS", "aggregate",
    "assemble_plays_plus_stdlib", "cell_status", "collect", "common_recovered_fraction", "launch", "markdown",
    "paired", "plan_cells", "plot", "prepare_cell", "preset_from_args", "recovered_fraction", "run_cell",
    "summarize", "train_config_dict", "weight_grid_error", "write_report",
]

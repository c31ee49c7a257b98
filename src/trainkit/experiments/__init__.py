"""Comparisons a person can run and look at: a grid of training runs, a table, plots.

``core`` holds what every comparison shares (cells, the per-cell result cache, tables,
plots); each comparison lives in its own module.
"""

from trainkit.experiments.schedules import COMPARED_SCHEDULES, compare_schedules

__all__ = ["COMPARED_SCHEDULES", "compare_schedules"]

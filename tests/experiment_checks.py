"""Assertions shared by the comparison tests (imported by the test modules beside it)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path


def without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "wall_seconds"} for row in rows]


def assert_rerun_recomputes_only(
    compare: Callable[..., list[dict]], out: Path, first_rows: list[dict], cell: str, cells: int, caplog
) -> None:
    """Delete one cell's cached result and re-run the comparison in ``out``: only that cell is
    trained again, every other cell comes from the cache, and the rows (timings aside) are the same."""
    (out / "cells" / f"{cell}.json").unlink()
    with caplog.at_level(logging.INFO, logger="trainkit"):
        again = compare(out, quick=True)
    assert caplog.text.count(": cached") == cells - 1
    assert caplog.text.count(": running") == 1 and f"{cell}: running" in caplog.text
    assert without_timing(again) == without_timing(first_rows), "the re-run cell reproduces its numbers"

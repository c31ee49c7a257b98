"""``trainkit doctor``: the doctor (trainkit.doctor) on the job that ``trainkit train`` with the
same flags would run — trainkit's recipes and ``MODULE:FUNCTION`` factories alike — built the
same way (seeds, data, model, init, the first training batch), and nothing of it kept but the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from trainkit.checkpoint.rundir import write_atomically
from trainkit.config.schema import TrainConfig
from trainkit.data.runtime import to_device
from trainkit.devices import run_device
from trainkit.doctor import Report, examine
from trainkit.recipes.components import build_run_task, seeded_data_and_model, training_batches

REPORT_FILE = "doctor.json"


def examine_job(config: TrainConfig) -> tuple[Report, dict[str, Any]]:
    """The report on the configured job, and what was examined (model, batch, seconds)."""
    started = time.perf_counter()
    config = config.resolved()
    device = run_device(config.device, deterministic=config.deterministic, tf32=config.tf32)
    config, data, model = seeded_data_and_model(config, device)
    batch = to_device(next(iter(training_batches(config, data).epoch(1))), device)
    report = examine(model, batch, build_run_task(config), config)
    about = {"dataset": config.dataset, "model": config.model, "device": str(device),
             "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
    return report, about


def write_report(report: Report, about: dict[str, Any], out_dir: Path) -> Path:
    """``OUT/doctor.json``: the findings, worst first, and every check with its figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    write_atomically(path, json.dumps({**report.to_dict(), "examined": about}, indent=2) + "\n")
    return path

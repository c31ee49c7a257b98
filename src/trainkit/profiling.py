"""`trainkit profile`: where a training step's time goes, measured on the real training loop.

The configured model and data run through ``Trainer.fit`` itself (so the numbers are those of
``trainkit train``); a callback starts ``torch.profiler`` after the warm-up steps and stops
it N optimizer steps later. The trainer labels each step's phases with ``record_function``
("data", "forward", "backward", "optimizer"), which gives the split of step time; the
operator table says which kernels dominate, and the Chrome trace (chrome://tracing or
https://ui.perfetto.dev) shows it all on a timeline.

On CUDA the phases measure host time (kernels run asynchronously); the operator table's
CUDA columns and the trace show device time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from trainkit.loop.callbacks import Callback, TrainState
from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError
from trainkit.checkpoint.rundir import holding_run_folder
from trainkit.recipes.components import build_run_task, seeded_data_and_model, training_batches
from trainkit.devices import run_device
from trainkit.loop.trainer import Trainer

log = logging.getLogger("trainkit")

PHASES = ("data", "forward", "backward", "optimizer")
TOP_OPERATORS = 15
MAX_PROFILED_STEPS = 1000  # the profiler keeps every event in memory: more steps cost GBs, tell nothing new


@dataclass
class ProfileResult:
    """Mean wall time of a profiled step and of each labelled phase within it (milliseconds)."""

    steps: int
    step_ms: float
    phase_ms: dict[str, float]
    operators: str  # key_averages table, top operators by self CPU time

    @property
    def other_ms(self) -> float:
        """Step time outside the four phases: the loop, callbacks, logging."""
        return max(0.0, self.step_ms - sum(self.phase_ms.values()))

    def shares(self) -> dict[str, float]:
        """Percent of the step per phase (with "other"); sums to 100."""
        total = sum(self.phase_ms.values()) + self.other_ms
        times = {**self.phase_ms, "other": self.other_ms}
        return {name: 100.0 * ms / total for name, ms in times.items()}

    def split_table(self) -> str:
        shares = self.shares()
        rows = [f"| {name} | {ms:.2f} | {shares[name]:.1f}% |"
                for name, ms in {**self.phase_ms, "other": self.other_ms}.items()]  # fmt: skip
        return "\n".join(["| phase | ms/step | share |", "| --- | --- | --- |", *rows,
                          f"| **step** | **{self.step_ms:.2f}** | 100% |"])  # fmt: skip


class _ProfiledEnough(Exception):
    """Internal: ends fit() once the profiled steps are done."""


class StepProfiler(Callback):
    """Profiles optimizer steps ``warmup + 1 .. warmup + steps`` of a fit, then stops it."""

    def __init__(self, profiler: profile, *, warmup_steps: int, steps: int, device: torch.device) -> None:
        self.profiler, self.warmup_steps, self.steps, self.device = profiler, warmup_steps, steps, device
        self.done = 0
        self.started = self.seconds = 0.0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_fit_start(self, state: TrainState) -> None:
        if self.warmup_steps == 0:
            self._start()

    def on_batch_end(self, state: TrainState, loss: torch.Tensor) -> None:
        self.done += 1
        if self.done == self.warmup_steps:
            self._start()
        elif self.done == self.warmup_steps + self.steps:
            self._synchronize()
            self.seconds = time.perf_counter() - self.started
            self.profiler.stop()
            raise _ProfiledEnough

    def _start(self) -> None:
        self._synchronize()
        self.profiler.start()
        self.started = time.perf_counter()


def profile_training(config: TrainConfig, *, steps: int = 20, warmup_steps: int = 5) -> tuple[ProfileResult, Path]:
    """Profile ``steps`` optimizer steps of the configured run after ``warmup_steps``; writes
    profile.txt and trace.json into ``config.out`` (default runs/profile-<time>)."""
    if not 1 <= steps <= MAX_PROFILED_STEPS or not 0 <= warmup_steps <= MAX_PROFILED_STEPS:
        raise ConfigError(f"--steps must be in 1..{MAX_PROFILED_STEPS} and --skip-steps in 0..{MAX_PROFILED_STEPS} "
                          f"(the profiler keeps every event in memory), got {steps} and {warmup_steps}")  # fmt: skip
    config = dataclasses.replace(config, lr=1e-3 if config.lr == "auto" else config.lr).resolved()
    device = run_device(config.device, deterministic=config.deterministic, tf32=config.tf32)
    out_dir = Path(config.out) if config.out else Path("runs") / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    with holding_run_folder(out_dir):
        return _profile(config, device, out_dir, steps=steps, warmup_steps=warmup_steps), out_dir


def _profile(config: TrainConfig, device: torch.device, out_dir: Path, *, steps: int, warmup_steps: int) -> ProfileResult:
    config, data, model = seeded_data_and_model(config, device)
    batches = training_batches(config, data)
    steps_per_epoch = math.ceil(len(batches) / config.accumulate)
    epochs = math.ceil((warmup_steps + steps) / steps_per_epoch) + 1  # fit must not end first
    config = dataclasses.replace(config, epochs=max(epochs, config.epochs or 0), max_steps=None, patience=0)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = profile(activities=activities)
    recorder = StepProfiler(profiler, warmup_steps=warmup_steps, steps=steps, device=device)
    trainer = Trainer(model, config, task=build_run_task(config), callbacks=[recorder])
    try:
        trainer.fit(batches)
    except _ProfiledEnough:
        pass
    result = summarise_profile(profiler, steps=steps, seconds=recorder.seconds, device=device)
    profiler.export_chrome_trace(str(out_dir / "trace.json"))
    (out_dir / "profile.txt").write_text(format_report(result, config, warmup_steps, device) + "\n")
    return result


def summarise_profile(profiler: profile, *, steps: int, seconds: float, device: torch.device) -> ProfileResult:
    """Per-step time of each labelled phase, and the operators that dominate."""
    averages = profiler.key_averages()
    totals = {event.key: event.cpu_time_total for event in averages}  # microseconds, summed over calls
    phase_ms = {name: totals.get(name, 0.0) / 1000.0 / steps for name in PHASES}
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    operators = averages.table(sort_by=sort_by, row_limit=TOP_OPERATORS, max_name_column_width=40)
    return ProfileResult(steps=steps, step_ms=1000.0 * seconds / steps, phase_ms=phase_ms, operators=operators)


def format_report(result: ProfileResult, config: TrainConfig, warmup_steps: int, device: torch.device) -> str:
    return "\n".join([
        (f"trainkit profile: {config.model} on {config.dataset}, batch {config.batch_size} x accumulate "
         f"{config.accumulate}, precision {config.precision}, {device}, "
         f"torch {torch.__version__}, {torch.get_num_threads()} threads"),
        f"{result.steps} optimizer steps after {warmup_steps} warm-up steps, under the profiler",
        "",
        "Split of step time:",
        "",
        result.split_table(),
        "",
        f"Top {TOP_OPERATORS} operators by self time:",
        "",
        result.operators,
    ])  # fmt: skip

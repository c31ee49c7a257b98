"""One worker's loop: claim a trial, train it as an ordinary trainkit run, tell Optuna the outcome.

A trial's run folder holds ``trial.json`` (its number, parameters, settings and state: running,
interrupted, pruned, complete or failed) beside the run's own files. The value Optuna is told is
the run's best monitored value (``summary.json``'s ``best_val_metric``); a pruned trial is told
its last reported value. A trial whose loss went NaN/inf is FAILED (the hyper-parameters
diverge: that is a result); any other error stops the worker and leaves the trial RUNNING, so
that once the cause is fixed, the same command resumes it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from trainkit.loop.callbacks import Callback, TrainState
from trainkit.config.files import recipe_config
from trainkit.errors import NonFiniteLossError, TrainingInterrupted, TrainkitError
from trainkit.recipes.resume import resume_config
from trainkit.recipes.run import train_run
from trainkit.checkpoint.rundir import read_json, release_run_folder, write_atomically
from trainkit.tune.space import trial_settings
from trainkit.tune.study import Claim, TuneSpec, claim_trial, open_study

log = logging.getLogger("trainkit")

TRIAL_FILE = "trial.json"
RESUME_ADVICE = "run the same `trainkit tune` command again: the study continues and a running trial resumes"


class PruneOnValidation(Callback):
    """Reports the objective to Optuna at each validation and stops the run when the pruner says so.

    The step is the epoch, or the optimizer step under ``--val-every-steps``. A resumed trial
    replays the steps it already reported with the decisions already made (stored as the trial's
    ``pruned_at``), so a crash cannot change its outcome.
    """

    def __init__(self, claim: Claim, monitor: str, *, by_steps: bool) -> None:
        self.claim = claim
        self.monitor = monitor
        self.by_steps = by_steps
        self.pruned_at: int | None = claim.pruned_at

    @property
    def state_key(self) -> str:
        return "OptunaPruning"

    def on_validation_end(self, state: TrainState) -> None:
        step = state.global_step if self.by_steps else state.epoch
        value = state.metrics[self.monitor]  # present: the Trainer checks --monitor before training
        if step in self.claim.reported_steps:
            prune = self.pruned_at == step
        else:
            self.claim.trial.report(float(value), step)
            self.claim.reported_steps.add(step)
            prune = self.claim.trial.should_prune()
            if prune:
                self.pruned_at = step
                self.claim.trial.set_user_attr("pruned_at", step)
        if prune:
            unit = "step" if self.by_steps else "epoch"
            state.request_stop(f"trial {self.claim.number} pruned by Optuna at {unit} {step} ({self.monitor} {value:.6g})")


def work(spec: TuneSpec, *, device: str | None = None) -> int:
    """Claim and run trials until the study has ``spec.trials``; returns how many this worker ran.
    ``device``: where this worker's trials train (a --workers GPU), instead of the study's --device."""
    study = open_study(spec)
    done = 0
    while (claim := claim_trial(spec, study)) is not None:
        try:
            run_trial(spec, claim, device)
        finally:
            release_run_folder(claim.folder)
        done += 1
    return done


def run_trial(spec: TuneSpec, claim: Claim, device: str | None = None) -> None:
    import optuna

    settings = trial_settings(spec.base, spec.dimensions, claim.params)
    if device is not None:
        settings["device"] = device
    write_trial_file(claim, "running", settings)
    log.info("trial %d%s: %s", claim.number, " (resumed)" if claim.resumed else "", describe_params(claim.params))
    try:
        summary = trained_summary(spec, claim, settings)
    except NonFiniteLossError as exc:
        claim.trial.set_user_attr("error", str(exc))
        write_trial_file(claim, tell(claim, optuna.trial.TrialState.FAIL), settings, error=str(exc))
        log.warning("trial %d failed: %s", claim.number, exc)
        return
    except TrainingInterrupted as exc:
        claim.trial.set_user_attr("interrupted", str(exc))
        write_trial_file(claim, "interrupted", settings, error=str(exc))
        raise TrainingInterrupted(f"trial {claim.number}: {exc}", checkpoint=exc.checkpoint, advice=RESUME_ADVICE) from None
    except TrainkitError as exc:  # the user's to fix (data, a factory): the trial stays RUNNING, to resume
        raise type(exc)(f"trial {claim.number} ({describe_params(claim.params)}): {exc}") from None
    value = summary.get("best_val_metric")
    pruned_at = claim.trial.user_attrs.get("pruned_at")
    states = optuna.trial.TrialState
    if pruned_at is not None:
        state = tell(claim, states.PRUNED)
    elif value is None or not math.isfinite(value):
        state = tell(claim, states.FAIL)
    else:
        state = tell(claim, states.COMPLETE, value)
    write_trial_file(claim, state, settings, value=value, pruned_at=pruned_at)
    log.info("trial %d %s: %s %s%s", claim.number, state, spec.monitor, value,
             f" (pruned at {pruned_at})" if pruned_at is not None else "")  # fmt: skip


def tell(claim: Claim, state: Any, value: float | None = None) -> str:
    """Tell the study how the trial ended (a pruned one: its last reported value); one told just before an
    earlier process died stays as told. Returns the state's name for trial.json."""
    try:
        claim.trial.study.tell(claim.number, value, state=state, skip_if_finished=True)
    except RuntimeError as exc:
        # GridSampler calls study.stop() after the grid's last point, which ask-and-tell refuses
        # (documented in GridSampler; optuna/optuna#5141): the trial is stored by then, and
        # --trials (at most the grid's size) ends the study instead.
        if "Study.stop" not in str(exc):
            raise
    return state.name.lower()


def trained_summary(spec: TuneSpec, claim: Claim, settings: dict[str, Any]) -> dict[str, Any]:
    """The trial's run summary: read when it finished before (the tuner died before telling
    Optuna), else trained: resumed from its checkpoints when its folder holds a run."""
    summary_path = claim.folder / "summary.json"
    if summary_path.is_file():
        return read_json(summary_path, "the trial's summary")
    if (claim.folder / "config.json").is_file():  # (the device may differ: another worker's GPU)
        where = {"device": settings["device"]} if "device" in settings else {}
        config, resume = resume_config(claim.folder, {"out": str(claim.folder), **where}), True
    else:
        config, resume = recipe_config({**settings, "out": str(claim.folder)}, source=f"trial {claim.number}"), False
    pruning = PruneOnValidation(claim, spec.monitor, by_steps=bool(config.val_every_steps))
    return train_run(config, resume=resume, extra_callbacks=[pruning])


def write_trial_file(claim: Claim, state: str, settings: dict[str, Any], **extra: Any) -> None:
    record = {"number": claim.number, "state": state, "params": claim.params, "resumed": claim.resumed,
              "settings": settings, **{key: value for key, value in extra.items() if value is not None}}  # fmt: skip
    write_atomically(claim.folder / TRIAL_FILE, json.dumps(record, indent=2, default=str) + "\n")


def read_trial_file(folder: Path) -> dict[str, Any]:
    return read_json(folder / TRIAL_FILE, "the trial's record")


def describe_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in params.items())  # fmt: skip

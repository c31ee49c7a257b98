"""Run logging beyond history.csv: TensorBoard and MLflow, continued into the same run on resume.

``RunLogger`` is a callback. Every ``every_steps`` optimizer steps it keeps the step's loss, the
pre-clip gradient norm and the clip rate since the last logged step as device tensors (no
host sync) with the lr; each history row (epoch ends, ``--val-every-steps`` points) is kept
with the optimizer step it was measured at. Kept rows go to the backends at each epoch's end
and at the end of training: one host sync per epoch. Rows not yet written are part of every
checkpoint, with each backend's run id and the last step written, so a run killed (even by
SIGKILL) and resumed writes every step exactly once into the same logged run:

- a step after the checkpoint was trained again after the resume (same values: resume is
  exact), so what the killed process wrote after it is dropped — TensorBoard by a purge at
  the first step after the last one written (its reader discards earlier events from that
  step on), MLflow by not writing steps the store already holds (its points cannot be deleted);
- a step before the checkpoint that was not yet written is in the checkpoint's kept rows.

The backends' packages are optional extras (``pip install trainkit[logging]``); naming a
backend without its package is a one-line error before training.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainkit.loop.callbacks import Callback, TrainState
from trainkit.errors import ConfigError

log = logging.getLogger("trainkit")

LOGGERS = ("csv", "tensorboard", "mlflow")  # csv (history.csv) is always written
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # backend -> the module it needs
STEP_KEYS = ("loss", "lr", "grad_norm", "clip_rate")  # per-step values, logged as "step/<key>"


def check_loggers(names: Sequence[str]) -> list[str]:
    """The backends to open (csv dropped: it is always on); a one-line error for an unknown one
    or one whose package is missing."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"--logger {name!r} is not one of {', '.join(LOGGERS)}")
    backends = [name for name in dict.fromkeys(names) if name != "csv"]
    for name in backends:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"--logger {name} needs the {PACKAGES[name]} package: pip install 'trainkit[logging]'")
    return backends


def default_mlflow_uri(out_dir: Path) -> str:
    """The embedded store: one SQLite file beside the run folders, so runs of one folder compare."""
    return f"sqlite:///{(Path(out_dir).resolve().parent / 'mlflow.db').as_posix()}"


class TensorBoardBackend:
    """``torch.utils.tensorboard.SummaryWriter`` writing into ``OUT/tensorboard``."""

    name = "tensorboard"

    def __init__(self, out_dir: Path) -> None:
        self.log_dir = Path(out_dir) / "tensorboard"
        self.writer: Any = None

    def open(self, saved: dict[str, Any] | None, first_unwritten: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events the killed process wrote from first_unwritten on are discarded by readers.
        purge = first_unwritten if saved is not None else None
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=3600)

    def write(self, points: list[tuple[int, str, float]]) -> None:
        for step, key, value in points:
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, hparams: dict[str, Any], final: dict[str, float], images: Sequence[Path]) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_hparams(hparams, {f"final/{key}": value for key, value in final.items()}, run_name=".")
        for path in images:
            self.writer.add_image(f"plots/{path.stem}", np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")
        self.writer.flush()

    def state(self) -> dict[str, Any]:
        return {"log_dir": str(self.log_dir)}

    def where(self) -> str:
        return str(self.log_dir)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowBackend:
    """An MLflow run through ``MlflowClient`` (no global active run), created once and reopened on resume."""

    name = "mlflow"

    def __init__(self, out_dir: Path, uri: str | None, experiment: str, run_name: str) -> None:
        self.out_dir = Path(out_dir)
        self.uri = uri or default_mlflow_uri(self.out_dir)
        self.experiment = experiment
        self.run_name = run_name
        self.client: Any = None
        self.run_id: str | None = None
        self.written_through = -1  # the highest step the store holds (resume: never written twice)

    def open(self, saved: dict[str, Any] | None, first_unwritten: int) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        if saved is not None and saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.written_through = self._highest_step()
            return
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
            self.experiment, artifact_location=(self.out_dir.resolve().parent / "mlartifacts").as_uri()
        )
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id

    def _highest_step(self) -> int:
        keys = self.client.get_run(self.run_id).data.metrics
        steps = [point.step for key in keys for point in self.client.get_metric_history(self.run_id, key)]
        return max(steps, default=-1)

    def write(self, points: list[tuple[int, str, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for step, key, value in points if step > self.written_through]
        for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def finish(self, hparams: dict[str, Any], final: dict[str, float], files: Sequence[Path]) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        params = [Param(key, str(value)[:6000]) for key, value in hparams.items()]
        logged = self.client.get_run(self.run_id).data.params
        params = [param for param in params if param.key not in logged]  # a resumed run logged them already
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_batch(self.run_id, metrics=[Metric(f"final/{k}", v, now, 0) for k, v in final.items()])
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FINISHED")

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.uri}

    def where(self) -> str:
        return f"the tracking store {self.uri}"

    def close(self) -> None:
        pass


class RunLogger(Callback):
    """Logs per-step values and history rows to the backends (see the module docstring)."""

    def __init__(self, backends: Sequence[Any], *, every_steps: int = 50, clip_norm: float | None = None,
                 enabled: bool = True) -> None:  # fmt: skip
        if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1:
            raise ConfigError(f"--log-every-steps must be an integer >= 1, got {every_steps!r}")
        self.backends = list(backends) if enabled else []
        self.every_steps = every_steps
        self.clip_norm = clip_norm
        self.kept_steps: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, [loss, grad_norm, clip_rate])
        self.kept_rows: list[tuple[int, dict[str, float]]] = []  # (step, history row)
        self.written_through = -1  # the highest step written to every backend
        self.saved_backends: dict[str, dict[str, Any]] | None = None  # from a checkpoint
        self._clipped: torch.Tensor | float = 0.0
        self._grad_norm: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return "RunLogger"

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, state: TrainState) -> None:
        """Open each backend (reopen its run on resume) before the first step; a store that cannot be
        opened (a wrong --mlflow-uri, an unwritable folder) is a one-line error, not a library traceback."""
        for backend in self.backends:
            saved = None if self.saved_backends is None else self.saved_backends.get(backend.name)
            try:
                backend.open(saved, self.written_through + 1)
            except Exception as exc:  # noqa: BLE001 - whatever the backend's library raises
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"--logger {backend.name} could not open {backend.where()}: {detail}; "
                                  f"check the location (--mlflow-uri, --out) or drop {backend.name}") from None  # fmt: skip

    def on_before_optimizer_step(self, state: TrainState, grad_norm: torch.Tensor) -> None:
        if not self.backends:
            return
        if self.clip_norm:
            self._clipped = self._clipped + (grad_norm > self.clip_norm)
        self._grad_norm = grad_norm

    def on_batch_end(self, state: TrainState, loss: torch.Tensor) -> None:
        if not self.backends or state.global_step % self.every_steps or self._grad_norm is None:
            return
        # one device for the three (the norm may be a host tensor under FSDP offload; _clipped a number)
        device = loss.device
        values = torch.stack([loss.float(), self._grad_norm.to(device).float(),
                              torch.as_tensor(self._clipped, device=device).float() / self.every_steps])  # fmt: skip
        self.kept_steps.append((state.global_step, state.lr, values.detach()))
        self._clipped = 0.0

    def on_validation_end(self, state: TrainState) -> None:
        if self.backends:
            self.kept_rows.append((state.global_step, state.metrics))  # the row itself: later callbacks' additions count

    def on_epoch_end(self, state: TrainState) -> None:
        self.write_kept()

    def on_fit_end(self, state: TrainState) -> None:
        self.write_kept()

    # ------------------------------------------------------------------ writing
    def points(self) -> list[tuple[int, str, float]]:
        """The kept values as (step, key, value), read back from the device in one transfer."""
        points: list[tuple[int, str, float]] = []
        if self.kept_steps:
            device = self.kept_steps[-1][2].device  # those restored from a checkpoint are on the host
            values = torch.stack([v.to(device) for _, _, v in self.kept_steps]).tolist()
            for (step, lr, _), (loss, grad_norm, clip_rate) in zip(self.kept_steps, values):
                row = {"loss": loss, "lr": lr, "grad_norm": grad_norm}
                if self.clip_norm:
                    row["clip_rate"] = clip_rate
                points += [(step, f"step/{key}", value) for key, value in row.items()]
        for step, row in self.kept_rows:
            points += [(step, f"epoch/{key}", float(value)) for key, value in row.items()
                       if isinstance(value, (int, float)) and math.isfinite(value)]  # fmt: skip
        return sorted(points, key=lambda point: point[0])

    def write_kept(self) -> None:
        if not self.backends or not (self.kept_steps or self.kept_rows):
            return
        points = self.points()
        for backend in self.backends:
            backend.write(points)
        self.written_through = max(self.written_through, points[-1][0])
        self.kept_steps, self.kept_rows = [], []

    def finish(self, hparams: dict[str, Any], final: dict[str, float], files: Sequence[Path]) -> None:
        """After the run's outputs exist: hyper-parameters with the final metrics, the plots (and for
        MLflow the weights) as artifacts; then the backends are closed."""
        for backend in self.backends:
            wanted = [path for path in files if path.suffix == ".png"] if backend.name == "tensorboard" else files
            backend.finish(hparams, final, wanted)
            backend.close()

    def describe(self) -> dict[str, dict[str, Any]]:
        """Where each backend logs (summary.json's "logs"): the TensorBoard folder, the MLflow store and run id."""
        return {backend.name: backend.state() for backend in self.backends}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "kept_steps": [(step, lr, values) for step, lr, values in self.kept_steps],
            "kept_rows": [(step, dict(row)) for step, row in self.kept_rows],
            "written_through": self.written_through,
            "backends": self.describe(),
            "clipped": self._clipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept_steps = [tuple(entry) for entry in state["kept_steps"]]
        self.kept_rows = [tuple(entry) for entry in state["kept_rows"]]
        self.written_through = state["written_through"]
        self.saved_backends = state["backends"]
        self._clipped = state["clipped"]

"""trainkit's tasks by name (``TASKS``): classification, multi-label, regression and next-token
prediction, and ``as_task``, which builds one from a name, a loss and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from trainkit.errors import ConfigError
from trainkit.tasks.base import Samples, Task


def check_label_smoothing(value: Any, loss_fn: Callable | None) -> float:
    """Label smoothing in [0, 1) for the task's own cross-entropy (a given loss_fn carries its own)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"label_smoothing must be a number in [0, 1), got {value!r}")
    if value and loss_fn is not None:
        raise ConfigError("label_smoothing sets the task's own cross-entropy; give the smoothing to your loss_fn instead")
    return float(value)


class Classification(Task):
    """Cross-entropy over classes on dim 1 (also (N, C, d...) outputs with (N, d...) targets).

    ``label_smoothing`` (torch's): the target class gets 1 - s and every class s / classes; the
    validation loss is the same smoothed loss, so compare accuracies across smoothing values."""

    name = "classification"
    objective = "accuracy"
    class_dim = 1

    def __init__(
        self, loss_fn: Callable | None = None, *, top_k: int | None = None, label_smoothing: float = 0.0, **options: Any
    ) -> None:
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2):
            raise ConfigError(f"top_k must be an integer >= 2 (top-1 accuracy is always reported), got {top_k!r}")
        self.top_k = top_k
        self.label_smoothing = check_label_smoothing(label_smoothing, loss_fn)
        super().__init__(loss_fn, **options)

    def default_loss(self) -> Callable:
        return nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)

    def default_metrics(self) -> dict[str, Any]:
        from trainkit.tasks.metrics import Accuracy

        metrics: dict[str, Any] = {"accuracy": Accuracy()}
        if self.top_k is not None:
            metrics[f"top{self.top_k}_accuracy"] = Accuracy(top_k=self.top_k)
        return metrics

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(outputs, self.guarded(outputs, targets))


class MultiLabel(Task):
    """Independent yes/no per label: BCE on logits; targets 0/1 of the outputs' shape."""

    name = "multilabel"
    objective = "f1"

    def default_loss(self) -> Callable:
        return nn.BCEWithLogitsLoss()

    def default_metrics(self) -> dict[str, Any]:
        return {"exact_match": "exact_match", "f1": "f1"}

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        require_same_shape(outputs, targets, self.name)
        return self.loss_fn(outputs, targets.to(outputs.dtype))


class Regression(Task):
    """Mean squared error; an (N, 1) output is compared with (N,) targets without broadcasting."""

    name = "regression"

    def default_loss(self) -> Callable:
        return nn.MSELoss()

    def default_metrics(self) -> dict[str, Any]:
        return {"mae": "mae", "r2": "r2"}

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if outputs.numel() != targets.numel():
            raise ConfigError(
                f"regression outputs of shape {tuple(outputs.shape)} do not match targets of shape "
                f"{tuple(targets.shape)}: the model must return one value per target"
            )
        # MSELoss would silently broadcast (N, 1) against (N,) into (N, N)
        return self.loss_fn(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


class NextToken(Task):
    """Language modelling: (B, T, V) logits against (B, T) next-token ids; ``ignore_index`` positions
    (padding) count for nothing, so ``samples`` is the number of real target tokens."""

    name = "next_token"
    class_dim = -1

    def __init__(
        self, loss_fn: Callable | None = None, *, ignore_index: int = -100, label_smoothing: float = 0.0, **options: Any
    ) -> None:
        self.ignore_index = ignore_index
        self.label_smoothing = check_label_smoothing(label_smoothing, loss_fn)
        super().__init__(loss_fn, **options)

    def default_loss(self) -> Callable:
        return nn.CrossEntropyLoss(ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def default_metrics(self) -> dict[str, Any]:
        from trainkit.tasks.metrics import TokenAccuracy

        return {"token_accuracy": TokenAccuracy(ignore_index=self.ignore_index)}

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        require_token_shapes(outputs, targets)
        logits = outputs.reshape(-1, outputs.shape[-1])
        return self.loss_fn(logits, self.guarded(logits, targets.reshape(-1)))

    def count(self, targets: Tensor) -> Samples:
        return (targets != self.ignore_index).sum()

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        loss = metrics.get("loss")
        return {} if loss is None else {"perplexity": math.exp(loss) if loss < 700 else math.inf}


TASKS: dict[str, type[Task]] = {
    "classification": Classification, "multilabel": MultiLabel, "regression": Regression, "next_token": NextToken,
}  # fmt: skip
SMOOTHED_TASKS = ("classification", "next_token")  # the cross-entropy tasks: they take label_smoothing


def build_task(name: str, *, label_smoothing: float = 0.0, **options: Any) -> Task:
    if name not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}; got {name!r}")
    if label_smoothing:
        if name not in SMOOTHED_TASKS:
            raise ConfigError(f"label smoothing applies to {', '.join(SMOOTHED_TASKS)}, not the {name} task")
        options["label_smoothing"] = label_smoothing
    return TASKS[name](**options)


def as_task(
    task: Task | str | None = None,
    *,
    loss_fn: Callable | None = None,
    metrics: Mapping[str, Any] | list[str] | tuple[str, ...] | None = None,
    step: Callable | None = None,
    label_smoothing: float = 0.0,
) -> Task:
    """The Trainer's task: a Task as given, or one built from a name (default: classification, or
    a plain Task around ``step`` when only a step function is given) with these options."""
    options = {"loss_fn": loss_fn, "metrics": metrics, "step": step}
    if isinstance(task, Task):
        given = [name for name, value in options.items() if value is not None] + (["label_smoothing"] if label_smoothing else [])
        if given:
            raise ConfigError(f"pass {', '.join(given)} to the Task itself, not beside it")
        return task
    if task is None and step is not None:
        if label_smoothing:
            raise ConfigError("label_smoothing sets a built-in task's cross-entropy; a step function computes its own loss")
        return Task(**options)
    if task is None:
        task = "classification"
    if isinstance(task, str):
        return build_task(task, label_smoothing=label_smoothing, **options)
    raise ConfigError(f"task must be a trainkit Task or one of {', '.join(TASKS)}; got {type(task).__name__}")


def named_loss(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    loss_class = getattr(nn, name, None)
    if not (isinstance(loss_class, type) and issubclass(loss_class, nn.modules.loss._Loss)):
        losses = (getattr(nn, n) for n in dir(nn))
        known = sorted(c.__name__ for c in losses if isinstance(c, type) and issubclass(c, nn.modules.loss._Loss))
        raise ConfigError(f"--loss {name!r} is not a torch.nn loss; choose one of {', '.join(known)}")
    return loss_class()


def require_same_shape(outputs: Tensor, targets: Tensor, task: str) -> None:
    if outputs.shape != targets.shape:
        raise ConfigError(
            f"{task} outputs of shape {tuple(outputs.shape)} do not match targets of shape {tuple(targets.shape)}"
        )


def require_token_shapes(outputs: Tensor, targets: Tensor) -> None:
    """(B, T, V) logits for (B, T) targets; (B, V, T) is refused rather than silently misread."""
    if outputs.dim() != 3 or targets.dim() != 2 or outputs.shape[:2] != targets.shape:
        raise ConfigError(
            f"next-token logits must be (batch, time, vocab) for targets (batch, time); got logits "
            f"{tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            + (" (vocab on dim 1? use logits.transpose(1, 2))" if outputs.dim() == 3 and outputs.shape[2:] == targets.shape[1:] else "")
        )

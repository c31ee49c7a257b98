"""Tasks: how a batch becomes a loss, what one batch counts for, and what is measured.

The loop never looks inside a batch; it asks the task. A ``Task``

- ``split``s a batch into (inputs, targets): ``(x, y)``, ``((x1, x2), y)``, or a dict /
  dataclass whose target sits under ``target_key`` (``targets``, ``labels``, ``y`` ... by default);
- calls the model with the inputs as they come: ``model(x)``, ``model(x1, x2)``, ``model(**inputs)``;
- takes the model's own loss when it returns one (a dict or object with ``loss``, as Hugging
  Face models do), else computes ``loss_fn(outputs, targets)``;
- says how many ``samples`` the batch's mean loss averages over (rows, elements, tokens).
  The loop weights each micro-batch by it, so an accumulation group's loss is the mean over
  all of its samples even when batches differ in length. It is known from the batch before the
  forward pass: each micro-batch's weight must be fixed before its backward.

A user ``step(model, batch)`` replaces the whole forward-and-loss for anything else; it returns a
loss tensor, a dict with ``loss``, or a ``StepOutput``.

Built in: ``Classification`` (top-1/top-k accuracy), ``MultiLabel`` (BCE with logits, exact
match, F1), ``Regression`` (MSE loss, MAE, R²) and ``NextToken`` (per-token cross-entropy with an
ignore index, perplexity, token accuracy). ``TASKS`` is the one list of their names.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from trainkit.errors import ConfigError
from trainkit.metrics import MetricSet
from trainkit.runtime import batch_rows, map_tensors

TARGET_KEYS = ("targets", "target", "labels", "label", "y")
Samples = int | Tensor


@dataclass(frozen=True)
class StepOutput:
    """One micro-batch's result. ``loss`` is its mean loss; ``outputs``/``targets`` (detached by
    the loop) feed the metrics and callbacks; either may be None."""

    loss: Tensor
    outputs: Any = None
    targets: Any = None


class Task:
    """A task with no built-in loss or metrics: give ``loss_fn`` and/or ``metrics``, or a ``step``.

    ``metrics``: a mapping of name -> metric (a trainkit Metric, a torchmetrics Metric, a function
    ``fn(outputs, targets) -> Tensor`` or a built-in name) or a list of built-in names.
    ``samples``: ``fn(batch) -> int | Tensor`` when the default count (see ``count``) is wrong.
    """

    name = "custom"
    objective = "loss"  # what `trainkit tune` optimises by default: val_<objective>

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        *,
        metrics: Mapping[str, Any] | list[str] | tuple[str, ...] | None = None,
        step: Callable[[nn.Module, Any], Any] | None = None,
        samples: Callable[[Any], Samples] | None = None,
        target_key: str | None = None,
    ) -> None:
        for label, value in (("loss_fn", loss_fn), ("step", step), ("samples", samples)):
            if value is not None and not callable(value):
                raise ConfigError(f"{label} must be callable, got {type(value).__name__}")
        self.loss_fn = loss_fn if loss_fn is not None else self.default_loss()
        self.user_step = step
        self.user_samples = samples
        self.target_key = target_key
        chosen = self.default_metrics() if metrics is None else metrics
        if isinstance(chosen, (list, tuple)):
            chosen = {name: name for name in chosen}
        if not isinstance(chosen, Mapping):
            raise ConfigError(f"metrics must be a mapping of name -> metric or a list of names, got {type(chosen).__name__}")
        self.metric_specs = dict(chosen)
        self._takes_targets: dict[tuple[int, str | None], bool] = {}

    # ------------------------------------------------------ what a subclass sets
    def default_loss(self) -> Callable[[Any, Any], Tensor] | None:
        return None

    def default_metrics(self) -> dict[str, Any]:
        return {}

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        """Values computed from the others once per epoch (e.g. perplexity from the loss)."""
        return {}

    # ----------------------------------------------------------- the step
    def new_metrics(self) -> MetricSet:
        """Fresh accumulators (one set for training, one per evaluation): each metric is copied,
        so training and validation never add into the same sums."""
        return MetricSet({name: copy.deepcopy(spec) for name, spec in self.metric_specs.items()})

    def monitorable(self, loop_metrics: tuple[str, ...] = ()) -> list[str]:
        """Every history name this task produces (train_* and val_*), then the loop's own."""
        names = ["loss", *self.metric_specs, *self.derived({"loss": 1.0})]
        return [f"{split}_{name}" for split in ("val", "train") for name in names] + list(loop_metrics)

    def split(self, batch: Any) -> tuple[Any, Any]:
        """(inputs, targets) of a batch; targets None when the batch has none (the model's own loss)."""
        if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
            if len(batch) == 2:
                return batch[0], batch[1]
            raise ConfigError(
                f"a batch tuple must be (inputs, targets), got {len(batch)} items; put several inputs in a "
                f"tuple, ((x1, x2), y), or use dict batches with a {TARGET_KEYS[0]!r} key"
            )
        batch = as_mapping(batch)
        if isinstance(batch, Mapping):
            key = self._target_key_of(batch)
            inputs = {k: v for k, v in batch.items() if k != key}
            return inputs, batch.get(key) if key is not None else None
        return batch, None

    def _target_key_of(self, batch: Mapping) -> str | None:
        if self.target_key is not None:
            if self.target_key not in batch:
                raise ConfigError(f"the batch has no {self.target_key!r} (target_key); its keys: {', '.join(map(str, batch))}")
            return self.target_key
        return next((key for key in TARGET_KEYS if key in batch), None)

    def forward(self, model: Callable[..., Any], inputs: Any) -> Any:
        """The model called with the inputs as they come: a tensor, positional tuple or keyword dict."""
        if isinstance(inputs, Tensor):
            return model(inputs)
        if isinstance(inputs, Mapping):
            try:
                return model(**inputs)
            except TypeError as exc:
                raise_if_keys_do_not_fit(model, inputs, exc)
                raise
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)

    def step(self, model: Callable[..., Any], batch: Any) -> StepOutput:
        """Forward and loss for one micro-batch (the user's ``step`` when given)."""
        if self.user_step is not None:
            return as_step_output(self.user_step(model, batch), self.user_step)
        inputs, targets = self.split(batch)
        if targets is not None and isinstance(inputs, Mapping):
            key = self._target_key_of(as_mapping(batch))
            if self._model_takes_targets(model, key):
                inputs = {**inputs, key: targets}  # a Hugging Face model computes its own loss from them
        outputs = self.forward(model, inputs)
        if type(outputs) is not Tensor:  # a plain tensor is the common case: nothing to unpack
            own_loss, logits = model_loss(outputs), model_logits(outputs)
            if own_loss is not None:
                return StepOutput(own_loss, logits, targets)
            if logits is not None:
                outputs = logits  # {"logits": ...} without a loss: the task's loss on the logits
        if targets is None:
            raise ConfigError(
                "the batch has no targets and the model returned no loss: give (inputs, targets) batches, a dict "
                f"with one of the keys {', '.join(TARGET_KEYS)}, a model that returns a loss, or a step function"
            )
        if self.loss_fn is None:
            raise ConfigError(f"the {self.name} task has no loss function: pass loss_fn= (or --loss)")
        return StepOutput(self.loss(outputs, targets), outputs, targets)

    def _model_takes_targets(self, model: Callable[..., Any], target_key: str | None) -> bool:
        """Does the model's forward name the batch's target key (``labels``)? Asked once per model."""
        key = (id(model), target_key)
        if key not in self._takes_targets:
            self._takes_targets[key] = takes_keyword(model, target_key)
        return self._takes_targets[key]

    def loss(self, outputs: Any, targets: Any) -> Tensor:
        return self.loss_fn(outputs, targets)

    def samples(self, batch: Any) -> Samples:
        """What this batch's mean loss averages over; its weight in an accumulation group."""
        if self.user_samples is not None:
            return self.user_samples(batch)
        if self.user_step is not None:
            return batch_rows(batch)
        _, targets = self.split(batch)
        return self.count(targets) if isinstance(targets, Tensor) else batch_rows(batch)

    def count(self, targets: Tensor) -> Samples:
        """Default: every target element (a mean-reduced loss averages over all of them)."""
        return targets.numel()

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
        from trainkit.metrics import Accuracy

        metrics: dict[str, Any] = {"accuracy": Accuracy()}
        if self.top_k is not None:
            metrics[f"top{self.top_k}_accuracy"] = Accuracy(top_k=self.top_k)
        return metrics


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

    def __init__(
        self, loss_fn: Callable | None = None, *, ignore_index: int = -100, label_smoothing: float = 0.0, **options: Any
    ) -> None:
        self.ignore_index = ignore_index
        self.label_smoothing = check_label_smoothing(label_smoothing, loss_fn)
        super().__init__(loss_fn, **options)

    def default_loss(self) -> Callable:
        return nn.CrossEntropyLoss(ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def default_metrics(self) -> dict[str, Any]:
        from trainkit.metrics import TokenAccuracy

        return {"token_accuracy": TokenAccuracy(ignore_index=self.ignore_index)}

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        require_token_shapes(outputs, targets)
        return self.loss_fn(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

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


def raise_if_keys_do_not_fit(model: Callable[..., Any], inputs: Mapping, exc: TypeError) -> None:
    """A dict batch whose keys the model's forward does not take: one line naming both, instead of
    a TypeError from deep inside the call (checked only after the call failed: free otherwise)."""
    try:
        inspect.signature(unwrapped_forward(model)).bind(**inputs)
    except TypeError:
        raise ConfigError(
            f"the model's forward does not take the batch's keys ({', '.join(map(str, inputs))}): {exc}; name "
            f"forward's parameters after the keys, or pass a step(model, batch) function"
        ) from None
    except ValueError:
        pass


def unwrapped_forward(model: Callable[..., Any]) -> Callable[..., Any]:
    """The user's forward under a DDP or torch.compile wrapper."""
    module = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return module.forward if module is not None else getattr(model, "forward", model)


def as_mapping(batch: Any) -> Any:
    """A dataclass batch as the dict of its fields; anything else as it is."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return batch


def takes_keyword(model: Callable[..., Any], name: str | None) -> bool:
    """Whether ``model``'s forward has a parameter called ``name`` (e.g. ``labels``); not **kwargs:
    a model that accepts anything did not ask for its targets."""
    if name is None:
        return False
    try:
        parameter = inspect.signature(unwrapped_forward(model)).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def named_loss(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    loss_class = getattr(nn, name, None)
    if not (isinstance(loss_class, type) and issubclass(loss_class, nn.modules.loss._Loss)):
        losses = (getattr(nn, n) for n in dir(nn))
        known = sorted(c.__name__ for c in losses if isinstance(c, type) and issubclass(c, nn.modules.loss._Loss))
        raise ConfigError(f"--loss {name!r} is not a torch.nn loss; choose one of {', '.join(known)}")
    return loss_class()




def model_loss(outputs: Any) -> Tensor | None:
    """The loss a model returned itself (dict or object with ``loss``), else None."""
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    else:
        loss = getattr(outputs, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def model_logits(outputs: Any) -> Any:
    """What the metrics see of a model that returned its own loss: its ``logits`` if any."""
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    return getattr(outputs, "logits", None)


def detached(output: StepOutput) -> StepOutput:
    """The step's result cut from the graph: what metrics and callbacks may keep."""
    detach = lambda tensor: tensor.detach()  # noqa: E731
    return StepOutput(output.loss.detach(), map_tensors(detach, output.outputs), map_tensors(detach, output.targets))


def as_step_output(result: Any, step: Callable) -> StepOutput:
    """A user step's result as a StepOutput: a loss tensor, a dict with 'loss', or a StepOutput."""
    if isinstance(result, StepOutput):
        return result
    if isinstance(result, Tensor):
        return StepOutput(result)
    loss = model_loss(result)
    if loss is not None:
        get = result.get if isinstance(result, Mapping) else lambda key: getattr(result, key, None)
        return StepOutput(loss, get("outputs"), get("targets"))
    name = getattr(step, "__name__", repr(step))
    raise ConfigError(
        f"step function {name} returned {type(result).__name__}; return the loss tensor, a dict with 'loss', "
        f"or trainkit.StepOutput"
    )


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

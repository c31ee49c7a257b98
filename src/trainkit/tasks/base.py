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
ignore index, perplexity, token accuracy). ``TASKS`` is the one list of their names
(trainkit.tasks.kinds); the label guard is in trainkit.tasks.labels.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainkit.data.epochs import checked_rows
from trainkit.data.runtime import batch_rows, map_tensors, tensors_in
from trainkit.errors import ConfigError, DataError
from trainkit.tasks.labels import LabelGuard, LabelsSeen, class_label_problem, loss_ignore_index
from trainkit.tasks.metrics import MetricSet

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
    class_dim: int | None = None  # the outputs' class dimension when the loss takes class indices

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
        ignore_index = loss_ignore_index(self.loss_fn)
        self.label_guard = LabelGuard(ignore_index) if ignore_index is not None and self.class_dim is not None else None

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
        return StepOutput(self._checked_loss(outputs, targets), outputs, targets)

    def _checked_loss(self, outputs: Any, targets: Any) -> Tensor:
        """The loss; when it fails on the targets (a label out of range, float or string labels),
        one DataError naming the row and the value instead of torch's traceback."""
        try:
            return self.loss(outputs, targets)
        except (IndexError, RuntimeError, TypeError) as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            problem = self._diagnosed(outputs, targets)
            if problem is None:
                raise
            raise DataError(problem) from None

    def _diagnosed(self, outputs: Any, targets: Any) -> str | None:
        """target_problem for a failed loss; None when it cannot tell (a CUDA context a device-side
        assert has poisoned cannot be read: the original error is the better message then)."""
        try:
            return self.target_problem(targets, self.classes_of(outputs), "row {} of the batch".format, "the batch")
        except Exception:  # noqa: BLE001 - the diagnosis must never hide the loss's own error
            return None

    def classes_of(self, outputs: Any) -> int | None:
        """The number of classes the outputs score, for a loss that takes class indices."""
        if self.class_dim is None or not isinstance(outputs, Tensor) or outputs.dim() < 2:
            return None
        return int(outputs.shape[self.class_dim])

    def target_problem(self, targets: Any, classes: int | None, row: Callable[[int], str], subject: str) -> str | None:
        """What is wrong with a batch's targets for this task's loss, or None: read before training
        on the first samples and after a loss failed. ``row`` names a row, ``subject`` the batch.
        Only a loss that takes class indices (cross-entropy, NLL) is checked; others decide alone."""
        if self.label_guard is None or self.user_step is not None:  # a step function computes its own loss
            return None
        return class_label_problem(targets, self.label_guard.ignore_index, classes, row, subject)

    def guarded(self, outputs: Tensor, targets: Any) -> Any:
        """Class-index targets through the label guard (see LabelGuard): labels outside the model's
        classes become the ignore index, recorded on the device for the trainer's next check."""
        if (self.label_guard is None or not isinstance(targets, Tensor) or targets.dtype != torch.long
                or not targets.numel() or outputs.dim() < 2):  # fmt: skip
            return targets
        return self.label_guard(targets, int(outputs.shape[self.class_dim]))

    def labels_seen(self, training: bool) -> LabelsSeen | None:
        """What the label guard saw in training (or evaluation) steps since the last call, then forgets it."""
        return None if self.label_guard is None else self.label_guard.take(training)

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


def parameter_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters: what its features must match."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


CASTS = {torch.float32: "float", torch.float64: "double", torch.float16: "half", torch.bfloat16: "bfloat16"}


def inputs_problem(inputs: Any, param_dtype: torch.dtype | None) -> str | None:
    """Features in float64 for a model that is not, or the other way round: refused (not cast), with
    the fix. Casting every batch would hide a mistake that doubles the data's memory (or loses the
    precision a float64 model was built for); the model's dtype is the user's choice. float32
    features for a bf16/fp16 model are left alone: autocast takes them."""
    if param_dtype is None:
        return None
    wide_model = param_dtype == torch.float64
    for tensor in tensors_in(inputs):
        if tensor.is_floating_point() and (tensor.dtype == torch.float64) != wide_model:
            have, want = (str(dtype).removeprefix("torch.") for dtype in (tensor.dtype, param_dtype))
            return (f"its features are {have} but the model's parameters are {want}: return {want} tensors "
                    f"(x.{CASTS.get(param_dtype, 'to')}()), or build the model in {have} "
                    f"(model.{CASTS.get(tensor.dtype, 'to')}())")  # fmt: skip
    return None


def check_data(task: Task, data: Any, what: str, param_dtype: torch.dtype | None = None) -> None:
    """Refuse, before training, data whose first samples (or whole tensors) the task cannot train
    on: one DataError starting with ``what`` (e.g. "--dataset m:f: training") instead of a
    traceback from inside the first step, or from a later epoch. See batches.checked_rows for
    what is read. ``param_dtype``: the model's (None: features are not compared)."""
    rows = checked_rows(data, what)
    if rows is None:
        return
    indices, batch = rows
    try:
        inputs, targets = task.split(batch)
    except ConfigError:
        return  # the step says what does not unpack (check_samples refuses it for the CLI)
    contiguous = indices[-1] - indices[0] == len(indices) - 1
    span = f"{indices[0]}-{indices[-1]}" if contiguous else f"{indices[0]}-{indices[-2]} and {indices[-1]}"
    problem = inputs_problem(inputs, param_dtype) or task.target_problem(
        targets, None, lambda row: f"sample {indices[row]}", "these samples"
    )
    if problem is not None:
        raise DataError(f"{what} samples {span}: {problem}")


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

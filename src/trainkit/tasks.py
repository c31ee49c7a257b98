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

import torch
from torch import Tensor, nn

from trainkit.batches import checked_rows
from trainkit.errors import ConfigError, DataError
from trainkit.metrics import MetricSet
from trainkit.runtime import batch_rows, map_tensors, tensors_in

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

def loss_ignore_index(loss_fn: Any) -> int | None:
    """The ignore index of a loss that takes class indices (CrossEntropyLoss, NLLLoss); None for others."""
    value = getattr(loss_fn, "ignore_index", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class LabelsSeen:
    """What a LabelGuard recorded since it was last read: whether a batch had no target at all and,
    where the loss cannot refuse a label itself, the lowest and highest label that was not the
    ignore index (None on the CPU) and the model's classes."""

    no_target: bool
    lowest: int | None
    highest: int | None
    classes: int
    ignore_index: int

    def out_of_range(self) -> str | None:
        """'label 4, but the model has 4 outputs ...', or None when every label fitted."""
        if self.lowest is not None and self.lowest < 0:
            return label_range_text(self.lowest, self.classes, self.ignore_index)
        if self.highest is not None and self.highest >= self.classes:
            return label_range_text(self.highest, self.classes, self.ignore_index)
        return None


def loss_refuses_bad_labels(targets: Tensor) -> bool:
    """On the CPU the cross-entropy loss raises for a label outside [0, classes) (Task._checked_loss
    turns it into one line at that step). On CUDA it is a device-side assert that leaves the process
    unable to go on, not even to save or report: there the guard must keep such labels from it."""
    return targets.device.type == "cpu"


class LabelGuard:
    """Class-index labels watched on the device before the loss sees them, with no sync per step.

    Everywhere it records, per micro-batch, whether every label is the ignore index (then the loss
    is NaN, and the lr is not the problem). Where the loss cannot refuse a bad label itself (see
    loss_refuses_bad_labels), it also turns labels outside [0, classes) into the ignore index (the
    step learns nothing from them) and records the lowest and highest label. The trainer reads the
    record where it already looks at the losses (every NONFINITE_CHECK_EVERY steps and at each
    epoch's end) and stops with one line. Cost, measured inside the trainer on one CPU thread: 15 µs
    a micro-batch (2 small ops; 2% of a 670 µs step of an 8-16-4 MLP on 32 rows, 0.6% of a 784-256-10
    MLP on 128), 44 µs for the 7-op accelerator path (there they are asynchronous kernel launches).
    Training (grad enabled) and evaluation keep separate records, so a validation in mid-epoch does
    not mix into the training steps' report.
    """

    FOLD_EVERY = 64  # entries kept before they are reduced to one (a Task used outside the trainer stays small)

    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index
        self.classes = 0
        self._records: dict[bool, list[tuple[Tensor, Tensor | None, Tensor | None]]] = {}

    def __call__(self, targets: Tensor, classes: int) -> Tensor:
        self.classes = classes
        ignored = targets == self.ignore_index
        if loss_refuses_bad_labels(targets):
            self._note((ignored.all(), None, None))
            return targets
        labels = targets.masked_fill(ignored, 0)
        self._note((ignored.all(), *torch.aminmax(labels)))
        return torch.where(labels.clamp(0, classes - 1) == labels, targets, self.ignore_index)

    def _note(self, entry: tuple[Tensor, Tensor | None, Tensor | None]) -> None:
        entries = self._records.setdefault(torch.is_grad_enabled(), [])
        entries.append(entry)
        if len(entries) >= self.FOLD_EVERY:
            entries[:] = [folded(entries)]

    def take(self, training: bool) -> LabelsSeen | None:
        """The record of training (or evaluation) steps since the last take (one device read); None if none ran."""
        entries = self._records.pop(training, None)
        if not entries:
            return None
        no_target, lowest, highest = folded(entries)
        values = torch.stack([t.long() for t in (no_target, lowest, highest) if t is not None]).tolist()
        bounds = (values[1], values[2]) if lowest is not None else (None, None)
        return LabelsSeen(bool(values[0]), *bounds, self.classes, self.ignore_index)


def folded(entries: list[tuple[Tensor, Tensor | None, Tensor | None]]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Several LabelGuard entries as one, on the device: any batch with no target, the lowest and highest label."""
    no_target = torch.stack([entry[0] for entry in entries]).any()
    bounds = [entry[1:] for entry in entries if entry[1] is not None]
    if not bounds:
        return no_target, None, None
    return no_target, torch.stack([low for low, _ in bounds]).min(), torch.stack([high for _, high in bounds]).max()


def label_range_text(label: int, classes: int | None, ignore_index: int) -> str:
    """Why a class label does not fit, and the fix."""
    if label >= 0 and classes is not None:
        return (f"label {label}, but the model has {classes} outputs (classes 0-{classes - 1}): fix the labels, or "
                f"give the model {label + 1} outputs")  # fmt: skip
    upper = f"{classes} (the model's outputs)" if classes is not None else "the number of classes"
    return f"label {label}: class labels are indices from 0 to {upper} minus 1, or the ignore index {ignore_index}"


def no_target_text(subject: str, ignore_index: int) -> str:
    return (f"no target in {subject}: every label is the ignore index {ignore_index} (padding), so the loss is NaN; "
            f"give it real labels or leave such batches out (a lower lr would not help)")  # fmt: skip


def class_label_problem(
    targets: Any, ignore_index: int, classes: int | None, row: Callable[[int], str], subject: str
) -> str | None:
    """What keeps ``targets`` from being class indices for a cross-entropy loss: strings, float or
    int32 labels, a label outside [0, classes) that is not the ignore index, or no target at all."""
    if isinstance(targets, (list, tuple)) and targets and not isinstance(targets[0], Tensor):
        return (f"{row(0)} has label {targets[0]!r} ({type(targets[0]).__name__}): classification needs integer "
                f"class indices: map the labels to numbers and return them as torch.long")  # fmt: skip
    if not isinstance(targets, Tensor) or not targets.numel():
        return None
    kind = str(targets.dtype).removeprefix("torch.")
    if targets.is_floating_point() or targets.is_complex():
        if targets.dim() > 1:
            return None  # class probabilities, (N, C): cross-entropy takes them
        return (f"{row(0)} has label {targets[0].item():g} ({kind}): classification needs integer class indices: "
                f"return torch.long labels (or use the regression task for numeric targets)")  # fmt: skip
    if targets.dtype not in (torch.long, torch.uint8):
        return f"its labels are {kind}: the cross-entropy loss takes torch.long class indices: return torch.long labels"
    labelled = targets != ignore_index
    if not bool(labelled.any()):
        return no_target_text(subject, ignore_index)
    outside = targets < 0 if classes is None else (targets < 0) | (targets >= classes)
    bad = (labelled & outside).nonzero()
    if not len(bad):
        return None
    return f"{row(int(bad[0, 0]))} has {label_range_text(int(targets[tuple(bad[0])]), classes, ignore_index)}"


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
        from trainkit.metrics import Accuracy

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
        from trainkit.metrics import TokenAccuracy

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

"""Training-loop metrics summed on the device, read back once per epoch.

The no-sync rule: ``Metric.update`` runs every step, so it may only queue device ops. Any
``.item()``, ``.tolist()``, ``float(t)``, ``bool(t)`` or ``if t:`` there would make the host wait
for the GPU each step and stall the pipeline. So a metric keeps running *sums* (device float64 /
long tensors, created lazily on the device of the first update, plus Python ints for counts that
come from shapes), and ``MetricSet.results`` concatenates every metric's sums into ONE tensor,
hands it to ``reduce`` once (an all-reduce-sum under DDP, so every rank sees the whole epoch),
copies it to the host once and turns the sums into values. Widths are fixed at construction, so
the concatenated tensor has the same layout on every rank.

``TorchMetric`` wraps a ``torchmetrics.Metric``; it keeps its own states and syncs them across
ranks inside its ``compute``. torchmetrics is optional: it is never imported here.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from trainkit.errors import CheckpointError, ConfigError

_DTYPES = {"long": torch.long, "double": torch.float64}  # "int": a Python int (a count from shapes)
_NAME = re.compile(r"[A-Za-z0-9_]+")


class Metric:
    """Base class of trainkit's sum-based metrics: ``width`` running sums, one slot each.

    Subclasses pass the slot kinds ("long"/"double" device accumulators, "int" Python counts)
    to ``__init__``, add to them in ``update`` with ``_add``/``_count`` and turn the summed
    slots into a value in ``_value``. A subclass may instead override every public method.
    """

    width: int = 0

    def __init__(self, kinds: tuple[str, ...] = ()) -> None:
        self._kinds = kinds
        self.width = len(kinds)
        self.reset()

    def reset(self) -> None:
        """Forget everything; accumulators are re-created on the next update's device."""
        self._acc: list[Any] = [0] * self.width

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Add one batch. Device tensor ops only: no ``.item()``, no ``bool(tensor)``."""
        raise NotImplementedError

    def _add(self, slot: int, value: Tensor) -> None:
        """In-place add to a device accumulator, created from the first value (no host sync)."""
        current = self._acc[slot]
        if isinstance(current, Tensor):
            current.add_(value)
        else:  # 0, or a number restored by load_sums
            self._acc[slot] = value.to(_DTYPES[self._kinds[slot]]) + current

    def _count(self, slot: int, n: int) -> None:
        self._acc[slot] += n

    def _device(self) -> torch.device | None:
        return next((v.device for v in getattr(self, "_acc", ()) if isinstance(v, Tensor)), None)

    def sums(self, device: torch.device) -> Tensor:
        """The running sums as one float64 vector of length ``width`` on ``device``."""
        if not self.width:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.stack([
            v.to(device=device, dtype=torch.float64) if isinstance(v, Tensor)
            else torch.tensor(float(v), dtype=torch.float64, device=device)
            for v in self._acc
        ])  # fmt: skip

    def compute(self, sums: Tensor) -> float:
        """The value from sums already summed over ranks (CPU, float64); NaN if nothing counted."""
        return self._value(*sums.tolist())

    def _value(self, *sums: float) -> float:
        raise NotImplementedError

    def load_sums(self, sums: Tensor) -> None:
        """Restore the running sums (mid-epoch resume); later updates add onto them exactly."""
        if not isinstance(sums, Tensor) or tuple(sums.shape) != (self.width,):
            got = tuple(sums.shape) if isinstance(sums, Tensor) else type(sums).__name__
            raise CheckpointError(f"{type(self).__name__}: saved metric sums are {got}, expected ({self.width},)")
        values = sums.detach().to("cpu", torch.float64).tolist()
        self._acc = [float(v) if kind == "double" else int(v) for kind, v in zip(self._kinds, values)]


def _ratio(num: float, den: float) -> float:
    """NaN when nothing was counted: 0/0 must not read as a perfect (or zero) score."""
    return num / den if den else math.nan


def _shape_error(metric: object, expected: str, outputs: Tensor, targets: Tensor) -> ConfigError:
    return ConfigError(
        f"{type(metric).__name__}: expected {expected}, "
        f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
    )


class Accuracy(Metric):
    """Fraction of targets whose class is the argmax (or among the top-k) along dim 1."""

    def __init__(self, top_k: int = 1, ignore_index: int | None = None) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"Accuracy: top_k must be an integer >= 1, got {top_k!r}")
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ConfigError(f"Accuracy: ignore_index must be an integer or None, got {ignore_index!r}")
        self.top_k, self.ignore_index = top_k, ignore_index
        # without ignore_index the count is targets.numel(): a Python int, no device op
        super().__init__(("long", "int" if ignore_index is None else "long"))

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        if (
            outputs.dim() != targets.dim() + 1 or outputs.shape[0] != targets.shape[0]
            or outputs.shape[2:] != targets.shape[1:] or targets.is_floating_point()
        ):  # fmt: skip
            raise _shape_error(self, "outputs (N, C, ...) and integer class-id targets (N, ...)", outputs, targets)
        if self.top_k == 1:
            hits = outputs.argmax(dim=1) == targets
        elif outputs.shape[1] < self.top_k:
            raise ConfigError(f"Accuracy: top_k={self.top_k} but outputs {tuple(outputs.shape)} have fewer classes")
        else:
            hits = (outputs.topk(self.top_k, dim=1).indices == targets.unsqueeze(1)).any(dim=1)
        if self.ignore_index is None:
            self._add(0, hits.sum())
            self._count(1, targets.numel())
        else:
            keep = targets != self.ignore_index
            self._add(0, (hits & keep).sum())
            self._add(1, keep.sum())

    _value = staticmethod(_ratio)


def _flat_pair(metric: Metric, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Regression outputs and targets, flattened: an (N, 1) output matches an (N,) target."""
    if outputs.numel() != targets.numel():
        raise _shape_error(metric, "outputs and targets with the same number of elements", outputs, targets)
    return outputs.detach().reshape(-1), targets.detach().reshape(-1)


class MeanSquaredError(Metric):
    """Mean of (output - target)² over all elements."""

    def __init__(self) -> None:
        super().__init__(("double", "int"))

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        pred, y = _flat_pair(self, outputs, targets)
        self._add(0, (pred - y).square().sum(dtype=torch.float64))
        self._count(1, y.numel())

    _value = staticmethod(_ratio)


class MeanAbsoluteError(MeanSquaredError):
    """Mean of |output - target| over all elements."""

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        pred, y = _flat_pair(self, outputs, targets)
        self._add(0, (pred - y).abs().sum(dtype=torch.float64))
        self._count(1, y.numel())


class R2Score(Metric):
    """Coefficient of determination 1 - SSE / SST over all elements, from [Σy, Σy², SSE, n].

    Several outputs per sample are pooled into one R² (their SST is taken around the common
    mean), so the width stays fixed; for one output it equals ``sklearn.metrics.r2_score``.
    NaN when nothing was counted or the targets have zero variance (to float64 rounding).
    """

    def __init__(self) -> None:
        super().__init__(("double", "double", "double", "int"))

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        pred, y = _flat_pair(self, outputs, targets)
        pred, y = pred.double(), y.double()  # Σy² - (Σy)²/n cancels: keep float64 throughout
        self._add(0, y.sum())
        self._add(1, y.square().sum())
        self._add(2, (y - pred).square().sum())
        self._count(3, y.numel())

    def _value(self, sum_y: float, sum_y2: float, sse: float, n: float) -> float:
        if not n:
            return math.nan
        sst = sum_y2 - sum_y * sum_y / n
        return math.nan if sst <= 1e-12 * sum_y2 else 1.0 - sse / sst


def _multilabel(metric: Metric, outputs: Tensor, targets: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Predicted and true labels as bool tensors: logit > threshold, target > 0.5 (any dtype)."""
    if outputs.shape != targets.shape:
        raise _shape_error(metric, "outputs (N, L) logits and same-shape 0/1 targets (N, L)", outputs, targets)
    return outputs > threshold, targets > 0.5


def _threshold(metric: str, threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"{metric}: threshold must be a finite number, got {threshold!r}")
    return float(threshold)


class ExactMatch(Metric):
    """Multi-label: fraction of rows with every label right. threshold 0.0 on logits = p 0.5."""

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = _threshold("ExactMatch", threshold)
        super().__init__(("long", "int"))

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        pred, true = _multilabel(self, outputs, targets, self.threshold)
        rows = outputs.shape[0] if outputs.dim() else 1
        self._add(0, (pred == true).reshape(rows, -1).all(dim=1).sum())
        self._count(1, rows)

    _value = staticmethod(_ratio)


class F1Score(Metric):
    """Multi-label micro F1 = 2TP / (2TP + FP + FN) over all labels; NaN with no positives."""

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = _threshold("F1Score", threshold)
        super().__init__(("long", "long", "long"))

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        pred, true = _multilabel(self, outputs, targets, self.threshold)
        self._add(0, (pred & true).sum())
        self._add(1, (pred & ~true).sum())
        self._add(2, (~pred & true).sum())

    def _value(self, tp: float, fp: float, fn: float) -> float:
        return _ratio(2 * tp, 2 * tp + fp + fn)


class TokenAccuracy(Metric):
    """Language modelling: argmax over the vocabulary right, on positions not ignore_index."""

    def __init__(self, ignore_index: int = -100) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ConfigError(f"TokenAccuracy: ignore_index must be an integer, got {ignore_index!r}")
        self.ignore_index = ignore_index
        super().__init__(("long", "long"))

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        if outputs.dim() != 3 or targets.dim() != 2 or outputs.shape[:2] != targets.shape:
            raise _shape_error(self, "outputs (B, T, V) logits and targets (B, T)", outputs, targets)
        keep = targets != self.ignore_index
        self._add(0, ((outputs.argmax(dim=-1) == targets) & keep).sum())
        self._add(1, keep.sum())

    _value = staticmethod(_ratio)


class FunctionMetric(Metric):
    """``fn(outputs, targets) -> Tensor``: a batch mean, weighted by the batch's rows, so the
    epoch value is the per-sample mean however the last batch is cut."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        if not callable(fn):
            raise ConfigError(f"FunctionMetric needs fn(outputs, targets) -> Tensor, got {type(fn).__name__}")
        self.fn, self.name = fn, getattr(fn, "__name__", repr(fn))
        super().__init__(("double", "int"))

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        with torch.no_grad():
            value = self.fn(outputs, targets)
        if not isinstance(value, Tensor):
            raise ConfigError(
                f"metric function {self.name} returned {type(value).__name__}, expected a Tensor "
                "(return the tensor itself: .item() would sync with the device every step)"
            )
        rows = outputs.shape[0] if outputs.dim() else 1
        self._add(0, value.double().mean() * rows)  # the product first: exact on resume
        self._count(1, rows)

    _value = staticmethod(_ratio)


def _torchmetrics_metric(obj: object) -> bool:
    tm = sys.modules.get("torchmetrics")  # never import it: trainkit works without torchmetrics
    return tm is not None and isinstance(obj, tm.Metric)


class TorchMetric(Metric):
    """A ``torchmetrics.Metric``: not sum-based (width 0); it syncs ranks in its own compute."""

    def __init__(self, metric: Any) -> None:
        if not _torchmetrics_metric(metric):
            raise ConfigError(f"TorchMetric needs a torchmetrics.Metric instance, got {type(metric).__name__}")
        self.metric = metric
        self._kinds, self._acc = (), []  # no reset(): wrapping must not clear the user's metric

    def reset(self) -> None:
        self.metric.reset()

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        if self.metric.device != outputs.device:  # its states follow the model's device
            self.metric.to(outputs.device)
        self.metric.update(outputs, targets)

    def compute(self, sums: Tensor) -> float:
        """``float(metric.compute())``; NaN if never updated (outside DDP, where compute is a
        collective that every rank must join)."""
        dist = torch.distributed
        if not self.metric.update_called and not (dist.is_available() and dist.is_initialized()):
            return math.nan
        value = self.metric.compute()
        if not isinstance(value, Tensor) or value.numel() != 1:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            name = type(self.metric).__name__
            raise ConfigError(f"{name}.compute() gave {got}, expected one number (e.g. average='micro')")
        return float(value)

    def state_dict(self) -> dict[str, Any]:
        """The accumulated states as CPU tensors (lists for "cat" states), plus the update count."""
        states = {
            name: [t.detach().cpu() for t in v] if isinstance(v, list) else v.detach().cpu()
            for name, v in self.metric.metric_state.items()
        }
        return {"states": states, "update_count": int(self.metric.update_count)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names, saved = set(self.metric._defaults), set(state.get("states", {}))
        if saved != names:
            name = type(self.metric).__name__
            raise CheckpointError(f"saved {name} states {sorted(saved)} do not match {sorted(names)}")
        device = self.metric.device
        for name, value in state["states"].items():
            value = [t.to(device) for t in value] if isinstance(value, list) else value.to(device)
            setattr(self.metric, name, value)
        self.metric._update_count = int(state["update_count"])
        self.metric._computed = None


BUILTIN_METRICS: dict[str, Callable[[], Metric]] = {
    "accuracy": Accuracy,
    "top5_accuracy": functools.partial(Accuracy, top_k=5),
    "mse": MeanSquaredError,
    "mae": MeanAbsoluteError,
    "r2": R2Score,
    "exact_match": ExactMatch,
    "f1": F1Score,
    "token_accuracy": TokenAccuracy,
}


def as_metric(obj: Any) -> Metric:
    """A Metric from what a user wrote: a Metric, a torchmetrics Metric, a callable or a name."""
    if isinstance(obj, Metric):
        return obj
    if _torchmetrics_metric(obj):
        return TorchMetric(obj)
    if isinstance(obj, str):
        if obj not in BUILTIN_METRICS:
            raise ConfigError(f"unknown metric {obj!r}; built-in names: {', '.join(BUILTIN_METRICS)}")
        return BUILTIN_METRICS[obj]()
    if isinstance(obj, type):  # Accuracy instead of Accuracy(): calling it per batch would be nonsense
        raise ConfigError(f"metric {obj.__name__} is a class; pass an instance, e.g. {obj.__name__}()")
    if callable(obj):
        return FunctionMetric(obj)
    raise ConfigError(
        "a metric must be a trainkit Metric, a torchmetrics Metric, a callable fn(outputs, targets) -> Tensor "
        f"or one of the names {', '.join(BUILTIN_METRICS)}; got {type(obj).__name__}"
    )


class MetricSet:
    """Named metrics updated together and read back through ONE reduce per epoch."""

    def __init__(self, metrics: Mapping[str, Any]) -> None:
        if not isinstance(metrics, Mapping):
            raise ConfigError(f"metrics must be a mapping of name -> metric, got {type(metrics).__name__}")
        for name in metrics:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ConfigError(f"metric name {name!r} must be a non-empty string of letters, digits and _")
        self.metrics: dict[str, Metric] = {name: as_metric(m) for name, m in metrics.items()}
        self.names: tuple[str, ...] = tuple(self.metrics)

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        for metric in self.metrics.values():
            metric.update(outputs, targets)

    def results(
        self, reduce: Callable[[Tensor], Tensor | None] = lambda t: t, device: torch.device | str | None = None
    ) -> dict[str, float]:
        """{name: value}. All sums go through ``reduce`` in one tensor, once (the trainer passes
        an all-reduce-sum under DDP; one that works in place and returns None, like
        ``torch.distributed.all_reduce``, is fine too), then to the host once. The tensor lives
        on the accumulators' device; ``device`` (default cpu) is used when nothing was updated."""
        summed = [(name, m) for name, m in self.metrics.items() if m.width]
        values: dict[str, float] = {}
        if summed:
            where = next((d for _, m in summed if (d := m._device()) is not None), None)
            where = where or torch.device(device or "cpu")
            flat = torch.cat([m.sums(where) for _, m in summed])
            reduced = reduce(flat)
            host = (flat if reduced is None else reduced).cpu()
            start = 0
            for name, m in summed:
                values[name] = m.compute(host[start:start + m.width])
                start += m.width
        empty = torch.zeros(0, dtype=torch.float64)
        return {name: values[name] if name in values else self.metrics[name].compute(empty) for name in self.names}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (CPU tensors, ints, dicts) that loads with ``torch.load(weights_only=True)``."""
        return {
            name: m.state_dict() if isinstance(m, TorchMetric) else m.sums(torch.device("cpu"))
            for name, m in self.metrics.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore running state so the rest of the epoch adds up as if never interrupted."""
        if set(state) != set(self.names):
            raise CheckpointError(f"saved metrics {sorted(state)} do not match this run's metrics {sorted(self.names)}")
        for name, m in self.metrics.items():
            if isinstance(m, TorchMetric):
                m.load_state_dict(state[name])
            else:
                m.load_sums(state[name])


def finite_or_none(value: Any) -> Any:
    """A metric value for JSON: NaN and ±inf become None (``null``). JSON has no NaN or Infinity
    (RFC 8259): Python writes them anyway, and strict parsers (JavaScript's JSON.parse) reject the file."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_ready(data: Any) -> Any:
    """``data`` with every non-finite float, in dicts and lists at any depth, as None."""
    if isinstance(data, Mapping):
        return {key: json_ready(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_ready(value) for value in data]
    return finite_or_none(data)

"""The label guard: labels the loss cannot take (outside the model's classes, a batch with no
target at all) found on the device without a sync per step, and said in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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

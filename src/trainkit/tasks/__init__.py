"""Tasks and metrics: how a batch becomes a loss and a sample count (``base``), trainkit's tasks
by name (``kinds``), the label guard (``labels``), and metrics summed on the device (``metrics``)."""

from trainkit.tasks.base import StepOutput, Task, check_data, model_logits, model_loss
from trainkit.tasks.kinds import (
    SMOOTHED_TASKS, TASKS, Classification, MultiLabel, NextToken, Regression, as_task, build_task, named_loss,
)  # fmt: skip
from trainkit.tasks.labels import LabelGuard, LabelsSeen

__all__ = [
    "SMOOTHED_TASKS", "TASKS", "Classification", "LabelGuard", "LabelsSeen", "MultiLabel", "NextToken", "Regression",
    "StepOutput", "Task", "as_task", "build_task", "check_data", "model_logits", "model_loss", "named_loss",
]  # fmt: skip

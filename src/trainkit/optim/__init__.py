"""Optimization: AdamW/SGD with decay only where it belongs and the lr scaling rule
(``optimizers``), the named lr schedules (``schedules``), and the LR range test that leaves no
trace (``lr_finder``)."""

from trainkit.optim.optimizers import (
    LR_SCALINGS, batch_scaled_lr, build_optimizer, check_user_optimizer, split_decay_parameters,
)  # fmt: skip

__all__ = ["LR_SCALINGS", "batch_scaled_lr", "build_optimizer", "check_user_optimizer", "split_decay_parameters"]

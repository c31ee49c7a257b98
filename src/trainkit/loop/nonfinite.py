"""What a NaN/inf loss or gradient does to a run (``--on-nonfinite``): one small object per policy.

- ``raise`` (default): every step's loss tensor is logged on the device (no sync) and read every
  ``NONFINITE_CHECK_EVERY`` steps and at each epoch's end; the first bad step stops the run.
- ``skip``: each step decides at once (one sync per step); a bad step's gradients and buffer
  updates are dropped, past ``--max-skipped-steps`` the run stops.
- ``rollback``: a bad step reloads the newest valid checkpoint (or the state at the start of fit)
  and continues with the lr times ``--rollback-lr-factor``, at most ``--max-rollbacks`` times.

All three share the end-of-epoch check of the weights themselves: nothing non-finite is saved.
The policies read and change the run through the Trainer they are handed (its optimizer, meter,
schedule, checkpoints), never through the loop's own code.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NoReturn

import torch

from trainkit.devices import host_copy
from trainkit.errors import NonFiniteLossError
from trainkit.optim.schedules import scale_learning_rate

if TYPE_CHECKING:
    from trainkit.loop.trainer import Trainer

log = logging.getLogger("trainkit")

NONFINITE_CHECK_EVERY = 50  # optimizer steps between looks at the logged losses ("raise")


class NonFiniteStep(Exception):
    """Internal: a step produced NaN/inf under the rollback policy; the loop calls ``recover``."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


class NonFinitePolicy:
    """``raise``: log each step's loss on the device and look every few steps (no sync)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._unchecked_losses: list[torch.Tensor] = []
        self._unchecked_from = 1  # the optimizer step of the first logged loss

    def on_fit_start(self) -> None:
        """Before the first epoch (after a resume)."""

    def step_is_bad(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step must not update the weights (after ``unscale_`` and clipping)."""
        if not self._unchecked_losses:
            self._unchecked_from = self.trainer.state.global_step + 1
        self._unchecked_losses.append(loss)
        return False

    def skip_step(self) -> None:
        """Drop the step ``step_is_bad`` refused (only policies that refuse steps get here)."""

    def first_logged_bad_step(self) -> int:
        """The earliest logged step whose loss is NaN/inf, on any rank (-1: none); empties the log.

        An agreement point on every policy (the minimum over ranks), so all ranks raise at the same check."""
        never = torch.iinfo(torch.long).max
        step = never
        if self._unchecked_losses:
            bad = (~torch.isfinite(torch.stack(self._unchecked_losses))).nonzero()
            if len(bad):
                step = self._unchecked_from + int(bad[0])
            self._unchecked_losses = []
        step = self.trainer.strategy.min_over_ranks(step, self.trainer.device)
        return -1 if step == never else step

    def bad_weights(self) -> NoReturn:
        """NaN/inf in the weights or buffers after an epoch: stop (never saved or exported)."""
        state = self.trainer.state
        raise NonFiniteLossError(
            f"the weights or buffers hold NaN/inf after epoch {state.epoch} (optimizer step "
            f"{state.global_step}); training stopped and nothing was saved from it. Earlier checkpoints "
            f"are intact. Try a lower --lr, --clip-norm or --on-nonfinite rollback."
        )

    def recover(self, step: int) -> None:
        """Continue after ``NonFiniteStep`` (only ``rollback`` raises it)."""
        raise AssertionError(f"NonFiniteStep({step}) under a policy that does not roll back")


class DecidingPolicy(NonFinitePolicy):
    """The policies that decide at every step, at the cost of one sync: all ranks together."""

    def step_is_bad(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        trainer = self.trainer
        finite = torch.isfinite(loss)
        if not trainer.scaler.is_enabled():  # with fp16, inf gradients are the GradScaler's business
            finite &= torch.isfinite(grad_norm)
        if trainer.strategy.every_rank(bool(finite)):  # agreement point: all ranks skip or roll back together
            return False
        trainer.scaler.update()  # closes this step's GradScaler bookkeeping (no-op without fp16)
        return self.on_bad_step(trainer.state.global_step + 1)

    def on_bad_step(self, step: int) -> bool:
        raise NotImplementedError


class SkipNonFinite(DecidingPolicy):
    """``skip``: drop the step; the schedule still advances so later steps keep their lr."""

    def on_bad_step(self, step: int) -> bool:
        log.warning("non-finite loss or gradient at optimizer step %d: step skipped", step)
        return True

    def skip_step(self) -> None:
        """Drop this step's gradients and undo its forward pass's buffer updates (BatchNorm
        statistics). Past ``--max-skipped-steps`` in the run, stop like "raise": a run that skips
        most steps learns nothing."""
        trainer = self.trainer
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.buffers.restore()
        trainer.meter.skipped += 1
        trainer.schedule.step()
        skipped = trainer.meter.skipped + sum(int(row.get("skipped_steps", 0)) for row in trainer.state.history)
        if skipped > trainer.max_skipped_steps:
            raise NonFiniteLossError(
                f"{skipped} optimizer steps had a NaN/inf loss or gradient and were skipped, more than "
                f"--max-skipped-steps {trainer.max_skipped_steps}; training stopped at step "
                f"{trainer.state.global_step + 1}. Earlier checkpoints are intact. Try a lower --lr or --clip-norm."
            )


class RollBackOnNonFinite(DecidingPolicy):
    """``rollback``: reload the newest good checkpoint and continue from it with a lower lr."""

    fallback: dict | None = None  # the state at the start of fit, in host memory (the run needs the device's)

    def on_fit_start(self) -> None:
        self.fallback = host_copy(self.trainer.state_dict())

    def on_bad_step(self, step: int) -> bool:
        raise NonFiniteStep(step)

    def bad_weights(self) -> NoReturn:
        raise NonFiniteStep(self.trainer.state.global_step)

    def recover(self, step: int) -> None:
        trainer, lr = self.trainer, self.trainer.schedule
        if trainer.rollbacks >= trainer.config.max_rollbacks:
            raise NonFiniteLossError(
                f"the training loss became NaN/inf at optimizer step {step} again after "
                f"{trainer.rollbacks} rollbacks (--max-rollbacks); giving up. Lower --lr or check the data."
            )
        checkpoints = trainer.checkpoints
        found = checkpoints.newest_valid(set_aside=trainer.is_main, weights=False) if checkpoints is not None else None
        source, payload = found if found is not None else ("the state at the start of fit()", self.fallback)
        rollbacks, target_scale = trainer.rollbacks + 1, lr.scale * trainer.config.rollback_lr_factor
        trainer.load_state_dict(payload)
        scale_learning_rate(trainer.optimizer, lr.scheduler, target_scale / lr.scale)
        trainer.rollbacks, lr.scale = rollbacks, target_scale
        log.warning(
            "non-finite loss at optimizer step %d: rolled back to %s (step %d) and scaled the lr by %g "
            "(rollback %d of at most %d)",
            step, source, trainer.state.global_step, target_scale, rollbacks, trainer.config.max_rollbacks,
        )  # fmt: skip


POLICIES: dict[str, type[NonFinitePolicy]] = {
    "raise": NonFinitePolicy, "skip": SkipNonFinite, "rollback": RollBackOnNonFinite,
}  # fmt: skip


def nonfinite_loss_error(step: int, epoch: int, steps_per_epoch: int) -> NonFiniteLossError:
    """The one line for a NaN/inf training loss found by the logged-loss check."""
    return NonFiniteLossError(
        f"the training loss became NaN/inf at optimizer step {step} (epoch {epoch}, "
        f"step {step - (epoch - 1) * steps_per_epoch} of the epoch); training stopped. "
        f"Earlier checkpoints are intact. Try a lower --lr, --clip-norm, --on-nonfinite skip/rollback, "
        f"or --precision fp32."
    )

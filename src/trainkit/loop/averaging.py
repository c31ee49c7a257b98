"""Weight averaging: an exponential moving average of the weights (``--ema``) or stochastic
weight averaging over the last epochs (``--swa-start``), both on ``torch.optim.swa_utils``.

The averaged copy is an ``AveragedModel`` (a deep copy of the model plus ``n_averaged``) and
its averaging function is the library's (``get_ema_multi_avg_fn`` / ``get_swa_multi_avg_fn``).

- EMA updates after every optimizer step and averages the float buffers too (BatchNorm running
  statistics: ``use_buffers=True`` in the library's terms), so the average is evaluated as it is.
  ``AveragedModel.update_parameters`` reads ``n_averaged`` on the host (``bool(n == 0)``, a
  copy to the device): one device sync per step on a GPU. The per-step update here calls the
  same averaging function on lists of tensors gathered once, and counts updates in Python.
- SWA updates at the end of each epoch from ``swa_start`` (``update_parameters``: once an epoch
  a sync costs nothing) and keeps the live model's buffers; at the end of training ``update_bn``
  recomputes the BatchNorm statistics of the averaged weights over the training data.

``WeightAveraging`` is the loop's part: when the average is updated, what validation measures,
and what fit ends with. It is not a Callback: SWA sets the lr (trainkit.loop.lr), and callbacks
never reach the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from trainkit.errors import CheckpointError

if TYPE_CHECKING:
    from trainkit.config.schema import TrainConfig

AVERAGE_KINDS = ("ema", "swa")


class WeightAverage:
    """The average of a model's weights, its checkpoint state, and the module to evaluate."""

    def __init__(self, model: nn.Module, *, kind: str, ema_decay: float | None = None) -> None:
        if kind not in AVERAGE_KINDS:
            raise ValueError(f"kind must be one of {AVERAGE_KINDS}, got {kind!r}")
        self.kind = kind
        is_ema = kind == "ema"
        multi_avg_fn = get_ema_multi_avg_fn(ema_decay) if is_ema else None  # None: the library's equal-weight SWA
        # no device argument: n_averaged stays a CPU tensor while the copy lives where the model does
        self.averaged = AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=is_ema)
        self.updates = 0  # n_averaged, mirrored in Python so no step reads a device value
        self._model_tensors: list[torch.Tensor] | None = None

    @property
    def module(self) -> nn.Module:
        """The averaged model itself (plain state_dict keys, like the live model's)."""
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (the first update copies them)."""
        if self.kind == "swa":
            self.averaged.update_parameters(model)
        else:
            self._update_ema(model)
        self.updates += 1

    @torch.no_grad()
    def _update_ema(self, model: nn.Module) -> None:
        if self._model_tensors is None:  # the same tensors every step: parameters are updated in place
            self._model_tensors = tensors_of(model)
            self._averaged_tensors = tensors_of(self.averaged.module)
            self._float_pairs = pairs_by_dtype(self._averaged_tensors, self._model_tensors)
        if self.updates == 0:
            torch._foreach_copy_(self._averaged_tensors, self._model_tensors)
        else:
            for (averaged, current), is_float in self._float_pairs:
                if is_float:
                    self.averaged.multi_avg_fn(averaged, current, self.updates)
                else:  # integer buffers (BatchNorm's num_batches_tracked) are counters: copied
                    torch._foreach_copy_(averaged, current)
        self.averaged.n_averaged += 1  # a CPU tensor: no device work

    def refresh_batch_norm(self, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]) -> None:
        """SWA: BatchNorm statistics of the averaged weights, from one pass over ``batches``
        (torch's ``update_bn``; ``forward(module, batch)`` runs the model on a batch's inputs)."""
        update_bn(([batch] for batch in batches), _BatchForward(self.averaged.module, forward))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "updates": self.updates, "weights": self.averaged.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(f"the checkpoint's weight average is {state.get('kind')!r}, this run asks for "
                                  f"{self.kind!r}; resume with the same --ema / --swa-start or pass --force-resume")  # fmt: skip
        self.averaged.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
        self.averaged.n_averaged.fill_(self.updates)


class WeightAveraging:
    """``--ema`` (updated after every optimizer step) or ``--swa-start`` (at the end of each epoch
    from that one); nothing when neither is set."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.config = config
        self.average: WeightAverage | None = None
        if config.ema is not None:
            self.average = WeightAverage(model, kind="ema", ema_decay=config.ema)
        elif config.swa_start is not None:
            self.average = WeightAverage(model, kind="swa")
        self.swa_applied = False  # set when fit ends with SWA's average: no validation row measured it

    def _is(self, kind: str) -> bool:
        return self.average is not None and self.average.kind == kind

    def after_optimizer_step(self, model: nn.Module) -> None:
        if self._is("ema"):
            self.average.update(model)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        if self._is("swa") and epoch >= self.config.swa_start:
            self.average.update(model)  # once per epoch: SWA averages the ends of epochs

    def eval_module(self, model: nn.Module) -> nn.Module:
        """What validation measures during training: the EMA (unless --no-eval-average), else the model.
        SWA's average is measured only at the end, once its BatchNorm statistics are recomputed."""
        return self.average.module if self._is("ema") and self.config.eval_average else model

    def is_final(self) -> bool:
        """Whether fit ends with the average as the model's weights."""
        return self.average is not None and self.config.eval_average and self.average.updates > 0

    def finish(self, model: nn.Module, batches: Callable[[], Iterable[Any]], forward: Callable[[nn.Module, Any], Any],
               autocast: AbstractContextManager) -> None:  # fmt: skip
        """The average becomes the final weights (what the test, predict and the exports see): the
        EMA as it is, SWA after torch's update_bn over ``batches()`` (one pass of the training data)."""
        if not self.is_final():
            return
        if self.average.kind == "swa":
            self.swa_applied = True
            with autocast:
                self.average.refresh_batch_norm(batches(), forward)
        model.load_state_dict(self.average.module.state_dict())

    def describe(self, last_epoch: int, restored_epoch: int | None) -> str:
        """What the final weights are, for the summary."""
        if not self.is_final():
            what = "the weights"
        elif self.average.kind == "ema":
            what = f"the EMA of the weights (decay {self.config.ema:g})"
        else:
            what = f"the SWA average of epochs {self.config.swa_start}-{last_epoch} (BatchNorm statistics recomputed)"
        when = "last epoch" if restored_epoch is None else f"best epoch {restored_epoch} (restored by early stopping)"
        return f"{what} at the {when}"

    def state_dict(self) -> dict[str, Any] | None:
        return self.average.state_dict() if self.average is not None else None

    def load_state_dict(self, saved: dict[str, Any] | None, model: nn.Module) -> None:
        """A checkpoint without one (--force-resume adding --ema) starts the average afresh."""
        if self.average is not None:
            fresh = {"kind": self.average.kind, "updates": 0, "weights": model.state_dict()}
            self.average.load_state_dict(saved or fresh)


class _BatchForward(nn.Module):
    """A module whose forward takes a whole batch, so ``update_bn`` can drive any task's model."""

    def __init__(self, module: nn.Module, forward: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.module = module
        self._forward = forward

    def forward(self, batch: Any) -> Any:
        return self._forward(self.module, batch)


def tensors_of(model: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, detached, in module order (the order ``AveragedModel`` pairs them in)."""
    return [t.detach() for t in (*model.parameters(), *model.buffers())]


def pairs_by_dtype(
    averaged: list[torch.Tensor], current: list[torch.Tensor]
) -> list[tuple[tuple[list[torch.Tensor], list[torch.Tensor]], bool]]:
    """The (averaged, current) tensor lists grouped by dtype (foreach kernels take one dtype at a
    time), each flagged with whether it holds floating-point values."""
    groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for mine, theirs in zip(averaged, current, strict=True):
        pair = groups.setdefault(mine.dtype, ([], []))
        pair[0].append(mine)
        pair[1].append(theirs)
    return [(pair, dtype.is_floating_point) for dtype, pair in groups.items()]


def evaluation_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's run validated: its EMA when it holds one (unless the run set
    ``eval_average`` false), else the live model's. SWA's average is evaluated only once
    training ends (after ``update_bn``), so a checkpoint's SWA state is not what it validated."""
    average = payload.get("average")
    uses_average = payload.get("config", {}).get("eval_average", True)
    if uses_average and average is not None and average["kind"] == "ema" and average["updates"] > 0:
        return average["weights"]
    return payload["model"]

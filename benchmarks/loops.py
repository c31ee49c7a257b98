"""The five training loops compared in run.py, each doing the same work per epoch.

Same model (trainkit's builders, seeded), same data, AdamW (lr 1e-3, weight decay 0.01 on
weights only), gradient clipping at norm 1.0, a per-step cosine schedule, and per-epoch train
loss and accuracy. Only the loop differs:

a. ``trainkit``    - trainkit's Trainer, default fast path
b. ``dataloader``  - hand-written loop over DataLoader(TensorDataset)
c. ``in_memory``   - hand-written loop slicing an in-memory tensor by a random permutation
                     (the practical lower bound in Python)
d. ``lightning``   - Lightning's Trainer with a DataLoader (the idiomatic set-up)
e. ``keras``       - Keras 3 on its torch backend: the same architecture in Keras layers,
                     ``model.fit`` on arrays (benchmarks/keras_models.py)

Each function trains one epoch from a fresh, seeded model and returns the epoch's
seconds, measured inside the loop (model building and framework set-up excluded).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit.nn.init import init_weights
from trainkit.nn.models import build_model
from trainkit.optim.optimizers import split_decay_parameters
from trainkit.loop.trainer import Trainer

LR, WEIGHT_DECAY, CLIP_NORM = 1e-3, 0.01, 1.0


@dataclass
class Workload:
    """What every loop trains: a model on (x, y) at one batch size, plus loop options."""

    model: str  # "mlp" or "cnn"
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    channels_last: bool = False
    options: dict = field(default_factory=dict)  # fast-path switches, see in_memory_loop / trainkit_loop

    @property
    def steps(self) -> int:
        return -(-len(self.y) // self.batch_size)


def fresh_model(workload: Workload, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = init_weights(build_model(workload.model, tuple(workload.x.shape[1:]), 10, dropout=0.3), "he")
    if workload.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_format(inputs: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs


def hand_optimizer(model: nn.Module, steps: int, fused: bool | None = None, foreach: bool | None = True):
    """AdamW with decay on weights only, as trainkit does (two parameter groups: the optimizer's
    kernels run once per group, so one group would be less work, not a faster loop)."""
    decay, no_decay = split_decay_parameters(model)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, fused=fused, foreach=foreach)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


def hand_step(model, optimizer, scheduler, inputs, targets, set_to_none: bool = True):
    """One plain PyTorch step: zero_grad, forward, loss, backward, clip, step, schedule."""
    optimizer.zero_grad(set_to_none=set_to_none)
    logits = model(inputs)
    loss = nn.functional.cross_entropy(logits, targets)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM, foreach=True)
    optimizer.step()
    scheduler.step()
    return logits.detach(), loss.detach()


def trainkit_loop(workload: Workload) -> float:
    """(a) trainkit's Trainer; ``options`` may override TrainConfig fields (precision, compile, ...)."""
    config = TrainConfig(
        batch_size=workload.batch_size, epochs=workload.options.get("epochs", 1), lr=LR, weight_decay=WEIGHT_DECAY,
        schedule="cosine", clip_norm=CLIP_NORM, patience=0, device="cpu", model=workload.model,
        channels_last=workload.channels_last, **workload.options.get("config", {}),
    )  # fmt: skip
    trainer = Trainer(fresh_model(workload), config)
    history = trainer.fit(DeviceBatches(workload.x, workload.y, workload.batch_size, seed=0))
    return history[-1]["epoch_seconds"]  # with epochs > 1: the last (warm) epoch


def dataloader_loop(workload: Workload) -> float:
    """(b) the textbook loop: DataLoader(TensorDataset), shuffle, no workers (2 cores)."""
    model = fresh_model(workload)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(workload.x, workload.y), batch_size=workload.batch_size, shuffle=True
    )
    optimizer, scheduler = hand_optimizer(model, workload.steps)
    started = time.perf_counter()
    model.train()
    loss_sum, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long)
    for inputs, targets in loader:
        logits, loss = hand_step(model, optimizer, scheduler, to_format(inputs, workload.channels_last), targets)
        loss_sum += loss.double() * len(targets)
        correct += (logits.argmax(1) == targets).sum()
    loss_sum.item(), correct.item()
    return time.perf_counter() - started


def in_memory_loop(workload: Workload) -> float:
    """(c) slices of an in-memory tensor by a random permutation; the fast-path switches in
    ``options`` (fused/foreach AdamW, set_to_none, a per-step .item(), threads) exist to
    measure each one on its own."""
    opts = workload.options
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(opts.get("threads", previous_threads))
    model = fresh_model(workload)
    optimizer, scheduler = hand_optimizer(model, workload.steps, opts.get("fused"), opts.get("foreach", True))
    set_to_none, item_every_step = opts.get("set_to_none", True), opts.get("item_every_step", False)
    x, y, batch = workload.x, workload.y, workload.batch_size
    started = time.perf_counter()
    model.train()
    order = torch.randperm(len(y))
    loss_sum, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long)
    for start in range(0, len(y), batch):
        index = order[start : start + batch]
        inputs, targets = to_format(x[index], workload.channels_last), y[index]
        logits, loss = hand_step(model, optimizer, scheduler, inputs, targets, set_to_none)
        if item_every_step:  # the common habit: a Python float per step, one sync each time
            loss_sum += loss.item() * len(targets)
            correct += int((logits.argmax(1) == targets).sum().item())
        else:
            loss_sum += loss.double() * len(targets)
            correct += (logits.argmax(1) == targets).sum()
    loss_sum.item(), correct.item()
    seconds = time.perf_counter() - started
    torch.set_num_threads(previous_threads)
    return seconds


def lightning_loop(workload: Workload) -> float:
    """(d) Lightning's Trainer over a DataLoader, configured the way its docs show."""
    import lightning as L

    quiet_lightning()

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = fresh_model(workload)
            self.loss_fn = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            logits = self.model(to_format(inputs, workload.channels_last))
            loss = self.loss_fn(logits, targets)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            self.log("train_acc", (logits.argmax(1) == targets).float().mean(), on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self):
            optimizer, scheduler = hand_optimizer(self.model, workload.steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.seconds = time.perf_counter() - self.started

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(workload.x, workload.y), batch_size=workload.batch_size, shuffle=True
    )
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=CLIP_NORM,
        num_sanity_val_steps=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(Module(), loader)
    return timer.seconds


def keras_loop(workload: Workload) -> float:
    """(e) Keras 3 (torch backend), as its documentation shows: Keras layers, compile, fit."""
    from keras_models import EpochTimer, compiled, keras, keras_model

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("float32")
    schedule = keras.optimizers.schedules.CosineDecay(LR, decay_steps=workload.steps)
    model = compiled(keras_model(workload.model, dropout=0.3), schedule, WEIGHT_DECAY, CLIP_NORM)
    timer = EpochTimer()
    x = workload.x.permute(0, 2, 3, 1).numpy()  # Keras' default layout: channels last
    model.fit(x, workload.y.numpy(), batch_size=workload.batch_size, epochs=1, shuffle=True, verbose=0, callbacks=[timer])
    return timer.seconds[-1]


def quiet_lightning() -> None:
    """Lightning sets its loggers to INFO on import; its banners would drown the results."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


LOOPS = {
    "trainkit": trainkit_loop,
    "dataloader": dataloader_loop,
    "in_memory": in_memory_loop,
    "lightning": lightning_loop,
    "keras": keras_loop,
}

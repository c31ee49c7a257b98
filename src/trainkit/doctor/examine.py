"""The doctor's look at a job before it trains: the model as one forward pass runs it, the first
batch, the settings, and one forward/backward pass — all on a copy, so the user's model, its
gradients and buffers, and every RNG stream are left exactly as they were.

Each rule and its thresholds are in docs/doctor.md; the thresholds sit far from what healthy
networks show at initialisation (the controls there), so a finding means a real problem.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainkit.config.schema import TrainConfig
from trainkit.data.runtime import batch_rows, tensors_in
from trainkit.doctor.findings import Report
from trainkit.loop.lr import schedule_spec
from trainkit.nn.diagnostics import RELU_LIKE, WEIGHT_LAYERS, dead_fraction
from trainkit.nn.layers import activation_name
from trainkit.tasks.base import Task
from trainkit.tasks.kinds import Classification, NextToken

SQUASHING = (nn.Sigmoid, nn.Tanh)
TRANSPARENT = (nn.Identity, nn.Flatten, nn.Unflatten)  # between two layers, they change no statistics
RECURRENT = (nn.RNNBase,)

LOSS_AT_INIT_RATIO = 2.0  # loss / chance level (ln C) above which the init is overconfident
GRADIENT_RATIO = 1e3  # RMS weight gradient, last layer against first, beyond which it vanished
SCALE_RATIO = 1e2  # activation std, last activation layer against the first, beyond which the init drifts
MIN_DEPTH = 4  # weight (activation) layers needed before a geometric trend means anything
DEAD_FRACTION = 0.5  # of a ReLU layer's units zero for every sample
SATURATED_FRACTION = 0.5  # of a sigmoid/tanh layer's units in the flat tails for most samples
SMALL_BATCH = 8  # BatchNorm's batch statistics are too noisy below this many samples
LARGE_LR = 1e-3  # an attention model's lr from which warmup matters (Adam-style optimizers)
INPUT_MEAN, INPUT_STD = 3.0, 10.0  # |mean| or std of the inputs beyond which they are unnormalised


@dataclass
class Layer:
    """A leaf module as the forward pass ran it."""

    name: str
    module: nn.Module
    output: Tensor | None  # detached, for activation and weight layers


def examine(model: nn.Module, batch: Any, task: Task, config: TrainConfig) -> Report:
    """Findings about ``model`` trained by ``task`` on batches like ``batch`` (on the model's
    device) with ``config``'s settings; the model is not changed."""
    report = Report()
    config = config.resolved(loop_only=True)  # the defaults a Trainer would settle (monitor mode, warmup)
    check_inputs(report, task, batch)
    layers, loss, outputs = probe_pass(model, batch, task)
    check_structure(report, layers, model, config, rows=batch_rows(batch))
    check_signal(report, layers, loss, outputs, task)
    return report


# ------------------------------------------------------------------ the probe pass
def probe_pass(model: nn.Module, batch: Any, task: Task) -> tuple[list[Layer], float, Any]:
    """One forward/backward pass in train mode on a deep copy, recording every leaf module in the
    order it ran (with the outputs of activation and weight layers); the RNG streams are forked,
    so the run draws the same numbers afterwards."""
    clone = copy.deepcopy(model).train()
    for param in clone.parameters():
        param.grad = None
    ran: dict[str, Layer] = {}
    handles = [module.register_forward_hook(recorder(ran, name))
               for name, module in clone.named_modules() if watched(module)]  # fmt: skip
    devices = sorted({p.device.index or 0 for p in clone.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            output = task.step(clone, batch)
            loss = output.loss
            if loss.requires_grad:
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return list(ran.values()), float(loss.detach()), output.outputs


def watched(module: nn.Module) -> bool:
    """Leaf modules, and recurrent ones (an LSTM has no children but is a layer of its own)."""
    return not any(True for _ in module.children()) or isinstance(module, RECURRENT)


def recorder(ran: dict[str, Layer], name: str):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        keep = isinstance(module, WEIGHT_LAYERS) or activation_name(module) is not None
        if name not in ran:  # the first call: the forward order (a shared module counts once)
            ran[name] = Layer(name, module, output.detach() if keep and isinstance(output, Tensor) else None)

    return hook


# ---------------------------------------------------------------------- the inputs
def check_inputs(report: Report, task: Task, batch: Any) -> None:
    """Floating-point inputs far from zero mean and unit scale (raw pixels 0..255, unscaled features)."""
    inputs = [t for t in tensors_in(task.split(batch)[0]) if t.is_floating_point()]
    if not inputs:
        report.check("inputs normalised", True, skipped="no floating-point inputs")
        return
    values = inputs[0].detach().double()
    mean, std = float(values.mean()), float(values.std(correction=0))
    if report.check("inputs normalised", abs(mean) <= INPUT_MEAN and std <= INPUT_STD, mean=mean, std=std):
        return
    report.add("unnormalized_inputs", "warning", "data", {"mean": mean, "std": std},
               "the inputs are far from zero mean and unit scale, so the first layer's pre-activations are too: "
               "units saturate or die, and the lr that suits one input scale does not suit another",
               "normalise the inputs (subtract the training mean, divide by the std: torchvision Normalize, or "
               "(x - mean) / std in the dataset)")  # fmt: skip


# --------------------------------------------------------------------- the structure
def check_structure(report: Report, layers: list[Layer], model: nn.Module, config: TrainConfig, rows: int) -> None:
    batchnorms = [layer for layer in layers if isinstance(layer.module, nn.modules.batchnorm._BatchNorm)]
    recurrent = [layer.name for layer in layers if isinstance(layer.module, RECURRENT)]
    attention = [name for name, module in model.named_modules() if is_attention(module)]
    for index, layer in enumerate(layers):
        if isinstance(layer.module, nn.modules.batchnorm._BatchNorm):
            before = previous_layer(layers, index)
            if before is not None and is_dropout(before.module):
                report.add("batchnorm_after_dropout", "warning", layer.name, {"dropout": before.name, "p": before.module.p},
                           "this BatchNorm normalises a Dropout's output: its running variance is learned with "
                           "dropout on and used with dropout off, so the statistics at evaluation are wrong "
                           "(the variance shift)", "put the Dropout after the BatchNorm (Linear → BatchNorm → "
                           "activation → Dropout), or after the last BatchNorm only")  # fmt: skip
    report.check("no BatchNorm right after Dropout", "batchnorm_after_dropout" not in report.codes())
    last = previous_layer(layers, len(layers))
    if report.check("no Dropout on the output", last is None or not is_dropout(last.module),
                    last_layer=last.name if last else None):  # fmt: skip
        pass
    else:
        report.add("dropout_on_output", "warning", last.name, {"p": last.module.p},
                   "the model's output goes through Dropout: the loss sees randomly zeroed logits in training "
                   "and whole ones in evaluation", "remove the last Dropout (regularise before the output layer)")
    if batchnorms and not report.check("BatchNorm batches of 8 or more", rows >= SMALL_BATCH, rows=rows):
        report.add("batchnorm_small_batch", "warning", "--batch-size", {"rows": rows, "batchnorm_layers": len(batchnorms)},
                   f"BatchNorm normalises each micro-batch of {rows} samples by its own mean and variance: below "
                   f"{SMALL_BATCH} they are noise, and the running statistics used in evaluation are wrong",
                   "a larger --batch-size (with --accumulate to keep the step's batch), or --norm group / layer")  # fmt: skip
    if batchnorms and (recurrent or attention) and not report.check("no BatchNorm in a sequence model", False):
        report.add("batchnorm_in_sequence_model", "warning", batchnorms[0].name,
                   {"recurrent": recurrent[:3], "attention": attention[:3]},
                   "BatchNorm mixes statistics across sequences and positions of different lengths and "
                   "contents; recurrent and attention models train with LayerNorm", "--norm layer (or rms)")  # fmt: skip
    clipped = config.clip_norm is not None or config.clip_value is not None
    if recurrent and not report.check("recurrent model clips gradients", clipped):
        report.add("no_clipping_recurrent", "warning", "--clip-norm", {"recurrent": recurrent[:3]},
                   "recurrent networks have exploding gradients through time: one long sequence can throw the "
                   "weights far off", "--clip-norm 1.0")
    warmup = schedule_spec(config, steps_per_epoch=100, total_steps=1000).warmup_steps if config.schedule else 0
    lr = config.lr if isinstance(config.lr, (int, float)) else None
    if attention and lr is not None and lr >= LARGE_LR and config.optimizer == "adamw":
        if not report.check("attention model warms up", warmup > 0, lr=lr, warmup_steps=warmup):
            report.add("no_warmup", "warning", "--warmup", {"lr": lr, "warmup_steps": warmup, "attention": attention[:3]},
                       "an attention model at a large lr without warmup: Adam's first updates, from "
                       "second-moment estimates of a few steps, are large and can push the softmax into "
                       "saturation (the loss spikes or stalls early)", "--warmup 1 (epochs) or --warmup-steps 100")  # fmt: skip


def previous_layer(layers: list[Layer], index: int) -> Layer | None:
    """The layer that ran before ``layers[index]``, skipping activations and reshapes."""
    for layer in reversed(layers[:index]):
        if not (isinstance(layer.module, TRANSPARENT) or activation_name(layer.module) is not None):
            return layer
    return None


def is_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0


def is_attention(module: nn.Module) -> bool:
    """nn.MultiheadAttention or a module whose class says it is attention (trainkit's own, timm's, HF's)."""
    return isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__


# ------------------------------------------------------------------------ the signal
def check_signal(report: Report, layers: list[Layer], loss: float, outputs: Any, task: Task) -> None:
    clone_grads = [(layer.name, layer.module.weight.grad) for layer in layers
                   if isinstance(layer.module, WEIGHT_LAYERS) and layer.module.weight.grad is not None]  # fmt: skip
    finite = math.isfinite(loss) and all(bool(torch.isfinite(g).all()) for _, g in clone_grads)
    if not report.check("loss and gradients finite", finite, loss=loss):
        report.add("nonfinite", "error", "the first batch", {"loss": loss},
                   "the loss or a gradient is NaN/inf on the first batch, before any step",
                   "look for NaN/inf in the inputs, a log of zero or a division by zero in the model or loss")
        return
    check_loss_at_init(report, loss, outputs, task)
    check_gradients(report, clone_grads)
    check_activations(report, layers)


def check_loss_at_init(report: Report, loss: float, outputs: Any, task: Task) -> None:
    """Cross-entropy at init should sit near ln C (a uniform guess); far above, the output layer is
    overconfident from the start and the first steps only undo that."""
    if not isinstance(task, (Classification, NextToken)) or not isinstance(outputs, Tensor):
        report.check("loss at init near chance", True, skipped="not a cross-entropy task")
        return
    classes = outputs.shape[-1] if isinstance(task, NextToken) or outputs.dim() < 3 else outputs.shape[1]
    chance = math.log(classes)
    if report.check("loss at init near chance", loss <= LOSS_AT_INIT_RATIO * chance, loss=loss, chance=chance):
        return
    report.add("loss_at_init", "warning", "the output layer", {"loss": loss, "chance": chance, "classes": classes},
               f"the loss at initialisation is {loss / chance:.1f}x the chance level ln {classes} = {chance:.2f}: "
               "the outputs start large and confidently wrong", "scale the last layer's init down (e.g. its weight "
               "by 0.1, or zero it), or check that the outputs are logits, not probabilities")  # fmt: skip


def check_gradients(report: Report, grads: list[tuple[str, Tensor]]) -> None:
    """RMS weight gradient of the first layer (nearest the input) against the last (the output).
    A layer without any gradient (all units dead) is dead_units' finding, not this one's."""
    rms = [float(g.double().pow(2).mean().sqrt()) for _, g in grads]
    if len(grads) < MIN_DEPTH or min(rms[0], rms[-1]) == 0:
        report.check("gradients keep their scale with depth", True, skipped=f"fewer than {MIN_DEPTH} weight layers, "
                     "or a layer without gradient")  # fmt: skip
        return
    ratio = rms[0] / rms[-1]
    if report.check("gradients keep their scale with depth", ratio >= 1 / GRADIENT_RATIO, ratio=ratio):
        return
    report.add("vanishing_gradients", "warning", grads[0][0],
               {"first_layer": grads[0][0], "first_rms": rms[0], "last_layer": grads[-1][0], "last_rms": rms[-1],
                "depth": len(grads), "ratio": ratio},
               f"the first layer's gradient is {ratio:.1e} of the last one's: the early layers barely learn",
               "an activation that passes gradients (--activation relu or gelu) with its init (--init he), "
               "normalisation (--norm batch or layer) or residual connections")  # fmt: skip


def check_activations(report: Report, layers: list[Layer]) -> None:
    activations = [layer for layer in layers if layer.output is not None and activation_name(layer.module) is not None]
    for layer in activations:
        values = layer.output.detach().reshape(layer.output.shape[0], -1)
        if isinstance(layer.module, RELU_LIKE):
            dead = dead_fraction(layer.output)
            if not report.check(f"{layer.name}: live units", dead <= DEAD_FRACTION, dead_fraction=dead):
                report.add("dead_units", "warning", layer.name, {"dead_fraction": dead},
                           f"{dead:.0%} of this ReLU's units output zero for every sample: they pass no gradient "
                           "and never recover", "--init he, a smaller lr, or an activation without a dead side "
                           "(--activation gelu / leaky_relu)")  # fmt: skip
        elif isinstance(layer.module, SQUASHING):
            low = 0.02 if isinstance(layer.module, nn.Sigmoid) else -0.96
            high = 0.98 if isinstance(layer.module, nn.Sigmoid) else 0.96
            tails = ((values < low) | (values > high)).double().mean(dim=0)
            saturated = float((tails > 0.9).double().mean())
            if not report.check(f"{layer.name}: units off the flat tails", saturated <= SATURATED_FRACTION,
                                saturated_fraction=saturated):  # fmt: skip
                report.add("saturated_units", "warning", layer.name, {"saturated_fraction": saturated},
                           f"{saturated:.0%} of this {type(layer.module).__name__}'s units sit in its flat tails, "
                           "where the gradient is nearly zero", "--init xavier for sigmoid/tanh, normalised inputs, "
                           "normalisation before the activation (--norm batch or layer)")  # fmt: skip
    if len(activations) < MIN_DEPTH:
        return
    first, last = (float(layer.output.double().std(correction=0)) for layer in (activations[0], activations[-1]))
    if min(first, last) == 0:  # a layer with no spread at all is dead (dead_units), not a scale drift
        return
    ratio = last / first
    if not report.check("activation scale steady with depth", 1 / SCALE_RATIO <= ratio <= SCALE_RATIO, ratio=ratio):
        report.add("init_scale", "warning", activations[-1].name,
                   {"first_layer": activations[0].name, "first_std": first, "last_std": last, "ratio": ratio,
                    "depth": len(activations)},
                   f"the activations' spread changes {ratio:.1e}x from the first hidden layer to the last: the init "
                   "does not suit the activation, so the signal fades (or blows up) with depth",
                   "--init he for ReLU-like activations, xavier for tanh/sigmoid (or normalisation layers)")  # fmt: skip

"""Mixed precision: the autocast dtype of ``--precision``, and what fp16's GradScaler means for the numbers.

bf16 and fp16 run the forward pass and the loss under ``torch.autocast`` (weights stay fp32).
fp16 also needs a GradScaler: the loss is multiplied by a large scale before backward so small
gradients do not flush to zero, and a step whose scaled gradients overflowed is skipped by
``scaler.step`` and the scale halved. Such overflows are normal (the first steps at the default
2**16, and after each growth of the scale), so the loop must not report them as gradients:
``overflow`` reads the scaler's own found-inf flags after ``unscale_`` (device tensors, no host
sync), and the step's gradient norm and clip flag are masked with it.
"""

from __future__ import annotations

import logging

import torch

from trainkit.errors import ConfigError

log = logging.getLogger("trainkit")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name (None: full fp32)."""
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU (GradScaler); on CPU use --precision bf16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def precision_for_inference(precision: str, device: torch.device) -> str:
    """The precision to evaluate a checkpoint in on ``device``: its own, except fp16 off CUDA (which
    only trains with a CUDA GradScaler; its weights are fp32), evaluated in fp32 there, said once."""
    if precision == "fp16" and device.type != "cuda":
        log.info("the checkpoint trained with --precision fp16, which needs CUDA; using fp32 on %s", device)
        return "fp32"
    return precision


def overflow(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor | None:
    """After ``scaler.unscale_(optimizer)``: a bool tensor on ``device``, True when this step's gradients
    overflowed and ``scaler.step`` will skip it (None when no scaler runs). Every device's found-inf
    flag counts: with FSDP's CPU offload the gradients are on the host."""
    if not scaler.is_enabled():
        return None
    found = scaler._found_inf_per_device(optimizer)  # what scaler.step itself reads
    if not found:
        return None
    return torch.stack([flag.to(device, non_blocking=True) for flag in found.values()]).sum() > 0


def masked_by_overflow(
    grad_norm: torch.Tensor, clipped: torch.Tensor, overflowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's gradient norm and clip flag as the run reports them: 0 and False on a step the
    GradScaler skips (its inf norm is an artefact of the loss scale, and no update happens)."""
    if overflowed is None:
        return grad_norm, clipped
    return torch.where(overflowed, torch.zeros_like(grad_norm), grad_norm), clipped & ~overflowed

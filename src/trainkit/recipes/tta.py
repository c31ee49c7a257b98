"""Test-time augmentation: the model's logits averaged over small shifts of each test image.

``--tta shifts`` evaluates the (final) model on each image and on its four one-pixel shifts
(up, down, left, right; uncovered pixels get the background value, as training's ``--augment``
does) and averages the five logits. The plain test figure is reported beside it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainkit.data.device import shift_images
from trainkit.errors import ConfigError

# (dy, dx) of each view: the image itself, then one pixel down, up, right, left
SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


class ShiftAveraged(nn.Module):
    """``model`` applied to each shifted view of an image batch (N, ..., H, W), logits averaged."""

    def __init__(self, model: nn.Module, fill: float = 0.0, shifts: tuple[tuple[int, int], ...] = SHIFTS) -> None:
        super().__init__()
        self.model = model
        self.fill = fill
        self.shifts = shifts

    def forward(self, images: Tensor) -> Tensor:
        require_images(images)
        total = None
        for dy, dx in self.shifts:
            view = images if (dy, dx) == (0, 0) else shifted(images, dy, dx, self.fill)
            logits = self.model(view).float()
            total = logits if total is None else total + logits
        return total / len(self.shifts)


def shifted(images: Tensor, dy: int, dx: int, fill: float) -> Tensor:
    """Every image moved by (dy, dx) pixels, in the input's memory format."""
    # filled on the device: no host-to-device copy per shift per batch
    offsets = torch.full((images.shape[0], 2), dy, dtype=torch.long, device=images.device)
    offsets[:, 1] = dx
    moved = shift_images(images, offsets, max(abs(dy), abs(dx)), fill)
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last):
        moved = moved.contiguous(memory_format=torch.channels_last)
    return moved


def require_images(inputs: object) -> None:
    if not isinstance(inputs, Tensor) or inputs.dim() < 3 or min(inputs.shape[-2:]) < 2:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ConfigError(f"--tta shifts needs image batches shaped (N, ..., H, W); the inputs are {shape}")

"""Keras 3 (torch backend) versions of trainkit's MNIST MLP and CNN, with the same optimizer
settings, for the side-by-side benchmarks (loops.py per epoch, keras_mnist.py time to accuracy).

Idiomatic Keras, as its users write it: Keras layers of the same architecture (BatchNorm with
PyTorch's momentum and epsilon, He-normal kernels), ``model.fit`` on arrays in channels-last
layout, AdamW with decay excluded from biases and BatchNorm scales/shifts, global norm clipping.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is imported anywhere

import keras  # noqa: E402

BN = {"momentum": 0.9, "epsilon": 1e-5}  # torch's BatchNorm defaults in Keras' terms


def keras_model(name: str, dropout: float) -> keras.Model:
    """The MLP 784-256-128-10 or the CNN 32-64-128, each block Linear/Conv → BN → ReLU (→ pool)."""
    inputs = keras.Input((28, 28, 1))
    x = inputs
    if name == "mlp":
        x = keras.layers.Flatten()(x)
        for width in (256, 128):
            x = keras.layers.Dense(width, kernel_initializer="he_normal")(x)
            x = keras.layers.BatchNormalization(**BN)(x)
            x = keras.layers.ReLU()(x)
            x = keras.layers.Dropout(dropout)(x) if dropout else x
    else:
        for channels in (32, 64, 128):
            x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, kernel_initializer="he_normal")(x)
            x = keras.layers.BatchNormalization(**BN)(x)
            x = keras.layers.ReLU()(x)
            x = keras.layers.MaxPooling2D(2)(x)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dropout(dropout)(x) if dropout else x
    outputs = keras.layers.Dense(10, kernel_initializer="he_normal")(x)
    return keras.Model(inputs, outputs)


def compiled(model: keras.Model, learning_rate, weight_decay: float, clip_norm: float) -> keras.Model:
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay, global_clipnorm=clip_norm)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])  # fmt: skip
    return model


class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """torch.optim.lr_scheduler.OneCycleLR's default shape (cosine up over 30% of the steps
    from max/25, cosine down to max/25e4): Keras has no one-cycle schedule of its own."""

    def __init__(self, max_lr: float, total_steps: int, pct_start: float = 0.3) -> None:
        self.max_lr, self.total_steps, self.pct_start = max_lr, total_steps, pct_start

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up_steps = self.pct_start * self.total_steps - 1
        initial, final = self.max_lr / 25, self.max_lr / 25 / 1e4

        def cosine(start, end, fraction):
            return end + (start - end) / 2 * (1 + keras.ops.cos(math.pi * keras.ops.clip(fraction, 0.0, 1.0)))

        rising = cosine(initial, self.max_lr, step / up_steps)
        falling = cosine(self.max_lr, final, (step - up_steps) / (self.total_steps - 1 - up_steps))
        return keras.ops.where(step <= up_steps, rising, falling)

    def get_config(self) -> dict:
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start}


class EpochTimer(keras.callbacks.Callback):
    """Seconds of each epoch, measured inside fit."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None) -> None:
        import time

        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None) -> None:
        import time

        self.seconds.append(time.perf_counter() - self._started)

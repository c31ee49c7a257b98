"""MNIST with Keras 3 on its torch backend, for time-to-accuracy next to trainkit and Lightning.

    python benchmarks/keras_mnist.py --model mlp --epochs 4 --batch-size 512 --lr 0.01 --precision bf16

The same architecture (benchmarks/keras_models.py), optimizer (AdamW, weight decay 0.01 on
kernels only, global norm clipping at 1), one-cycle schedule per step and batch size as
trainkit's recipe; the same IDX files, all 60,000 training images, in channels-last arrays.
Prints one JSON line: test accuracy and the seconds spent inside the process.
"""

from __future__ import annotations

import json
import time

STARTED = time.perf_counter()

from keras_models import OneCycle, compiled, keras, keras_model  # noqa: E402
from time_to_accuracy import recipe_parser  # noqa: E402

from trainkit.recipes.images import load_dataset  # noqa: E402


def main() -> None:
    args = recipe_parser("bf16", ("fp32", "bf16")).parse_args()
    keras.utils.set_random_seed(0)
    if args.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    data = load_dataset("mnist", args.data_dir, val_size=0, seed=0)
    x_train, x_test = (split.x.permute(0, 2, 3, 1).numpy() for split in (data.train, data.test))
    steps = -(-len(x_train) // args.batch_size) * args.epochs
    model = compiled(keras_model(args.model, args.dropout), OneCycle(args.lr, steps), 0.01, 1.0)
    model.fit(x_train, data.train.y.numpy(), batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0)
    _, accuracy = model.evaluate(x_test, data.test.y.numpy(), batch_size=1024, verbose=0)
    print(json.dumps({"test_accuracy": float(accuracy), "in_process_seconds": time.perf_counter() - STARTED}))


if __name__ == "__main__":
    main()

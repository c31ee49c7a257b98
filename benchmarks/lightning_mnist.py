"""MNIST with PyTorch Lightning, set up the way its documentation shows, for time-to-accuracy.

    python benchmarks/lightning_mnist.py --model mlp --epochs 4 --batch-size 512 --lr 0.01 --precision bf16-mixed

The same model (trainkit's builder, He init), optimizer (AdamW, weight decay 0.01),
one-cycle schedule stepped per batch and gradient clipping as trainkit's recipe; data from
the same IDX files (torchvision has no CPU build here) in a TensorDataset + DataLoader.
Prints one JSON line: test accuracy and the seconds spent inside the process.
"""

from __future__ import annotations

import json
import logging
import time

STARTED = time.perf_counter()

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from time_to_accuracy import recipe_parser  # noqa: E402
from trainkit.recipes.images import load_dataset  # noqa: E402
from trainkit.nn.init import init_weights  # noqa: E402
from trainkit.nn.models import build_model  # noqa: E402


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float, steps: int) -> None:
        super().__init__()
        self.model, self.lr, self.steps = model, lr, steps
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = self.loss_fn(self(inputs), targets)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch, batch_idx):
        inputs, targets = batch
        self.log("test_acc", (self(inputs).argmax(1) == targets).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main() -> None:
    args = recipe_parser("bf16-mixed", ("32-true", "bf16-mixed")).parse_args()  # Lightning's precision names
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    L.seed_everything(0, verbose=False)

    data = load_dataset("mnist", args.data_dir, val_size=0, seed=0)
    train = DataLoader(TensorDataset(data.train.x, data.train.y), batch_size=args.batch_size, shuffle=True)
    test = DataLoader(TensorDataset(data.test.x, data.test.y), batch_size=1024)
    model = init_weights(build_model(args.model, data.input_shape, 10, dropout=args.dropout), "he")
    module = Classifier(model, args.lr, steps=len(train) * args.epochs)
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, precision=args.precision, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train)
    accuracy = trainer.test(module, test, verbose=False)[0]["test_acc"]
    print(json.dumps({"test_accuracy": accuracy, "in_process_seconds": time.perf_counter() - STARTED}))


if __name__ == "__main__":
    main()

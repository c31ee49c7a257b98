"""Regression on a table of numbers: scikit-learn's diabetes data, an MLP, early stopping.

What it shows
    * tabular data as ``TensorDataset(x, y)``: the Trainer trains on it as device tensors
      (``DeviceBatches``, no DataLoader), shuffled by (seed, epoch);
    * standardising features *and* target with the training split's statistics only, so
      nothing about the validation or test rows leaks into training;
    * ``Regression()`` (MSE loss; MAE and R² metrics) and ``EarlyStopping("val_loss")``,
      which restores the best epoch's weights at the end;
    * ``make_datasets()`` / ``make_model()`` factories, so the same file also trains with the CLI.

Run (from the repository root)::

    .venv/bin/python examples/regression_tabular.py
    .venv/bin/python examples/regression_tabular.py --epochs 20 --hidden 32   # smaller, faster

or with the command line (from examples/, so the module is importable)::

    ../.venv/bin/python -m trainkit train --model regression_tabular:make_model \\
        --dataset regression_tabular:make_datasets --task regression --metrics mae,r2 \\
        --model-arg hidden=32 --device cpu --out runs/diabetes

The last line printed is JSON with the measured test R² and MAE (standardised and in the
target's own units) and, for scale, a ridge regression's test R² on the same split.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from trainkit.loop.callbacks import EarlyStopping
from trainkit.config.schema import TrainConfig
from trainkit.tasks.kinds import Regression
from trainkit import Trainer


def split_indices(rows: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded shuffle cut into train / val / test: the same split every time for one seed
    (``trainkit evaluate`` rebuilds the test set from the factory and must get the same rows)."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(rows * val_fraction), round(rows * test_fraction)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def standardised_splits(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2):
    """(train, val, test) TensorDatasets, standardised with the training rows' mean and std,
    and the target's std (to turn a standardised MAE back into the target's units)."""
    features, target = load_diabetes(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(target, dtype=torch.float32)
    train, val, test = split_indices(len(x), val_fraction, test_fraction, seed)
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()
    datasets = tuple(TensorDataset((x[i] - x_mean) / x_std, (y[i] - y_mean) / y_std) for i in (train, val, test))
    return datasets, float(y_std)


def make_datasets(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> tuple[TensorDataset, ...]:
    """Dataset factory for ``trainkit train --dataset regression_tabular:make_datasets``."""
    datasets, _ = standardised_splits(seed, val_fraction, test_fraction)
    return datasets


def make_model(hidden: int = 64, dropout: float = 0.1, features: int = 10) -> nn.Module:
    """Model factory for ``--model regression_tabular:make_model``: one output per row."""
    return nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, 1),
    )  # fmt: skip


def ridge_r2(train: TensorDataset, test: TensorDataset) -> float:
    """A linear baseline on the same standardised split: what the MLP has to beat."""
    (x_train, y_train), (x_test, y_test) = train.tensors, test.tensors
    return float(Ridge(alpha=1.0).fit(x_train.numpy(), y_train.numpy()).score(x_test.numpy(), y_test.numpy()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200, help="at most; early stopping usually ends sooner")
    parser.add_argument("--patience", type=int, default=20, help="validations without improvement before stopping")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write history.csv and checkpoints here (default: nothing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # the model's initial weights
    (train, val, test), target_std = standardised_splits(seed=args.seed)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device="cpu", seed=args.seed)
    stopper = EarlyStopping("val_loss", patience=args.patience)
    trainer = Trainer(make_model(args.hidden), config, task=Regression(), callbacks=[stopper], out_dir=args.out)
    history = trainer.fit(train, val)
    measured = trainer.evaluate(test)  # the best epoch's weights: EarlyStopping restored them
    result = {
        "test_r2": measured["r2"],
        "test_mae": measured["mae"],  # standardised units
        "test_mae_target_units": measured["mae"] * target_std,
        "test_loss": measured["loss"],
        "ridge_test_r2": ridge_r2(train, test),
        "best_epoch": stopper.best_epoch,
        "epochs_run": len(history),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # trainkit's one line per epoch
    main()

"""trainkit: train deep networks reliably and fast on PyTorch.

``from trainkit import Trainer, TrainConfig, Callback, EarlyStopping`` (and the names in
``__all__``) import lazily: ``import trainkit`` alone does not import torch, so the ``trainkit``
command installs its signal handlers before the slow imports (trainkit.entry).
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Trainer": "trainkit.loop.trainer",
    "TrainConfig": "trainkit.config",
    "Callback": "trainkit.callbacks",
    "EarlyStopping": "trainkit.callbacks",
    "TrainState": "trainkit.callbacks",
    "Task": "trainkit.tasks",
    "StepOutput": "trainkit.tasks",
    "Classification": "trainkit.tasks",
    "MultiLabel": "trainkit.tasks",
    "Regression": "trainkit.tasks",
    "NextToken": "trainkit.tasks",
    "DeviceBatches": "trainkit.batches",
    "DatasetBatches": "trainkit.batches",
    "LoaderBatches": "trainkit.batches",
    "train_run": "trainkit.run",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainkit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

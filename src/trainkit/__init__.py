"""trainkit: train deep networks reliably and fast on PyTorch.

``from trainkit import Trainer, TrainConfig, Callback, EarlyStopping`` (and the names in
``__all__``) import lazily: ``import trainkit`` alone does not import torch, so the ``trainkit``
command installs its signal handlers before the slow imports (trainkit.entry).
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Trainer": "trainkit.loop.trainer",
    "TrainConfig": "trainkit.config.schema",
    "Callback": "trainkit.loop.callbacks",
    "EarlyStopping": "trainkit.loop.callbacks",
    "TrainState": "trainkit.loop.callbacks",
    "Task": "trainkit.tasks.base",
    "StepOutput": "trainkit.tasks.base",
    "Classification": "trainkit.tasks.kinds",
    "MultiLabel": "trainkit.tasks.kinds",
    "Regression": "trainkit.tasks.kinds",
    "NextToken": "trainkit.tasks.kinds",
    "DeviceBatches": "trainkit.data",
    "DatasetBatches": "trainkit.data",
    "LoaderBatches": "trainkit.data",
    "train_run": "trainkit.recipes.run",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainkit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

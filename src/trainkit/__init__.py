"""trainkit: train deep networks reliably and fast on PyTorch."""

__version__ = "0.1.0"

from __future__ import annotations

from pathlib import Path

import pytest

from trainkit.config.schema import TrainConfig

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def never_download(monkeypatch, tmp_path_factory):
    """Tests never reach the network: no downloads, an empty cache, MNIST from ../shared."""
    monkeypatch.setenv("TRAINKIT_OFFLINE", "1")
    monkeypatch.setenv("TRAINKIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(SHARED_DATASETS))


@pytest.fixture
def synthetic_config(tmp_path):
    """A fast, fully seeded run on the synthetic dataset, writing under tmp_path."""

    def make(**overrides) -> TrainConfig:
        base = dict(dataset="synthetic", epochs=3, batch_size=64, device="cpu", out=str(tmp_path / "run"))
        return TrainConfig(**{**base, **overrides})

    return make

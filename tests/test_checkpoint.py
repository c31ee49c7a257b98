"""Checkpoint files: atomic writes, safe loading, retention, and the model hash."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from trainkit.checkpoint import CheckpointDir, load_checkpoint, model_sha256, save_checkpoint
from trainkit.errors import CheckpointError


def payload(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "epoch": 1, "history": [{"val_loss": 0.5}]}


def test_round_trip(tmp_path):
    save_checkpoint(payload(2.0), tmp_path / "a.pt")
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 2.0)) and loaded["history"] == [{"val_loss": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"], "no temporary files left behind"


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    save_checkpoint(payload(1.0), path)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(payload(9.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_damaged_files_are_named_in_a_clear_error(tmp_path, damage):
    path = tmp_path / "a.pt"
    save_checkpoint(payload(), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint"}[damage])
    with pytest.raises(CheckpointError, match="a.pt"):
        load_checkpoint(path)


class Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PWNED']).write_text('x')",))


def test_a_malicious_pickle_is_refused_and_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a trainkit checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_retention_keeps_the_last_n_and_best(tmp_path):
    folder = CheckpointDir(tmp_path, keep_last=2)
    for epoch in range(1, 6):
        folder.save(payload(float(epoch)), epoch, is_best=epoch == 2)
    assert [p.name for p in folder.epoch_files()] == ["epoch-0004.pt", "epoch-0005.pt"]
    assert folder.latest().name == "epoch-0005.pt"
    assert torch.equal(load_checkpoint(folder.best_path)["model"]["w"], torch.full((3,), 2.0))


def test_model_sha256_changes_with_any_weight_and_is_order_independent():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    digest = model_sha256(model)
    state = model.state_dict()
    assert model_sha256(dict(reversed(list(state.items())))) == digest
    with torch.no_grad():
        model.bias[0] += 1e-7
    assert model_sha256(model) != digest
    assert len(digest) == 64 and pickle.loads(pickle.dumps(digest)) == digest

"""Checkpoint files: atomic writes, integrity, safe loading, retention, and the model hash."""

from __future__ import annotations

import errno
import hashlib
import io
import logging

import pytest
import torch
from torch import nn

from trainkit.checkpoint import file as checkpoint_file
from trainkit.checkpoint import store as checkpoint_store
from trainkit.checkpoint.file import TRAILER_MAGIC, model_sha256, save_checkpoint
from trainkit.checkpoint.store import CheckpointDir, load_checkpoint, verify_checkpoint
from trainkit.errors import CheckpointError


def payload(value: float = 1.0, size: int = 3) -> dict:
    """The smallest payload with every entry a trainkit checkpoint holds."""
    return {
        "model": {"w": torch.full((size,), value)}, "epoch": 1, "history": [{"val_loss": 0.5}],
        "config": {}, "run_info": {}, "optimizer": {}, "scheduler": None, "scaler": {}, "position": None,
        "global_step": 0, "best_metric": None, "best_epoch": None, "rollbacks": 0, "lr_scale": 1.0,
        "callbacks": {}, "rng": {"torch": torch.zeros(1, dtype=torch.uint8), "cuda": [], "python": None, "numpy": {}},
    }  # fmt: skip


def test_round_trip_and_plain_torch_load_still_reads_the_file(tmp_path):
    save_checkpoint(payload(2.0), tmp_path / "a.pt")
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 2.0)) and loaded["history"] == [{"val_loss": 0.5}]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["model"]["w"], torch.full((3,), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"], "no temporary files left behind"


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    save_checkpoint(payload(1.0), path)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_file.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(payload(9.0), path)
    monkeypatch.undo()
    assert verify_checkpoint(path) is None
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: d[:-1], "no integrity trailer"),
        (lambda d: d[: len(d) // 2], "no integrity trailer"),
        (lambda d: b"", "empty"),
        (lambda d: d[:100] + bytes([d[100] ^ 0x01]) + d[101:], "sha256"),
    ],
    ids=["truncated-by-one-byte", "truncated-by-half", "empty", "flipped-byte"],
)
def test_damaged_files_are_detected_and_named(tmp_path, damage, reason):
    path = tmp_path / "a.pt"
    save_checkpoint(payload(), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"a\.pt.*{reason}"):
        load_checkpoint(path)
    assert reason in verify_checkpoint(path)


def test_every_single_bit_flip_is_detected_including_tensor_bytes(tmp_path):
    """torch.load alone would happily return altered tensor values; the sha256 trailer does not."""
    path = tmp_path / "a.pt"
    save_checkpoint(payload(0.25, size=64), path)
    data = path.read_bytes()
    tensor_bytes = torch.full((64,), 0.25).numpy().tobytes()
    tensor_at = data.index(tensor_bytes)
    positions = sorted({*range(0, len(data), 7), *range(tensor_at, tensor_at + len(tensor_bytes)), len(data) - 1})
    undetected = []
    for position in positions:
        for bit in (0, 5):
            flipped = bytearray(data)
            flipped[position] ^= 1 << bit
            path.write_bytes(bytes(flipped))
            if verify_checkpoint(path) is None:
                undetected.append((position, bit))
    assert len(positions) > 300
    assert undetected == []
    # the point of the trailer: a flip inside the tensor payload is invisible to torch.load
    flipped = bytearray(data)
    flipped[tensor_at + 1] ^= 0x01
    body = bytes(flipped[: -checkpoint_file.TRAILER_SIZE])
    silently_wrong = torch.load(io.BytesIO(body), weights_only=True)["model"]["w"]
    assert not torch.equal(silently_wrong, torch.full((64,), 0.25))


class Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib, os; pathlib.Path(os.environ['PWNED']).write_text('x')",))


def malicious_file(path, with_valid_trailer: bool) -> None:
    buffer = io.BytesIO()
    torch.save({"model": {}, "payload": Exploit()}, buffer)
    body = buffer.getvalue()
    trailer = TRAILER_MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" if with_valid_trailer else b""
    path.write_bytes(body + trailer)


@pytest.mark.parametrize("with_valid_trailer", [True, False])
def test_a_malicious_pickle_is_refused_and_does_not_run(tmp_path, monkeypatch, with_valid_trailer):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(marker))
    path = tmp_path / "evil.pt"
    malicious_file(path, with_valid_trailer)
    with pytest.raises(CheckpointError, match="refused by safe loading|no integrity trailer"):
        load_checkpoint(path)
    assert not marker.exists()


def test_safe_loading_names_the_refused_global(tmp_path, monkeypatch):
    monkeypatch.setenv("PWNED", str(tmp_path / "pwned"))
    malicious_file(tmp_path / "evil.pt", with_valid_trailer=True)
    with pytest.raises(CheckpointError, match="refused global (builtins\\.)?exec"):
        load_checkpoint(tmp_path / "evil.pt")


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    save_checkpoint({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a complete trainkit checkpoint: no model state"):
        load_checkpoint(tmp_path / "other.pt")


def test_names_sort_by_training_position(tmp_path):
    folder = CheckpointDir(tmp_path, keep_last=10)
    for epoch, step in [(1, None), (2, 150), (2, None), (3, 250), (2, 120)]:
        folder.save(payload(), epoch=epoch, step=step)
    assert [p.path.name for p in folder.checkpoints()] == [
        "epoch-0001.pt", "epoch-0002-step-00000120.pt", "epoch-0002-step-00000150.pt",
        "epoch-0002.pt", "epoch-0003-step-00000250.pt",
    ]  # fmt: skip


def test_retention_keeps_the_last_n_every_kth_epoch_and_best(tmp_path):
    folder = CheckpointDir(tmp_path, keep_last=2, keep_every=3)
    for epoch in range(1, 8):
        folder.save(payload(float(epoch)), epoch=epoch, step=None)
        if epoch == 2:
            folder.save_best(payload(float(epoch)))
        folder.save(payload(float(epoch)), epoch=epoch + 1, step=epoch * 100)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "epoch-0003.pt", "epoch-0006.pt", "epoch-0007.pt", "epoch-0008-step-00000700.pt"]
    assert torch.equal(load_checkpoint(folder.best_path)["model"]["w"], torch.full((3,), 2.0))


def test_newest_valid_falls_back_past_damaged_files_and_says_which(tmp_path, caplog):
    folder = CheckpointDir(tmp_path, keep_last=5)
    for epoch in (1, 2, 3):
        folder.save(payload(float(epoch)), epoch=epoch, step=None)
    newest = folder.path_for(3, None)
    newest.write_bytes(newest.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        path, loaded = folder.newest_valid()
    assert path.name == "epoch-0002.pt" and torch.equal(loaded["model"]["w"], torch.full((3,), 2.0))
    assert "skipping epoch-0003.pt" in caplog.text and "no integrity trailer" in caplog.text


def test_retention_keeps_the_file_it_resumed_from_and_the_one_it_wrote(tmp_path):
    """The review's E16: damaged files named after the resume point must not push the good ones out."""
    folder = CheckpointDir(tmp_path, keep_last=3)  # the report got three files by two crashes in retention
    for epoch, step in ((1, 15), (1, 20), (1, None)):
        folder.save(payload(float(step or 0)), epoch=epoch, step=step)
    for damaged in (folder.path_for(1, 20), folder.path_for(1, None)):
        damaged.write_bytes(damaged.read_bytes()[:-1])
    folder.keep_last = 1
    path, _ = folder.newest_valid()
    assert path.name == "epoch-0001-step-00000015.pt"
    written = folder.save(payload(20.0), epoch=1, step=20)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch-0001-step-00000020.pt", "epoch-0001-step-00000020.pt.corrupt", "epoch-0001.pt.corrupt"]
    assert folder.newest_valid()[0] == written


def test_leftover_temp_files_are_removed(tmp_path):
    folder = CheckpointDir(tmp_path)
    (tmp_path / ".epoch-0002.pt.1234.tmp").write_bytes(b"partial")
    folder.save(payload(), epoch=1, step=None)
    assert [p.name for p in folder.remove_temp_files()] == [".epoch-0002.pt.1234.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.pt"]


def test_a_full_disk_makes_room_from_older_checkpoints_instead_of_failing_every_save(tmp_path, monkeypatch, caplog):
    real = checkpoint_store.save_checkpoint

    def save_on_a_disk_with_room_for_two(data, path):
        if len(list(tmp_path.glob("epoch-*.pt"))) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(data, path)

    monkeypatch.setattr(checkpoint_store, "save_checkpoint", save_on_a_disk_with_room_for_two)
    folder = CheckpointDir(tmp_path, keep_last=3)
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        for epoch in (1, 2, 3, 4):
            folder.save(payload(float(epoch)), epoch=epoch, step=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0003.pt", "epoch-0004.pt"]
    assert "disk full: deleted epoch-0001.pt to make room (kept epoch-0002.pt)" in caplog.text

    def save_on_a_full_disk(data, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_store, "save_checkpoint", save_on_a_full_disk)
    with pytest.raises(OSError, match="No space"):  # room made once, still full: reported, not retried forever
        folder.save(payload(5.0), epoch=5, step=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0004.pt"]  # the newest valid file is never deleted


def test_model_sha256_changes_with_any_weight_and_is_order_independent():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    digest = model_sha256(model)
    state = model.state_dict()
    assert model_sha256(dict(reversed(list(state.items())))) == digest
    with torch.no_grad():
        model.bias[0] += 1e-7
    assert model_sha256(model) != digest and len(digest) == 64

"""What --resume accepts and what it refuses: the data itself, damaged or crafted checkpoints,
a damaged best.pt, and a run that stopped early. In process: a callback crashes the run."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from crashes import crash

from trainkit.callbacks import Callback
from trainkit.checkpoint import CheckpointDir, encode, load_checkpoint
from trainkit.cli import EXIT_UNVERIFIED, EXIT_USAGE, main
from trainkit.errors import CheckpointError, ConfigError
from trainkit.run import fingerprint_differences, resolve_auto_lr, resume_config, train_run
from trainkit.components import data_fingerprint

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted 3-epoch synthetic run (checkpoints every 20 steps) and its summary."""
    from trainkit.config import TrainConfig

    out = tmp_path_factory.mktemp("reference") / "run"
    config = TrainConfig(dataset="synthetic", epochs=3, batch_size=64, device="cpu", patience=0,
                         checkpoint_every_steps=20, out=str(out))  # fmt: skip
    return {"out": out, "summary": train_run(config), "config": config}


# ------------------------------------------------------------------------ the data
def mirrored_mnist(folder: Path) -> Path:
    """MNIST with the training images mirrored: same shapes, labels and pixel histogram."""
    folder.mkdir()
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        os.symlink(SHARED_MNIST / name, folder / name)
    raw = gzip.decompress((SHARED_MNIST / "train-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:, :, ::-1]
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:16] + images.tobytes(), 1))
    return folder


def test_resume_on_other_images_with_the_same_labels_and_histogram_is_refused(synthetic_config, tmp_path):
    config = synthetic_config(dataset="mnist", data_dir=str(SHARED_MNIST), train_size=500, val_size=100, epochs=2)
    out = crash(config, epoch=2)
    mirrored = mirrored_mnist(tmp_path / "mirrored")
    with pytest.raises(CheckpointError, match=r"trained on different data \(training images, validation images differ\)"):
        train_run(resume_config(out, {"data_dir": str(mirrored)}), resume=True)
    resumed = train_run(resume_config(out, {}), resume=True)  # the same data resumes
    assert resumed["epochs_run"] == 2


def test_the_fingerprint_names_each_part_that_differs(synthetic_config):
    from trainkit.data import load_dataset

    data = load_dataset("synthetic", seed=0)
    saved = data_fingerprint(data)
    data.train.x[0, 0, 0, 0] += 1e-6  # one pixel of one image
    assert fingerprint_differences(saved, data_fingerprint(data)) == ["training images"]
    assert fingerprint_differences("0123abcd", saved) == [
        "the checkpoint's data fingerprint comes from an older trainkit and cannot be compared"
    ]


# ------------------------------------------------------- damaged and crafted files
def test_when_no_epoch_or_step_checkpoint_verifies_resume_uses_best_pt_and_says_so(reference, synthetic_config, caplog):
    out = crash(synthetic_config(epochs=3, patience=0, checkpoint_every_steps=20), epoch=3)
    folder = CheckpointDir(out / "checkpoints")
    for name in folder.checkpoints():
        flip_a_byte(name.path)
    summary = train_run(resume_config(out, {}), resume=True)
    assert "using best.pt (end of epoch" in caplog.text
    assert summary["model_sha256"] == reference["summary"]["model_sha256"]
    assert sorted(p.name for p in (out / "checkpoints").glob("*.corrupt")), "the damaged files are set aside"


def crafted_payloads(real: dict) -> dict[str, bytes]:
    def trailer(body: bytes) -> bytes:
        return body + b"TRAINKIT-SHA256:" + hashlib.sha256(body).hexdigest().encode() + b"\n"

    wrong_shapes = {key: torch.zeros(3, 3) for key in real["model"]}
    return {
        "text-with-a-valid-trailer": trailer(b"hello world, not a torch file"),
        "model-only": encode({"model": real["model"]}),
        "model-is-an-int": encode({**real, "model": 5}),
        "weights-of-another-model": encode({**real, "model": wrong_shapes}),
    }


@pytest.mark.parametrize("kind", ["text-with-a-valid-trailer", "model-only", "model-is-an-int",
                                  "weights-of-another-model"])  # fmt: skip
@pytest.mark.parametrize("force", [False, True])
def test_resume_falls_back_past_a_crafted_newest_checkpoint(kind, force, reference, synthetic_config, tmp_path, caplog):
    out = crash(synthetic_config(epochs=3, patience=0, checkpoint_every_steps=20), epoch=3)
    real = load_checkpoint(out / "checkpoints" / "epoch-0002.pt")
    crafted = out / "checkpoints" / "epoch-0003-step-00000101.pt"  # newer than every real file
    crafted.write_bytes(crafted_payloads(real)[kind])
    summary = train_run(resume_config(out, {}, force=force), resume=True, force_resume=force)
    assert f"skipping {crafted.name}" in caplog.text and "renamed it" in caplog.text
    assert (out / "checkpoints" / f"{crafted.name}.corrupt").is_file()
    assert summary["model_sha256"] == reference["summary"]["model_sha256"]


def test_inspect_and_evaluate_on_crafted_files_are_one_line(reference, tmp_path, capsys):
    real = load_checkpoint(reference["out"] / "checkpoints" / "epoch-0003.pt")
    for kind, data in crafted_payloads(real).items():
        path = tmp_path / f"{kind}.pt"
        path.write_bytes(data)
        # another model's weights make a complete, intact file: only building the model tells
        checks = [("evaluate", EXIT_USAGE)] + ([] if kind == "weights-of-another-model" else [("inspect", EXIT_UNVERIFIED)])
        for command, expected_code in checks:
            code = main([command, str(path), "--device", "cpu"] if command == "evaluate" else [command, str(path)])
            output = capsys.readouterr()
            text = (output.out + output.err).strip()
            assert code == expected_code, (kind, command, text)
            assert len(text.splitlines()) == 1 and "Traceback" not in text, (kind, command, text)


def test_the_safe_loading_refusal_names_the_global_it_refused(reference, tmp_path):
    real = load_checkpoint(reference["out"] / "checkpoints" / "epoch-0003.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    buffer = io.BytesIO()
    torch.save({**real, "evil": Evil()}, buffer)
    body = buffer.getvalue()
    (tmp_path / "evil.pt").write_bytes(body + b"TRAINKIT-SHA256:" + hashlib.sha256(body).hexdigest().encode() + b"\n")
    with pytest.raises(CheckpointError, match=r"refused global (posix|os|nt)\.system"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_a_damaged_best_pt_never_fails_a_finished_run(synthetic_config, caplog):
    out = crash(synthetic_config(epochs=3, patience=0, monitor_mode="max"), epoch=2)  # best: epoch 1, never beaten
    flip_a_byte(out / "checkpoints" / "best.pt")
    summary = train_run(resume_config(out, {}), resume=True)
    assert "renamed it best.pt.corrupt" in caplog.text
    assert summary["best_epoch"] == 1
    assert summary["best_weights"] == "checkpoints/epoch-0003.pt (epoch 3, the newest valid checkpoint)"
    assert (out / "best.safetensors").is_file() and json.loads((out / "summary.json").read_text()) == summary


# ------------------------------------------------------------------ the run's files
def test_resume_with_several_changed_flags_names_all_of_them(reference):
    with pytest.raises(ConfigError, match=r"--lr 0.01 \(saved: 0.001\); --epochs 5 \(saved: 3\)"):
        resume_config(reference["out"], {"lr": 0.01, "epochs": 5})


def test_a_damaged_config_json_or_lr_find_json_is_one_line(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    (out / "config.json").write_text('{"dataset": "synthetic", "epochs": ')
    with pytest.raises(ConfigError, match=r"the run's settings .*config.json is damaged"):
        resume_config(out, {})
    (out / "lr_find.json").write_text('{"suggested_lr": ')
    with pytest.raises(ConfigError, match=r"the LR finder's result .*lr_find.json is damaged"):
        resolve_auto_lr(reference["config"], torch.nn.Linear(1, 1), [], out, reuse=True)


class CrashAtFitEnd(Callback):
    def on_fit_end(self, state) -> None:
        raise RuntimeError("simulated crash")  # after early stopping, before the test evaluation


def test_a_run_that_stopped_early_resumes_without_training_more_epochs(synthetic_config, tmp_path):
    options = dict(epochs=8, patience=1, min_delta=0.05, lr=3e-3)
    full = train_run(synthetic_config(out=str(tmp_path / "full"), **options))
    assert full["stopped_early"], "the setting must make early stopping fire"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(synthetic_config(**options), extra_callbacks=[CrashAtFitEnd()])
    resumed = train_run(resume_config(tmp_path / "run", {}), resume=True)
    assert (resumed["epochs_run"], resumed["model_sha256"]) == (full["epochs_run"], full["model_sha256"])


def test_a_setting_an_older_checkpoint_predates_counts_as_its_default():
    from trainkit.run import config_differences

    saved = {"lr": 1e-3}  # written before sync_batchnorm existed
    assert config_differences(saved, {"lr": 1e-3, "sync_batchnorm": False}) == []
    assert config_differences(saved, {"lr": 1e-3, "sync_batchnorm": True}) == ["sync_batchnorm: False -> True"]

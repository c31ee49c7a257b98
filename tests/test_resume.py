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

from trainkit.loop.callbacks import Callback
from trainkit.checkpoint.file import encode
from trainkit.checkpoint.store import CheckpointDir, load_checkpoint
from trainkit.cli import main
from trainkit.exits import EXIT_UNVERIFIED, EXIT_USAGE
from trainkit.errors import CheckpointError, ConfigError
from trainkit.recipes.resume import OLDER_FINGERPRINT, describe_data_change, fingerprint_differences, resume_config
from trainkit.recipes.run import resolve_auto_lr, train_run  # fmt: skip
from trainkit.recipes.components import data_fingerprint

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted 3-epoch synthetic run (checkpoints every 20 steps) and its summary."""
    from trainkit.config.schema import TrainConfig

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
    from trainkit.recipes.images import load_dataset

    data = load_dataset("synthetic", seed=0)
    saved = data_fingerprint(data)
    data.train.x[0, 0, 0, 0] += 1e-6  # one pixel of one image
    assert fingerprint_differences(saved, data_fingerprint(data)) == ["training images"]
    assert fingerprint_differences("0123abcd", saved) == [OLDER_FINGERPRINT]
    assert describe_data_change([OLDER_FINGERPRINT]) == (
        "holds an older trainkit's data fingerprint, which cannot be compared with this data"
    )  # the review's B11: the sentence read "(... cannot be compared differ)"


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


DAMAGED_KINDS = ["text-with-a-valid-trailer", "model-only", "model-is-an-int"]


@pytest.mark.parametrize("kind", DAMAGED_KINDS)
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


def folder_listing(folder: Path) -> dict[str, bytes]:
    return {path.name: open(path, "rb").read() for path in sorted(folder.iterdir())}  # not Path.read_bytes: patched below


def refused_resume(out: Path, overrides: dict, capsys, *, force: bool = False) -> str:
    """`trainkit train --out OUT --resume [flags]` as a user runs it: its one line, after checking
    it changed nothing in the run folder (no rename, no failure.json)."""
    before = folder_listing(out / "checkpoints"), sorted(p.name for p in out.iterdir())
    code = main(["train", "--out", str(out), "--resume", *(["--force-resume"] if force else []),
                 *[part for key, value in overrides.items() for part in (f"--{key}", str(value))]])  # fmt: skip
    text = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert (folder_listing(out / "checkpoints"), sorted(p.name for p in out.iterdir())) == before
    return text


def test_a_checkpoint_that_does_not_fit_is_refused_and_nothing_is_set_aside(reference, synthetic_config, capsys):
    """The review's B15: a misfit (another --hidden under --force-resume, or an edited model) is about the run,
    not the file; the next correct --resume continues exactly."""
    out = crash(synthetic_config(epochs=3, patience=0, checkpoint_every_steps=20), epoch=3)
    text = refused_resume(out, {"hidden": 32}, capsys, force=True)
    assert "do not fit this run's model" in text and "not renamed or deleted" in text
    real = load_checkpoint(out / "checkpoints" / "epoch-0002.pt")
    crafted = out / "checkpoints" / "epoch-0003-step-00000101.pt"  # verifies, but another model's weights
    crafted.write_bytes(crafted_payloads(real)["weights-of-another-model"])
    assert crafted.name in refused_resume(out, {}, capsys)
    crafted.unlink()
    summary = train_run(resume_config(out, {}), resume=True)
    assert summary["model_sha256"] == reference["summary"]["model_sha256"]


@pytest.mark.parametrize("failure", [PermissionError(13, "Permission denied"), OSError(5, "Input/output error"),
                                     OSError(116, "Stale file handle"), MemoryError()], ids=repr)  # fmt: skip
def test_a_read_error_that_may_pass_is_refused_and_nothing_is_set_aside(failure, reference, synthetic_config, capsys,
                                                                        monkeypatch):  # fmt: skip
    """The review's B16: EACCES, EIO, ESTALE or out of memory while loading say nothing about the file."""
    out = crash(synthetic_config(epochs=3, patience=0, checkpoint_every_steps=20), epoch=3)
    broken = monkeypatch.context()
    with broken as patch:
        if isinstance(failure, MemoryError):
            patch.setattr(torch, "load", lambda *args, **kwargs: (_ for _ in ()).throw(failure))
        else:
            patch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(failure))
        text = refused_resume(out, {}, capsys)
    assert "cannot resume from" in text and ("memory" in text or failure.strerror in text)
    summary = train_run(resume_config(out, {}), resume=True)  # it passed: the same command continues
    assert summary["model_sha256"] == reference["summary"]["model_sha256"]


def test_resume_never_starts_over_beside_files_set_aside_earlier(synthetic_config, capsys):
    out = crash(synthetic_config(epochs=3, patience=0), epoch=2)
    for path in (out / "checkpoints").iterdir():
        path.rename(path.with_name(path.name + ".corrupt"))
    text = refused_resume(out, {}, capsys)
    assert "only files set aside earlier" in text and "epoch-0001.pt.corrupt" in text


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
    from trainkit.recipes.resume import config_differences

    saved = {"lr": 1e-3}  # written before sync_batchnorm existed
    assert config_differences(saved, {"lr": 1e-3, "sync_batchnorm": False}) == []
    assert config_differences(saved, {"lr": 1e-3, "sync_batchnorm": True}) == ["sync_batchnorm: False -> True"]


# ------------------------------------------------------- changes that do not change the run
def test_resume_accepts_other_workers_and_fewer_cores_with_a_note(synthetic_config, monkeypatch, caplog):
    """The review's B12/B13: a requeue onto a smaller machine, another --num-workers (bit-identical by design)."""
    out = crash(synthetic_config(epochs=2, patience=0, threads=2), epoch=2)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    config = resume_config(out, {"num_workers": 2, "threads": 1})
    assert (config.threads, config.num_workers) == (1, 2) and "--threads 1 where the run used 2" in caplog.text
    config = resume_config(out, {})
    assert config.threads == 1 and "this machine has 1 cores; continuing with 1" in caplog.text
    assert train_run(config, resume=True)["epochs_run"] == 2


def test_a_setting_this_trainkit_does_not_know_is_ignored_with_a_warning(synthetic_config, caplog, capsys):
    """The review's B10: a setting removed or renamed later must not strand older runs."""
    out = crash(synthetic_config(epochs=2, patience=0), epoch=2)
    settings = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**settings, "old_setting": 1}))
    for path in (out / "checkpoints").glob("*.pt"):
        payload = load_checkpoint(path)
        payload["config"]["old_setting"] = 1
        payload["versions"] = {"trainkit": "0.0.1", "torch": "2.0.0"}
        path.write_bytes(encode(payload))
    assert train_run(resume_config(out, {}), resume=True)["epochs_run"] == 2
    assert "does not know (old_setting); ignored" in caplog.text
    assert "written by another version (trainkit 0.0.1 -> 0.1.0, torch 2.0.0 -> " in caplog.text  # the review's B8
    assert main(["evaluate", str(out / "checkpoints" / "best.pt"), "--device", "cpu"]) == 0, capsys.readouterr().err


def test_lr_find_refuses_a_run_folder_whose_lr_find_json_a_run_resumes_with(reference, capsys):
    """The review's B17: lr-find replaced a --lr auto run's lr_find.json, and the run could not resume."""
    before = sorted(p.name for p in reference["out"].iterdir())
    code = main(["lr-find", "--dataset", "synthetic", "--num-iter", "5", "--out", str(reference["out"])])
    assert code == EXIT_USAGE and "holds a training run" in capsys.readouterr().err
    assert sorted(p.name for p in reference["out"].iterdir()) == before


def test_two_runs_without_out_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """The review's A9: a sweep script's runs must not collide on runs/<dataset>-<model>-<time>."""
    from trainkit.config.schema import TrainConfig
    from trainkit.recipes.run import default_out_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda _: "20261207-173507")
    names = [default_out_dir(TrainConfig(dataset="synthetic")).name for _ in range(3)]
    assert names == ["synthetic-mlp-20261207-173507", "synthetic-mlp-20261207-173507-2", "synthetic-mlp-20261207-173507-3"]

"""`trainkit export`: a checkpoint's model as safetensors, a torch.export program or ONNX, each
verified on the run's own rows before it is reported; the files work on their own, at any batch size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from trainkit.cli import main
from trainkit.config.files import recipe_config
from trainkit.config.schema import TrainConfig
from trainkit.errors import TrainkitError
from trainkit.checkpoint.export import load_safetensors
from trainkit.recipes.from_checkpoint import checkpoint_model, export_checkpoint
from trainkit.recipes.run import train_run

RUNS = {
    "mlp": dict(dataset="synthetic", epochs=1, batch_size=64, device="cpu", hidden=[32], plots=False),
    "cnn": dict(dataset="synthetic", model="cnn", channels=[4, 8], epochs=1, train_size=640, batch_size=64,
                device="cpu", plots=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runs")
    found = {}
    for name, settings in RUNS.items():
        train_run(TrainConfig(**settings, out=str(folder / name)))
        found[name] = folder / name / "checkpoints" / "best.pt"
    return found


def rows(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("model", list(RUNS))
def test_each_format_is_verified_and_then_runs_on_its_own_at_another_batch_size(checkpoints, tmp_path, model):
    _, _, reference, _ = checkpoint_model(checkpoints[model], device="cpu")
    reference.eval()
    x = rows(5)  # not the 16 rows the export was verified on
    with torch.no_grad():
        expected = reference(x)

    weights = export_checkpoint(checkpoints[model], format="safetensors", out=tmp_path / "m.safetensors")
    assert weights["max_abs_difference"] == 0.0 and weights["verified_on_rows"] == 16
    assert all(torch.equal(load_safetensors(tmp_path / "m.safetensors")[k], v) for k, v in reference.state_dict().items())

    program = export_checkpoint(checkpoints[model], format="torch-export", out=tmp_path / "m.pt2")
    assert program["path"] == str(tmp_path / "m.pt2")
    with torch.no_grad():
        exported = torch.export.load(str(tmp_path / "m.pt2")).module()(x)
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-5)

    onnxruntime = pytest.importorskip("onnxruntime")
    export_checkpoint(checkpoints[model], format="onnx", out=tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (outputs,) = session.run(None, {"input_0": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(outputs), expected, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt2", "m.safetensors"]  # no temp files left


def test_an_export_that_does_not_reproduce_the_model_is_refused_and_removed(checkpoints, tmp_path, monkeypatch):
    import trainkit.checkpoint.export as export_module

    real = export_module.load_safetensors
    monkeypatch.setattr(export_module, "load_safetensors",
                        lambda path: {k: v + 1e-3 for k, v in real(path).items()})  # fmt: skip
    with pytest.raises(TrainkitError, match="does not reproduce its outputs .*nothing was written"):
        export_checkpoint(checkpoints["mlp"], format="safetensors", out=tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_the_cli_writes_beside_the_checkpoint_by_default(checkpoints, capsys):
    assert main(["export", str(checkpoints["mlp"]), "--format", "torch-export"]) == 0
    written = checkpoints["mlp"].with_suffix(".pt2")
    assert capsys.readouterr().out.strip() == (f"wrote {written} (torch-export; verified on 16 validation rows, "
                                               f"largest output difference 0)")  # fmt: skip
    assert written.is_file()


def test_export_mistakes_are_one_line(checkpoints, tmp_path, monkeypatch, capsys):
    assert main(["export", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(checkpoints["mlp"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip().endswith("pip install 'trainkit[export]' (onnx, onnxscript, onnxruntime)")
    assert not (tmp_path / "m.onnx").exists()


def test_a_language_model_exports_with_token_inputs(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 200)
    train_run(recipe_config({"dataset": "text", "data_file": str(text), "max_steps": 3, "layers": 1, "width": 16,
                             "heads": 2, "block_size": 8, "device": "cpu", "out": str(tmp_path / "run"), "plots": False}))
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    _, _, model, _ = checkpoint_model(checkpoint, device="cpu")
    tokens = torch.randint(0, 10, (3, 8))
    with torch.no_grad():
        expected = model.eval()(tokens)
    export_checkpoint(checkpoint, format="onnx", out=tmp_path / "lm.onnx")
    (logits,) = onnxruntime.InferenceSession(str(tmp_path / "lm.onnx")).run(None, {"input_0": tokens.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5)


def test_an_export_never_replaces_the_checkpoint_or_a_run_file_and_asks_before_replacing_anything(
    checkpoints, tmp_path, capsys
):  # fmt: skip
    """The review's D1: `export CKPT --out CKPT` replaced the checkpoint with the export, exit 0."""
    import shutil

    from trainkit.checkpoint.store import verify_checkpoint

    run = tmp_path / "run"
    shutil.copytree(checkpoints["mlp"].parents[1], run)
    best = run / "checkpoints" / "best.pt"
    epoch = run / "checkpoints" / "epoch-0001.pt"
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    for target, fmt, expected in [
        (best, "safetensors", "is the checkpoint being exported"),
        (epoch, "torch-export", "is one of its run folder's own files"),
        (run / "model.safetensors", "safetensors", "is one of its run folder's own files"),
        (run / "summary.json", "onnx", "is one of its run folder's own files"),
    ]:
        for overwrite in ([], ["--overwrite"]):
            assert main(["export", str(best), "--format", fmt, "--out", str(target), *overwrite]) == 2
            text = capsys.readouterr().err.strip()
            assert expected in text and len(text.splitlines()) == 1, text
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    assert verify_checkpoint(best) is None
    mine = tmp_path / "mine.safetensors"
    mine.write_text("the user's own file")
    assert main(["export", str(best), "--out", str(mine)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and mine.read_text() == "the user's own file"
    leftover = tmp_path / ".new.safetensors.trainkit-999999.tmp"
    leftover.write_bytes(b"a killed export's")  # a dead writer's marked temp file
    assert main(["export", str(best), "--out", str(mine), "--overwrite"]) == 0
    assert load_safetensors(mine) and not leftover.exists()
    assert mine.stat().st_mode & 0o777 == 0o644 & ~current_umask()  # like every other file (the review's D8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors", "run"]  # no .tmpXXXXXX (A7)


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask

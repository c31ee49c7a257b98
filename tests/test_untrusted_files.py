"""A file never runs code by itself: a checkpoint (or a run folder's config.json) that names a
MODULE:FUNCTION factory gets it imported only when the user names it or passes --trust-factories.

The crafted checkpoints pass the sha256 check and safe loading (the review's E4: `os:system` as the
model or dataset factory ran a shell command in evaluate, export and generate). Every command that
reads a checkpoint is tried.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

from trainkit.checkpoint.file import encode
from trainkit.checkpoint.store import load_checkpoint
from trainkit.cli import main
from trainkit.exits import EXIT_USAGE

FACTORIES = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

def model(width: int = 16):
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])
'''


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    output = capsys.readouterr()
    return code, (output.out + output.err).strip()


@pytest.fixture(scope="module")
def user_run(tmp_path_factory) -> Path:
    """A finished run of a user's own model and data (factories in ud_trust.py, imported from the cwd)."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "ud_trust.py").write_text(FACTORIES)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        code = main(["train", "--model", "ud_trust:model", "--dataset", "ud_trust:data", "--epochs", "1",
                     "--device", "cpu", "--out", str(folder / "run"), "--no-plots"])  # fmt: skip
    sys.modules.pop("ud_trust", None)
    assert code == 0
    return folder


def crafted(source: Path, target: Path, **recipe: object) -> Path:
    """``source`` with its stored settings edited, re-sealed with a valid sha256 trailer."""
    payload = copy.deepcopy(load_checkpoint(source))
    payload["run_info"]["recipe"].update(recipe)
    target.write_bytes(encode(payload))
    return target


COMMANDS = {
    "evaluate": ["evaluate", "{ckpt}", "--device", "cpu"],
    "export": ["export", "{ckpt}", "--out", "{tmp}/x.safetensors"],
    "export-torch-export": ["export", "{ckpt}", "--format", "torch-export", "--out", "{tmp}/x.pt2"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("setting", ["model", "dataset"])
def test_a_crafted_checkpoint_naming_os_system_runs_nothing(command, setting, user_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pwned = tmp_path / "PWNED"
    ckpt = crafted(user_run / "run" / "checkpoints" / "best.pt", tmp_path / "evil.pt",
                   **{setting: "os:system", f"{setting}_args": {"command": f"touch {pwned}"}})  # fmt: skip
    argv = [part.format(ckpt=ckpt, tmp=tmp_path) for part in COMMANDS[command]]
    code, text = run_cli(argv, capsys)
    assert code == EXIT_USAGE and len(text.splitlines()) == 1, text
    assert f"{setting} os:system" in text and "--trust-factories" in text
    assert not pwned.exists() and not (tmp_path / "x.safetensors").exists()
    code, text = run_cli(["inspect", str(ckpt)], capsys)  # inspect shows the name and says it will not run
    warning = text.splitlines()[-1]
    assert code == 0 and "names code to import (" in warning and f"{setting} os:system" in warning, text
    assert "not run by evaluate/export/generate unless you name it" in warning
    assert not pwned.exists()


def test_generate_from_a_crafted_text_checkpoint_runs_nothing(tmp_path, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 40)
    code, _ = run_cli(["train", "--dataset", "text", "--data-file", str(text), "--model", "lstm", "--width", "16",
                       "--layers", "1", "--block-size", "8", "--max-steps", "2", "--device", "cpu",
                       "--out", str(tmp_path / "run"), "--no-plots"], capsys)  # fmt: skip
    assert code == 0
    monkeypatch.chdir(tmp_path)
    pwned = tmp_path / "PWNED"
    (tmp_path / "evil" / "checkpoints").mkdir(parents=True)
    ckpt = crafted(tmp_path / "run" / "checkpoints" / "best.pt", tmp_path / "evil" / "checkpoints" / "best.pt",
                   model="os:system", model_args={"command": f"touch {pwned}"})  # fmt: skip
    for target in (ckpt, tmp_path / "evil"):  # the file, and a run folder holding it
        code, text = run_cli(["generate", str(target), "--tokens", "3"], capsys)
        assert code == EXIT_USAGE and "model os:system" in text and not pwned.exists(), text


def test_a_users_own_checkpoint_runs_its_factory_only_when_named_or_trusted(user_run, tmp_path, capsys, monkeypatch):
    """A ud_trust.py beside the checkpoint is not imported by itself; naming it or trusting it works."""
    monkeypatch.chdir(user_run)
    best = str(user_run / "run" / "checkpoints" / "best.pt")
    code, text = run_cli(["evaluate", best, "--device", "cpu"], capsys)
    assert code == EXIT_USAGE and "model ud_trust:model, dataset ud_trust:data" in text
    assert "ud_trust" not in sys.modules
    named = ["--model", "ud_trust:model", "--dataset", "ud_trust:data"]
    for flags in (named, ["--trust-factories"]):
        code, text = run_cli(["evaluate", best, "--device", "cpu", *flags], capsys)
        assert code == 0 and "val accuracy" in text, text
        sys.modules.pop("ud_trust", None)
    code, text = run_cli(["export", best, "--out", str(tmp_path / "w.safetensors"), *named], capsys)
    assert code == 0 and (tmp_path / "w.safetensors").is_file(), text
    sys.modules.pop("ud_trust", None)


def test_resume_does_not_import_a_factory_named_only_in_the_run_folders_config(user_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(user_run / "run", run)
    (run / "summary.json").unlink()  # an unfinished run
    settings = json.loads((run / "config.json").read_text())
    pwned = tmp_path / "PWNED"
    (run / "config.json").write_text(json.dumps({**settings, "model": "os:system", "model_args": {"command": f"touch {pwned}"}}))
    monkeypatch.chdir(tmp_path)
    code, text = run_cli(["train", "--out", str(run), "--resume"], capsys)
    assert code == EXIT_USAGE and len(text.splitlines()) == 1 and "model os:system" in text, text
    assert not pwned.exists()


def test_evaluate_says_when_the_factorys_source_changed_since_the_checkpoint(user_run, tmp_path, capsys, monkeypatch,
                                                                             caplog):  # fmt: skip
    """The review's E1: ReLU edited to Tanh keeps every weight's name and shape but is another model."""
    shutil.copytree(user_run, tmp_path / "copy")
    source = tmp_path / "copy" / "ud_trust.py"
    source.write_text(source.read_text().replace("nn.ReLU()", "nn.Tanh()"))
    monkeypatch.chdir(tmp_path / "copy")
    sys.modules.pop("ud_trust", None)
    code, text = run_cli(["evaluate", "run/checkpoints/best.pt", "--device", "cpu", "--trust-factories"], capsys)
    sys.modules.pop("ud_trust", None)
    assert code == 0 and "the source of model ud_trust:model, dataset ud_trust:data changed since" in caplog.text, text

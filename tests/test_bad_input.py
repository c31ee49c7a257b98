"""Every user mistake is one line and exit 2, and a failed start leaves nothing behind.

Walks every field of ``TrainConfig`` with values of the wrong type in TOML, YAML and JSON
files, then runs every CLI command with a sample of absurd values. Both run ``main()`` in
process: an uncaught exception (a traceback) fails the test by itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from trainkit.cli import main
from trainkit.exits import EXIT_UNVERIFIED, EXIT_USAGE
from trainkit.config.schema import _matches, field_types
from trainkit.config.names import flag_name
from trainkit.config.schema import TrainConfig

FORMATS = ("toml", "yaml", "json")
# Candidates of every kind a config file can hold; each field gets those its type does not allow.
CANDIDATES: list[Any] = ["0.3", "false", True, 7, 1.5, [1], ["a"], {"a": 1}, None]


def wrong_values(expected: Any, file_format: str) -> list[Any]:
    values = [v for v in CANDIDATES if not _matches(v, expected)]
    return [v for v in values if v is not None] if file_format == "toml" else values  # TOML has no null


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_config(path: Path, values: dict[str, Any]) -> Path:
    if path.suffix == ".toml":
        path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    elif path.suffix == ".yaml":
        path.write_text(yaml.safe_dump(values))
    else:
        path.write_text(json.dumps(values))
    return path


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def one_line(output: str) -> bool:
    return len(output.strip().splitlines()) == 1 and "Traceback" not in output


@pytest.mark.parametrize("file_format", FORMATS)
def test_every_field_with_a_value_of_the_wrong_type_is_one_line(file_format, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out (runs/...) would appear here
    failures, cases = [], 0
    for name, expected in field_types().items():
        for value in wrong_values(expected, file_format):
            cases += 1
            config = write_config(tmp_path / f"c.{file_format}", {"dataset": "synthetic", "epochs": 1, name: value})
            code, output = run_main(["train", "--config", str(config)], capsys)
            if code != EXIT_USAGE or not one_line(output) or flag_name(name) not in output:
                failures.append(f"{name} = {value!r}: exit {code}: {output.strip()[:200]}")
    assert not failures, "\n".join(failures)
    assert cases > 5 * len(field_types())  # every field, several wrong kinds each
    assert not (tmp_path / "runs").exists(), "a refused config must not create an output folder"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('lr = true\n', "--lr must be a number or 'auto', got True (a boolean)"),
        ('grad_checkpointing = "false"\n', "--grad-checkpointing must be true or false, got 'false'"),
        ('hidden = 64\n', "--hidden must be a list of integers, got 64"),
        ('[model]\nname = "cnn"\n', "--model must be a string, got {'name': 'cnn'} (a table)"),
        ('augment_shift = "2"\n', "--augment must be an integer"),
    ],
)
def test_the_review_cases_name_the_setting_and_the_type(text, expected, tmp_path, capsys):
    (tmp_path / "c.toml").write_text(text)
    code, output = run_main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")], capsys)
    assert code == EXIT_USAGE and one_line(output) and expected in output
    assert not (tmp_path / "run").exists()


def test_config_files_that_cannot_be_read_are_one_line(tmp_path, capsys):
    (tmp_path / "binary.toml").write_bytes(os.urandom(64) + b"\xc6\xff")
    (tmp_path / "latin1.yaml").write_bytes("epochs: 1 # caf\xe9\n".encode("latin-1"))
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "evil.yaml").write_text("epochs: !!python/object/apply:os.system ['touch PWNED']\n")
    (tmp_path / "keys.yaml").write_text("1: 2\n")
    for name, expected in [("binary.toml", "is not UTF-8 text"), ("latin1.yaml", "is not UTF-8 text"),
                           ("dir.json", "(it is a folder)"), ("evil.yaml", "is not valid YAML"),
                           ("keys.yaml", "setting names must be strings")]:  # fmt: skip
        code, output = run_main(["train", "--config", str(tmp_path / name)], capsys)
        assert code == EXIT_USAGE and one_line(output) and expected in output, (name, output)
    assert not (tmp_path / "PWNED").exists()


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.pt"
    os.mkfifo(path)
    return path


def absurd_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "afile").write_text("not a folder")
    train = ["train", "--dataset", "synthetic", "--epochs", "2", "--out", str(tmp_path / "run")]
    return [
        (train + ["--seed", str(2**32)], "--seed must be at most 2**32 - 1"),
        (train + ["--seed", "-1"], "--seed must be an integer >= 0"),
        (train + ["--schedule", "multistep", "--milestones", "nan"], "--milestones must be a positive finite number"),
        (train + ["--schedule", "multistep", "--milestones", "inf"], "--milestones must be a positive finite number"),
        (train + ["--schedule", "multistep", "--milestones", "1.5,0.5"], "--milestones must be strictly increasing epochs, got 1.5,0.5"),
        (train + ["--schedule", "multistep", "--milestones", "50"], "--milestones 50 lie outside the run"),
        (train + ["--schedule", "multistep", "--milestones", "-2"], "--milestones must be a positive finite number"),
        (train + ["--warmup", "5"], "--warmup 5 epochs is not shorter than the run (--epochs 2)"),
        (train + ["--schedule", "onecycle", "--warmup", "1"], "onecycle has its own warmup"),
        (train + ["--schedule", "onecycle", "--pct-start", "0.001"], "onecycle needs pct_start * total_steps > 1"),
        (train + ["--min-lr", "10"], "--min-lr 10.0 must be at most the peak --lr 0.001"),
        (train + ["--monitor", "foo"], "--monitor 'foo' is not a metric of the run; choose one of val_loss"),
        (train + ["--monitor", "foo", "--patience", "0"], "--monitor 'foo' is not a metric"),
        (train + ["--device", "meta"], "--device 'meta' is not a device trainkit can train on"),
        (train + ["--device", "cuda:99"], "this machine has" if torch.cuda.is_available() else "no CUDA GPU"),
        (train + ["--augment", "1000000"], "--augment 1000000 must be smaller than the 28x28 images"),
        (train + ["--augment", "-1"], "--augment must be an integer >= 0"),
        (train + ["--hidden", "1000000000"], "the model would need about"),
        (train + ["--hidden", "100000,100000", "--batch-size", "8"], "GiB is available; use smaller --hidden"),
        (train + ["--threads", "100000"], "CPU cores here"),
        (train + ["--momentum", "1.5"], "--momentum must be in [0, 1)"),
        (train + ["--lr", "1e400"], "--lr must be a positive finite number, got inf"),
        (train + ["--batch-size", "-3"], "--batch-size must be an integer >= 1"),
        (train + ["--max-skipped-steps", "-1"], "--max-skipped-steps must be an integer >= 0"),
        (train + ["--accumulate", "1000"], "--accumulate 1000 is more than the 25 batches an epoch has"),
        (["train", "--dataset", "synthetic", "--out", str(tmp_path / "afile")], "is a file, not a folder"),
        (["train", "--dataset", "synthetic", "--out", str(tmp_path / "afile" / "sub")], "lies under a file"),
        (["evaluate", str(tmp_path / "missing.pt")], "does not exist"),
        (["evaluate", str(tmp_path)], "is not a regular file"),
        (["evaluate", str(fifo(tmp_path))], "is not a regular file"),
        (["evaluate", str(tmp_path / "afile")], "has no integrity trailer"),
        (["inspect", str(tmp_path / "missing.pt")], "does not exist"),
        (["inspect", str(tmp_path)], "is not a regular file"),
        (["inspect", str(tmp_path / "fifo.pt")], "is not a regular file"),
        (["lr-find", "--dataset", "synthetic", "--num-iter", "0", "--out", str(tmp_path / "lr")], "num_iter"),
        (["lr-find", "--dataset", "synthetic", "--start-lr", "nan", "--out", str(tmp_path / "lr")], "start_lr"),
        (["lr-find", "--dataset", "synthetic", "--out", str(tmp_path / "afile")], "is a file, not a folder"),
        (["profile", "--dataset", "synthetic", "--steps", "0"], "--steps must be in 1..1000"),
        (["profile", "--dataset", "synthetic", "--steps", str(10**9)], "--steps must be in 1..1000"),
        (["profile", "--dataset", "synthetic", "--skip-steps", "-1"], "--skip-steps in 0..1000"),
        (["schedules", "--plot", str(tmp_path / "s.png"), "--steps", str(10**12)], "a preview of at most"),
        (["schedules", "--plot", str(tmp_path / "s.png"), "--lr", "inf"], "lr must be a positive finite number"),
        (["schedules", "--plot", str(tmp_path / "s.png"), "--steps", "0"], "total_steps must be an integer >= 1"),
        (["schedules", "--plot", str(tmp_path / "s.png"), "--schedules", "warp"], "unknown schedule 'warp'"),
        (["compare", "schedules", "--quick", "--out", str(tmp_path / "c"), "--seeds", ","], "expected seeds"),
        (["compare", "schedules", "--quick", "--out", str(tmp_path / "c"), "--seeds", str(2**40)], "expected seeds"),
        (["compare", "schedules", "--quick", "--out", str(tmp_path / "afile")], "is a file, not a folder"),
        (["compare", "init", "--quick", "--out", str(tmp_path / "c"), "--dataset", "cifar"], "cifar"),
    ]  # fmt: skip


def test_every_command_with_absurd_values_is_one_line_and_writes_no_run(tmp_path, capsys):
    failures = []
    for argv, expected in absurd_cases(tmp_path):
        code, output = run_main(argv, capsys)
        if code != EXIT_USAGE or not one_line(output) or expected not in output:
            failures.append(f"{' '.join(argv[:1] + argv[-4:])}: exit {code}: {output.strip()[:300]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "run" / "config.json").exists(), "a refused start must not leave a run behind"


def test_inspect_on_a_fifo_returns_at_once(tmp_path, capsys):
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(run_main(["inspect", str(fifo(tmp_path))], capsys)[0]),
                              daemon=True)  # fmt: skip
    worker.start()
    worker.join(timeout=20)
    assert result == [EXIT_USAGE], "inspect must refuse a FIFO, not block reading it"


def test_a_late_checked_setting_leaves_the_folder_usable(tmp_path, capsys):
    """The review's A14/A15: a refused start must not turn --out into a run that then refuses the fix."""
    out = ["--out", str(tmp_path / "run")]
    base = ["train", "--dataset", "synthetic", "--epochs", "2", "--schedule", "multistep", *out]
    assert run_main(base + ["--milestones", "1.5,0.5"], capsys)[0] == EXIT_USAGE
    code, output = run_main(base + ["--milestones", "0.5,1.5"], capsys)
    assert code == 0, output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["milestones"] == [0.5, 1.5]


def test_unknown_monitor_is_refused_before_any_training(tmp_path, capsys):
    code, output = run_main(["train", "--dataset", "synthetic", "--monitor", "val_acc",
                             "--out", str(tmp_path / "run")], capsys)  # fmt: skip
    assert code == EXIT_USAGE and "epoch 1/" not in output and "val_accuracy" in output


def test_config_default_warmup_fits_a_one_epoch_run():
    config = TrainConfig(epochs=1).resolved()
    assert config.warmup == 0.5 and TrainConfig(epochs=20).resolved().warmup == 1.0


def test_python_api_types_are_checked_too():
    with pytest.raises(Exception, match="--lr must be a number or 'auto', got True"):
        TrainConfig(lr=True).resolved()
    with pytest.raises(Exception, match="--compile must be true or false, got 'off'"):
        dataclasses.replace(TrainConfig(), compile="off").resolved()
    assert math.isclose(TrainConfig(lr=1).resolved().lr, 1.0)  # an int is a number
    assert TrainConfig(out=Path("x")).resolved().out == "x"  # paths are accepted for path fields


def test_inspect_exit_codes(tmp_path, capsys):
    (tmp_path / "damaged.pt").write_bytes(b"x" * 200)
    code, output = run_main(["inspect", str(tmp_path / "damaged.pt")], capsys)
    assert code == EXIT_UNVERIFIED and "FAILS verification" in output and one_line(output)

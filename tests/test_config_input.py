"""Config files and settings that must be refused in one line, before they cost anything.

YAML anchors (a billion-laughs file), oversized or too deeply nested files, duplicate keys,
booleans where numbers belong, floats float32 cannot hold, factory arguments a built-in would
ignore, and a TRAINKIT_DATA_DIR that does not hold the dataset. Each case runs ``main()`` in
process and checks the exit code, that the output is one line, and its words.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from trainkit.exits import EXIT_USAGE
from trainkit.config.files import config_from_dict, load_config_file, recipe_config
from trainkit.config.schema import _matches, field_types
from trainkit.config.names import (
    MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES, MAX_FLOAT_SETTING, MAX_SHOWN_CHARS, flag_name,
)  # fmt: skip
from trainkit.config.schema import TrainConfig
from trainkit.recipes.images import IDX_DATASETS, default_cache_dir, find_dataset_dir
from trainkit.errors import ConfigError, DataError
from test_bad_input import run_main as run_cli, write_config

FORMATS = ("toml", "yaml", "json")
MNIST_FILES = [f.name for f in IDX_DATASETS["mnist"].files]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code, output = run_cli(argv, capsys)
    return code, output.strip()


def assert_refused(argv: list[str], capsys, *expected: str) -> str:
    """The command exits 2 with one line holding every expected piece; returns that line."""
    code, output = run_main(argv, capsys)
    assert code == EXIT_USAGE, output
    assert len(output.splitlines()) == 1 and "Traceback" not in output, output
    for piece in expected:
        assert piece in output, (piece, output)
    return output




def train(config: Path, tmp_path: Path, *flags: str) -> list[str]:
    return ["train", "--config", str(config), "--out", str(tmp_path / "run"), *flags]


# ----------------------------------------------------------------- I1: YAML anchors
def billion_laughs(levels: int) -> str:
    """The classic: each level lists the previous one 10 times, so the last names 10**levels strings."""
    lines = ["dataset: synthetic", "dataset_args:", '  l0: &l0 "lol"']  # where the review's file put it
    lines += [f"  l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_a_yaml_billion_laughs_is_refused_before_it_expands(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs(9))  # 10**9 strings if expanded; under 700 bytes as written
    assert bomb.stat().st_size < 700
    started = time.perf_counter()
    assert_refused(train(bomb, tmp_path), capsys, f"config file {bomb}: line 3: YAML anchors and aliases "
                                                  f"(&name, *name) are not supported; write the values out")  # fmt: skip
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("base: &b 3\nepochs: 2\n", 1),  # an anchor alone
        ("dataset: synthetic\nhidden: [16]\nchannels: *nothing\n", 3),  # an alias alone
        ("dataset: synthetic\nmodel_args:\n  <<: *base\n", 3),  # a merge key needs an alias
    ],
    ids=["anchor", "alias", "merge"],
)
def test_yaml_anchors_and_aliases_are_refused_with_their_line(text, line, tmp_path):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config_file(tmp_path / "c.yaml")
    assert str(info.value) == (f"config file {tmp_path / 'c.yaml'}: line {line}: YAML anchors and aliases "
                               f"(&name, *name) are not supported; write the values out")  # fmt: skip


# --------------------------------------------------------- I1: size and depth caps
def nested_args(depth: int) -> dict[str, Any]:
    """A dataset_args table whose innermost value lies ``depth`` levels deep (the file's table is level 1)."""
    value: Any = 1
    for _ in range(depth - 3):
        value = [value]
    return {"x": value}


@pytest.mark.parametrize("file_format", FORMATS)
def test_config_files_nested_too_deep_are_refused(file_format, tmp_path, capsys):
    ok = write_config(tmp_path / f"ok.{file_format}", {"dataset_args": nested_args(MAX_CONFIG_DEPTH)})
    assert load_config_file(ok)["dataset_args"] == nested_args(MAX_CONFIG_DEPTH)
    deep = write_config(tmp_path / f"deep.{file_format}", {"dataset": "synthetic",
                                                           "dataset_args": nested_args(MAX_CONFIG_DEPTH + 1)})
    assert_refused(train(deep, tmp_path), capsys, f"config file {deep}: nests its values more than 32 levels deep")


@pytest.mark.parametrize("file_format", FORMATS)
def test_config_files_nested_past_the_parsers_recursion_are_one_line(file_format, tmp_path, capsys):
    depth = 5000  # RecursionError in tomllib, json and PyYAML's composer
    text = {"toml": "x = " + "[" * depth + "]" * depth, "json": '{"x": ' + "[" * depth + "]" * depth + "}",
            "yaml": "x: " + "[" * depth + "]" * depth}[file_format]  # fmt: skip
    (tmp_path / f"c.{file_format}").write_text(text)
    assert_refused(train(tmp_path / f"c.{file_format}", tmp_path), capsys, "nests its values more than 32 levels deep")


@pytest.mark.parametrize("file_format", FORMATS)
def test_config_files_with_too_many_values_are_refused(file_format, tmp_path, capsys):
    assert MAX_CONFIG_VALUES == 100_000
    path = write_config(tmp_path / f"c.{file_format}", {"dataset": "synthetic", "hidden": [16] * MAX_CONFIG_VALUES})
    assert path.stat().st_size < MAX_CONFIG_BYTES
    assert_refused(train(path, tmp_path), capsys, f"config file {path}: holds more than 100000 values; "
                                                  f"a config file needs far fewer")  # fmt: skip


def test_config_files_over_a_mebibyte_are_refused_unread(tmp_path, capsys):
    path = tmp_path / "big.toml"
    path.write_text(f'dataset = "synthetic"\n# {"x" * MAX_CONFIG_BYTES}\n')
    assert_refused(train(path, tmp_path), capsys, f"config file {path} is larger than 1024 KiB; is it the right file?")


# --------------------------------------------------------- I1: short values in errors
@pytest.mark.parametrize(
    ("values", "expected", "cut"),
    [
        ({"hidden": ["wide"] * 50_000}, "--hidden must be a list of integers, got ['wide', 'wide', ", "'wide', " * 10),
        ({"hidden": [0] * 50_000}, "--hidden must be a list of positive layer widths, e.g. 256,128; got [0, 0, ",
         "0, " * 30),
        ({"model": "m" * 10_000}, "--model must be one of mlp, ", "m" * MAX_SHOWN_CHARS),
        ({"monitor": "v" * 10_000}, "--monitor 'vvvv", "v" * MAX_SHOWN_CHARS),
        ({"x" * 10_000: 1}, "unknown setting(s) xxxx", "x" * MAX_SHOWN_CHARS),
        ({"dataset_args": {f"k{i}": i for i in range(5000)}}, "--dataset-arg / dataset_args (k0, k1, k10, k100, ", "k1020"),
    ],
    ids=["hidden-strings", "hidden-zeros", "model", "monitor", "unknown-key", "dataset-args"],
)  # fmt: skip
def test_huge_values_are_quoted_short_in_errors(values, expected, cut, tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", {"dataset": "synthetic", **values})
    output = assert_refused(train(path, tmp_path), capsys, expected)
    assert cut not in output and ("…" in output or "..." in output), output
    assert len(output) < 2000, output  # the list of valid settings is the longest part left


# ------------------------------------------------------ I10: *_args for built-ins
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--dataset", "synthetic", "--dataset-arg", "foo=1"],
         "--dataset-arg / dataset_args (foo) are keyword arguments of a MODULE:FUNCTION dataset; "
         "the built-in --dataset synthetic ignores them: drop them"),
        (["--dataset", "synthetic", "--model", "mlp", "--model-arg", "width=9", "--model-arg", "depth=2"],
         "--model-arg / model_args (width, depth) are keyword arguments of a MODULE:FUNCTION model; "
         "the built-in --model mlp ignores them: drop them"),
    ],
    ids=["dataset-arg", "model-arg"],
)  # fmt: skip
def test_factory_arguments_for_a_builtin_are_refused(flags, expected, tmp_path, capsys):
    assert_refused(["train", *flags, "--out", str(tmp_path / "run")], capsys, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize("owner", ["dataset", "model"])
def test_factory_argument_tables_in_config_files_are_refused_for_builtins(owner, file_format, tmp_path, capsys):
    path = write_config(tmp_path / f"c.{file_format}", {"dataset": "synthetic", f"{owner}_args": {"foo": 1}})
    assert_refused(train(path, tmp_path), capsys, f"--{owner}-arg / {owner}_args (foo)", "ignores them")


def test_factory_arguments_are_kept_for_a_factory():
    config = config_from_dict({"dataset": "mypkg.data:load", "dataset_args": {"n": 3}, "model": "mypkg.nets:make",
                               "model_args": {"width": 9}}).resolved()  # fmt: skip
    assert (config.dataset_args, config.model_args) == ({"n": 3}, {"width": 9})


# ----------------------------------------------------------- booleans are not numbers
def numeric_fields() -> list[str]:
    """Every field that takes an integer or a number (and not true/false), read off the dataclass."""
    return [name for name, expected in field_types().items()
            if (_matches(1, expected) or _matches(1.5, expected)) and not _matches(True, expected)]  # fmt: skip


def test_the_numeric_fields_are_found():
    fields = numeric_fields()
    assert {"epochs", "batch_size", "lr", "weight_decay", "momentum", "clip_norm", "seed", "ema"} <= set(fields)
    assert "compile" not in fields and "hidden" not in fields
    assert len(fields) > 40


@pytest.mark.parametrize("file_format", FORMATS)
def test_a_boolean_for_any_number_is_refused_in_config_files(file_format, tmp_path, capsys):
    failures = []
    for name in numeric_fields():
        for value in (True, False):
            path = write_config(tmp_path / f"c.{file_format}", {"dataset": "synthetic", name: value})
            code, output = run_main(train(path, tmp_path), capsys)
            expected = f"{flag_name(name)} must be "
            if code != EXIT_USAGE or len(output.splitlines()) != 1 or expected not in output or \
                    f"got {value} (a boolean)" not in output:  # fmt: skip
                failures.append(f"{name} = {value}: exit {code}: {output[:200]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "run").exists()


def test_a_boolean_for_any_number_is_refused_by_config_from_dict():
    for name in numeric_fields():
        for value in (True, False):
            with pytest.raises(ConfigError, match=f"^api: {flag_name(name)} must be .*, got {value} \\(a boolean\\)$"):
                config_from_dict({name: value}, source="api")
            with pytest.raises(ConfigError, match=f"^{flag_name(name)} must be .*, got {value} \\(a boolean\\)$"):
                TrainConfig(dataset="synthetic", **{name: value}).resolved()


# ------------------------------------------------------------ I2: YAML 1e-3 is a number
def test_yaml_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: synthetic\nlr: 1e-3\nweight_decay: 5E-4\nmin_lr: 1e-5\nclip_norm: 1e0\nepochs: 2\n"
                    "mlflow_experiment: '1e-3'\n")  # fmt: skip
    values = load_config_file(path)
    assert values == {"dataset": "synthetic", "lr": 0.001, "weight_decay": 0.0005, "min_lr": 1e-5,
                      "clip_norm": 1.0, "epochs": 2, "mlflow_experiment": "1e-3"}  # fmt: skip
    config = recipe_config(values, str(path)).resolved()
    assert (config.lr, config.weight_decay, config.min_lr) == (0.001, 0.0005, 1e-5)
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # PyYAML's own loaders are left as they are


def test_a_yaml_exponent_for_an_integer_setting_is_still_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("dataset: synthetic\nepochs: 1e1\n")
    assert_refused(train(tmp_path / "c.yaml", tmp_path), capsys, "--epochs must be an integer, got 10.0 (a number)")


# ------------------------------------------------------------------ I6: duplicate keys
@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("c.json", '{"dataset": "synthetic", "epochs": 1, "lr": 0.01, "epochs": 3}',
         "duplicate key 'epochs': give each setting once (the last one would win silently)"),
        ("c.json", '{"dataset": "synthetic", "model_args": {"w": 1, "w": 2}}', "duplicate key 'w'"),
        ("c.yaml", "dataset: synthetic\nepochs: 1\nlr: 0.01\nepochs: 3\n",
         "duplicate key 'epochs' (line 4): give each setting once (the last one would win silently)"),
        ("c.yaml", "dataset: synthetic\nmodel_args:\n  w: 1\n  'w': 2\n", "duplicate key 'w' (line 4)"),
    ],
    ids=["json", "json-nested", "yaml", "yaml-nested"],
)  # fmt: skip
def test_duplicate_keys_are_refused_naming_the_key_and_file(name, text, expected, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    assert_refused(train(tmp_path / name, tmp_path), capsys, f"config file {tmp_path / name}: {expected}")
    assert not (tmp_path / "run").exists()


def test_toml_duplicate_keys_stay_refused(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('dataset = "synthetic"\nepochs = 1\nepochs = 3\n')
    assert_refused(train(tmp_path / "c.toml", tmp_path), capsys, "is not valid: Cannot overwrite a value")


# ------------------------------------------------------- I11: floats float32 can hold
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--lr", "1e308"], "--lr must be a positive finite number, got 1e+308 (at most 1.8e+19: "
                            "training computes with it in float32, where more overflows)"),
        (["--lr", "3e38"], "--lr must be a positive finite number, got 3e+38 (at most 1.8e+19"),
        (["--weight-decay", "1e300"], "--weight-decay must be a finite number >= 0, got 1e+300 (at most 1.8e+19"),
        (["--clip-value", "1e300"], "--clip-value must be a positive finite number, got 1e+300 (at most"),
        (["--clip-norm", "1e39"], "--clip-norm must be a positive finite number, got 1e+39 (at most"),
        (["--min-delta", "1e39"], "--min-delta must be a finite number >= 0, got 1e+39 (at most"),
        (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    ],
    ids=["lr-1e308", "lr-3e38", "weight-decay", "clip-value", "clip-norm", "min-delta", "lr-inf"],
)  # fmt: skip
def test_floats_beyond_what_float32_training_holds_are_one_line(flags, expected, tmp_path, capsys):
    argv = ["train", "--dataset", "synthetic", "--epochs", "2", *flags, "--out", str(tmp_path / "run")]
    assert_refused(argv, capsys, expected)


def test_the_cap_is_what_a_float32_optimizer_step_survives():
    """At the cap, AdamW's step (lr / bias correction) and weight decay convert to float32; past it, not."""
    assert 1.8e19 < MAX_FLOAT_SETTING < 1.9e19
    assert config_from_dict({"dataset": "synthetic", "lr": MAX_FLOAT_SETTING, "epochs": 2}).resolved().lr == MAX_FLOAT_SETTING
    for foreach in (False, True):
        for make in (lambda p, lr: torch.optim.AdamW([p], lr=lr, weight_decay=1.0, foreach=foreach),
                     lambda p, lr: torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=1.0, foreach=foreach)):  # fmt: skip
            parameter = torch.nn.Parameter(torch.ones(3))
            parameter.grad = torch.ones(3)
            make(parameter, MAX_FLOAT_SETTING).step()  # no "cannot be converted to type float without overflow"
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="overflow"):  # why float32's own max is not the cap
        torch.optim.AdamW([parameter], lr=3e38).step()


# ------------------------------------------------------------ I9: TRAINKIT_DATA_DIR
def fake_mnist(folder: Path) -> Path:
    """The four file names (find_dataset_dir looks only for them; nothing here is read)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        (folder / name).write_bytes(b"")
    return folder


def data_dir_error(monkeypatch, env_dir: Path) -> str:
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(env_dir))
    with pytest.raises(DataError) as info:
        find_dataset_dir("mnist")
    return str(info.value)


def test_a_data_dir_that_is_a_file_or_missing_is_named(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    for env_dir, state in ((tmp_path / "afile", "a file"), (tmp_path / "typo", "missing")):
        assert data_dir_error(monkeypatch, env_dir) == (
            f"TRAINKIT_DATA_DIR={env_dir} is {state}, not a folder, so $TRAINKIT_DATA_DIR/mnist ({env_dir / 'mnist'}) "
            f"cannot hold mnist's files. Set TRAINKIT_DATA_DIR to the folder holding mnist/, or unset it to use "
            f"the cache {default_cache_dir() / 'mnist'}."
        )


def test_a_data_dir_holding_the_files_without_the_mnist_level_says_where_they_are(tmp_path, monkeypatch):
    fake_mnist(tmp_path / "data" / "mnist")
    assert data_dir_error(monkeypatch, tmp_path / "data" / "mnist") == (
        f"$TRAINKIT_DATA_DIR/mnist ({tmp_path / 'data' / 'mnist' / 'mnist'}) lacks mnist's files: the files are in "
        f"{tmp_path / 'data' / 'mnist'}; set TRAINKIT_DATA_DIR to its parent {tmp_path / 'data'}."
    )
    fake_mnist(tmp_path / "digits")
    assert data_dir_error(monkeypatch, tmp_path / "digits") == (
        f"$TRAINKIT_DATA_DIR/mnist ({tmp_path / 'digits' / 'mnist'}) lacks mnist's files: mnist's file names lie "
        f"directly in {tmp_path / 'digits'}; move the files into {tmp_path / 'digits' / 'mnist'}, or pass "
        f"--data-dir {tmp_path / 'digits'}."
    )


def test_a_data_dir_with_an_incomplete_mnist_folder_lists_what_is_missing(tmp_path, monkeypatch):
    (fake_mnist(tmp_path / "data" / "mnist") / MNIST_FILES[3]).unlink()
    assert data_dir_error(monkeypatch, tmp_path / "data") == (
        f"$TRAINKIT_DATA_DIR/mnist ({tmp_path / 'data' / 'mnist'}) lacks {MNIST_FILES[3]}. "
        f"Put all four files there, or unset TRAINKIT_DATA_DIR."
    )


def test_an_empty_data_dir_is_named_beside_the_cache(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    message = data_dir_error(monkeypatch, tmp_path / "empty")
    assert message.startswith(f"mnist files missing from the cache {default_cache_dir() / 'mnist'} (")
    assert f"downloading is disabled. $TRAINKIT_DATA_DIR/mnist ({tmp_path / 'empty' / 'mnist'}) does not exist. " in message


def test_a_data_dir_without_the_dataset_still_falls_back_to_a_filled_cache(tmp_path, monkeypatch):
    cache = fake_mnist(default_cache_dir() / "mnist")
    (tmp_path / "other").mkdir()
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(tmp_path / "other"))
    assert find_dataset_dir("mnist") == cache


def test_a_wrong_data_dir_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(tmp_path / "afile"))
    assert_refused(["train", "--dataset", "mnist", "--epochs", "1", "--out", str(tmp_path / "run")], capsys,
                   f"TRAINKIT_DATA_DIR={tmp_path / 'afile'} is a file, not a folder")  # fmt: skip

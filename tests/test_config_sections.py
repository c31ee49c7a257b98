"""TrainConfig in sections (trainkit.config.sections): --help grouped like the code, config files
with section tables, and every flat name still working."""

from __future__ import annotations

import dataclasses

import pytest

from trainkit.cli import build_parser, train_config_from_args
from trainkit.config import TrainConfig
from trainkit.config.files import config_from_dict
from trainkit.config.sections import SECTION_OF, SECTIONS
from trainkit.errors import ConfigError


def test_the_sections_hold_every_field_once_and_none_is_named_like_a_field():
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    listed = [name for names in SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(fields) and len(listed) == len(set(listed))
    assert not set(SECTIONS) & set(fields)


def train_help() -> str:
    parser = build_parser()
    train = next(action for action in parser._subparsers._group_actions).choices["train"]
    return train.format_help()


def test_train_help_lists_each_flag_under_its_section():
    text = train_help()
    headings = {section: text.index(f"\n{section} settings") for section in SECTIONS}
    assert list(headings) == sorted(headings, key=headings.get)  # in SECTIONS' order
    ends = sorted(headings.values()) + [len(text)]
    for flag, section in [("--lr ", "optim"), ("--warmup ", "lr_schedule"), ("--fsdp-offload", "parallel"),
                          ("--on-nonfinite", "nonfinite"), ("--augment ", "data"), ("--dataset-arg", "data"),
                          ("--model-arg", "network"), ("--ema ", "averaging"), ("--epochs ", "duration")]:  # fmt: skip
        start = headings[section]
        end = next(position for position in ends if position > start)
        assert flag in text[start:end], (flag, section)
    assert all(SECTION_OF[name] for name in ("lr", "epochs"))


def test_a_config_file_may_use_section_tables_and_flags_still_win(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('dataset = "synthetic"\n[optim]\nlr = 0.003\nclip-norm = 0.5\n[duration]\nepochs = 2\n')
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "3"])
    config, _ = train_config_from_args(args)
    assert (config.lr, config.clip_norm, config.epochs, config.dataset) == (0.003, 0.5, 3, "synthetic")
    assert config_from_dict({"optim": {"lr": 0.003}}).lr == config_from_dict({"lr": 0.003}).lr == 0.003


@pytest.mark.parametrize("values, message", [
    ({"optim": {"epochs": 2}}, r"\[optim\] has no setting 'epochs' \(it belongs in \[duration\]\)"),
    ({"optim": {"lrr": 2}}, r"\[optim\] has no setting 'lrr' \(no such setting\)"),
    ({"lr": 0.1, "optim": {"lr": 0.2}}, r"'lr' is given twice \(at the top level and \[optim\]\); give it once"),
])  # fmt: skip
def test_a_setting_in_the_wrong_table_or_given_twice_is_one_line(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values, source="run.toml")

"""`trainkit profile`: phases of the real training step, operator table, Chrome trace."""

from __future__ import annotations

import json

import pytest

from trainkit.cli import main
from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError
from trainkit.profiling import PHASES, ProfileResult, profile_training


def test_profile_reports_the_four_phases_and_writes_a_trace(tmp_path):
    config = TrainConfig(dataset="synthetic", hidden=[32], batch_size=64, accumulate=2, device="cpu",
                         out=str(tmp_path / "profile"))  # fmt: skip
    result, out_dir = profile_training(config, steps=4, warmup_steps=2)

    assert result.steps == 4 and result.step_ms > 0
    assert set(result.phase_ms) == set(PHASES)
    assert all(result.phase_ms[name] > 0 for name in PHASES), result.phase_ms
    assert sum(result.phase_ms.values()) <= result.step_ms * 1.05  # phases lie within the step
    shares = result.shares()
    assert sum(shares.values()) == pytest.approx(100.0)
    assert shares["forward"] + shares["backward"] > 20  # the model's work, not bookkeeping, dominates

    trace = json.loads((out_dir / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert set(PHASES) <= names and "aten::addmm" in names
    report = (out_dir / "profile.txt").read_text()
    assert "| backward |" in report and "Self CPU" in report and "4 optimizer steps after 2 warm-up" in report


def test_shares_include_the_unlabelled_rest():
    result = ProfileResult(steps=1, step_ms=10.0, operators="",
                           phase_ms={"data": 1.0, "forward": 3.0, "backward": 4.0, "optimizer": 1.0})  # fmt: skip
    assert result.other_ms == pytest.approx(1.0)
    assert result.shares() == pytest.approx({"data": 10, "forward": 30, "backward": 40, "optimizer": 10, "other": 10})


def test_profile_command(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["profile", "--dataset", "synthetic", "--hidden", "16", "--device", "cpu", "--steps", "2",
                 "--warmup-steps", "1", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "| optimizer |" in printed and "aten::" in printed
    assert (out / "trace.json").is_file() and (out / "profile.txt").is_file()


def test_rejects_zero_steps(tmp_path):
    with pytest.raises(ConfigError, match="--steps must be in 1..1000"):
        profile_training(TrainConfig(dataset="synthetic", device="cpu", out=str(tmp_path)), steps=0)

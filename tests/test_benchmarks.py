"""The benchmark harness's arithmetic: FLOP counts and ratios (the timings live in benchmarks/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from loops import LOOPS, Workload  # noqa: E402
from run import Case, round_order, summarise, training_flops_per_image  # noqa: E402


def test_mlp_training_flops_match_the_closed_form_count():
    # forward 2*MACs; backward: weight grads for every layer, input grads for all but the first
    macs = [784 * 256, 256 * 128, 128 * 10]
    expected = 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])
    workload = Workload("mlp", torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)), 128)
    assert training_flops_per_image(workload) == pytest.approx(expected, rel=1e-9)


def test_ratios_are_taken_against_the_reference_case_of_the_same_group():
    workload = Workload("mlp", torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), 8)
    cases = [Case("g", "in_memory", None, workload), Case("g", "trainkit", None, workload)]
    rows = summarise(cases, {("g", "in_memory"): [2.0, 4.0, 3.0], ("g", "trainkit"): [3.3, 3.0, 9.0]})
    trainkit = rows[1]
    assert (trainkit["median_s"], trainkit["min_s"], trainkit["max_s"]) == (3.3, 3.0, 9.0)
    assert trainkit["ratio"] == pytest.approx(1.1)


@pytest.mark.parametrize("name", ["trainkit", "dataloader", "in_memory"])
def test_each_loop_trains_one_epoch_and_times_it(name):
    x = torch.randn(512, 1, 28, 28)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    seconds = LOOPS[name](Workload("mlp", x, y, 128))
    assert 0 < seconds < 30


def test_each_round_runs_every_case_once_and_rotates_who_goes_first():
    workload = Workload("mlp", torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), 8)
    cases = [Case(group, name, None, workload) for group in ("g1", "g2") for name in "abc"]
    orders = [[(c.group, c.name) for c in round_order(cases, r)] for r in range(3)]
    assert all(sorted(order) == sorted((c.group, c.name) for c in cases) for order in orders)
    assert [order[0][1] for order in orders] == ["a", "b", "c"]
    assert [order[3][1] for order in orders] == ["a", "b", "c"]


def test_recipe_goals_are_judged_on_mean_time_and_the_worst_seed():
    from recipes import GOALS, table

    def runs(accuracies, walls):
        return [{"seed": i, "wall_s": w, "test_accuracy": a, "test_tta_accuracy": None}
                for i, (a, w) in enumerate(zip(accuracies, walls))]  # fmt: skip

    met = table({"mlp_fast": runs([0.986, 0.987, 0.985], [6.0, 7.0, 7.5])}).splitlines()[-1]
    assert "98.60 ± 0.10% (98.50%)" in met and "6.8 ± 0.8" in met and met.endswith("| yes |")
    one_bad_seed = table({"mlp_fast": runs([0.99, 0.99, 0.983], [6.0, 6.0, 6.0])}).splitlines()[-1]
    assert one_bad_seed.endswith("| no |")  # mean 98.77% but a seed below 98.4%
    too_slow = table({"cnn_fast": runs([0.992, 0.992], [11.0, 10.0])}).splitlines()[-1]
    assert too_slow.endswith("| no |")
    assert {goal.recipe for goal in GOALS} == {"mlp_fast", "mlp_best", "cnn_fast", "cnn_995", "cnn_best"}


def test_lr_finder_goal_is_points_for_accuracy_and_a_relative_gap_for_losses():
    from lr_finder_tasks import LRTask, best_of, table, within_goal

    assert within_goal(0.981, 0.983, higher_is_better=True)  # 0.2 points below: within
    assert not within_goal(0.9805, 0.983, higher_is_better=True)
    assert within_goal(1.52, 1.50, higher_is_better=False)  # +1.3%
    assert not within_goal(1.54, 1.50, higher_is_better=False)  # +2.7%
    grid = [{"lr": 1e-3, "value": 1.6}, {"lr": 3e-3, "value": 1.5}, {"lr": 1e-2, "value": float("nan")}]
    assert best_of(grid, higher_is_better=False)["lr"] == 3e-3  # a diverged lr is never the best
    task = LRTask("lm", (), "val_loss", False)
    row = table((task,), {"lm": {"grid": grid, "auto": {"lr": 2e-3, "value": 1.56}}}).splitlines()[-1]
    assert "0.01 → diverged" in row and "+4.0%" in row and row.endswith("| no |")


def test_the_startup_split_is_differences_of_whole_processes_that_add_up(monkeypatch):
    import frontier

    walls = dict(zip(frontier.PYTHON_STAGES.values(), (0.1, 1.5, 3.0)))
    monkeypatch.setattr(frontier, "wall_of", lambda command: walls[command[-1]])
    monkeypatch.setattr(frontier, "run_once", lambda recipe, seed, data_dir, flags=(): {"wall_s": 5.0 if flags else 9.5})
    parts = frontier.startup_parts("data", rounds=3)
    assert list(parts.values()) == pytest.approx([0.1, 1.4, 1.5, 2.0, 4.5, 9.5])
    assert sum(list(parts.values())[:-1]) == pytest.approx(parts["whole process"])


@pytest.mark.parametrize("recipe", ["mlp_fast", "cnn_fast", "cnn_995"])
def test_every_frontier_variant_is_a_valid_command_line(recipe):
    from frontier import FLOOR_FLAGS, FRONTIERS

    from trainkit.cli import build_parser, train_config_from_args

    root = Path(__file__).resolve().parents[1]
    for _, flags in FRONTIERS[recipe] + [("floor", FLOOR_FLAGS)]:
        args = build_parser().parse_args(["train", "--config", str(root / "configs" / f"{recipe}.toml"), *flags])
        config, given = train_config_from_args(args)
        named = {flag.removeprefix("--").replace("-", "_") for flag in flags if flag.startswith("--")}
        assert config.resolved().model == recipe.split("_")[0] and named <= set(given)


def test_the_first_call_race_benchmark_reports_each_process_and_trainkits_import_settles_it():
    from first_call_race import launch

    differed = launch(["trainkit", "trainkit", "bare"], parallel=3)
    assert differed[:2] == [[], []]
    assert set(differed[2]) <= {"sqrt", "exp"}  # a bare process may race (benchmarks/first_call_race.py)

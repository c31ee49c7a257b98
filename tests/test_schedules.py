"""Named schedules against their closed forms, stepped once per optimizer step."""

from __future__ import annotations

import io
import math

import pytest
import torch

from trainkit.errors import ConfigError
from trainkit.optim.schedules import (
    SCHEDULE_NAMES, PlateauSchedule, ScheduleSpec, build_scheduler, lr_curve, plot_schedules, scale_learning_rate,
)  # fmt: skip

PEAK = 1e-3
STEPS_PER_EPOCH = 5
# plateau: improves, then stalls (patience 1 -> a cut after two stalled epochs), improves, stalls again
EPOCH_METRICS = [1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7]
TOTAL = STEPS_PER_EPOCH * len(EPOCH_METRICS)

# One of each schedule, with warmup and a floor wherever they apply.
EVERY_SCHEDULE = {
    "constant": ScheduleSpec("constant", warmup_steps=5),
    "step": ScheduleSpec("step", warmup_steps=5, step_size=10),
    "multistep": ScheduleSpec("multistep", warmup_steps=5, milestones=(10, 30), gamma=0.5),
    "exponential": ScheduleSpec("exponential", warmup_steps=5, min_lr=1e-5),
    "cosine": ScheduleSpec("cosine", warmup_steps=5, min_lr=1e-4),
    "warmup_cosine": ScheduleSpec("warmup_cosine", warmup_steps=5),
    "linear": ScheduleSpec("linear", warmup_steps=5, min_lr=1e-4),
    "onecycle": ScheduleSpec("onecycle", min_lr=1e-5),
    "cosine_restarts": ScheduleSpec("cosine_restarts", warmup_steps=5, restart_steps=10, restart_mult=2, min_lr=1e-4),
    "plateau": ScheduleSpec("plateau", warmup_steps=5, plateau_patience=1, min_lr=1e-5),
}


def test_every_name_is_covered():
    assert tuple(EVERY_SCHEDULE) == SCHEDULE_NAMES


def new_schedule(spec, total=TOTAL):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    return optimizer, build_scheduler(spec, optimizer, total_steps=total)


def drive(optimizer, schedule, steps: range) -> list[float]:
    """Train steps ``steps``; report EPOCH_METRICS at epoch ends. Returns the lr each step used."""
    lrs = []
    for step in steps:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
        if (step + 1) % STEPS_PER_EPOCH == 0 and hasattr(schedule, "step_metric"):
            schedule.step_metric(EPOCH_METRICS[(step + 1) // STEPS_PER_EPOCH - 1])
    return lrs


def cosine(t: float, period: float, top: float = PEAK, floor: float = 0.0) -> float:
    return floor + 0.5 * (top - floor) * (1 + math.cos(math.pi * t / period))


# ------------------------------------------------------------------ cosine
def test_cosine_textbook_values():
    lrs = lr_curve("cosine", lr=1e-3, total_steps=101)  # T_max = 100: the last step (100) uses lr_min
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[25] == pytest.approx(8.536e-4, rel=1e-3)
    assert lrs[50] == pytest.approx(5e-4, rel=1e-9)
    assert lrs[75] == pytest.approx(1.464e-4, rel=1e-3)
    assert abs(lrs[100]) < 1e-12
    assert lrs == pytest.approx([cosine(t, 100) for t in range(101)], rel=1e-9, abs=1e-15)


def test_cosine_with_a_floor():
    lrs = lr_curve(ScheduleSpec("cosine", min_lr=1e-4), lr=1e-3, total_steps=101)
    assert lrs[50] == pytest.approx(5.5e-4, rel=1e-9)
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-9)
    assert min(lrs) == pytest.approx(1e-4, rel=1e-9)


# --------------------------------------------------- one test per schedule
def test_constant():
    assert lr_curve("constant", lr=PEAK, total_steps=50) == [PEAK] * 50


def test_step_decays_by_gamma_every_step_size():
    lrs = lr_curve(ScheduleSpec("step", step_size=10), lr=PEAK, total_steps=35)
    assert lrs == pytest.approx([PEAK * 0.1 ** (t // 10) for t in range(35)], rel=1e-9)


def test_step_default_is_each_third_of_the_run():
    lrs = lr_curve("step", lr=PEAK, total_steps=90)
    assert lrs[29] == pytest.approx(1e-3) and lrs[30] == pytest.approx(1e-4) and lrs[60] == pytest.approx(1e-5)


def test_multistep_decays_at_its_milestones():
    lrs = lr_curve(ScheduleSpec("multistep", milestones=(10, 25), gamma=0.5), lr=PEAK, total_steps=40)
    assert lrs == pytest.approx([PEAK * 0.5 ** ((t >= 10) + (t >= 25)) for t in range(40)], rel=1e-9)


def test_multistep_default_milestones_at_half_and_three_quarters():
    lrs = lr_curve("multistep", lr=PEAK, total_steps=100)
    assert lrs[49] == pytest.approx(1e-3) and lrs[50] == pytest.approx(1e-4)
    assert lrs[74] == pytest.approx(1e-4) and lrs[75] == pytest.approx(1e-5)


def test_exponential_with_a_given_factor():
    lrs = lr_curve(ScheduleSpec("exponential", exp_gamma=0.9), lr=PEAK, total_steps=30)
    assert lrs == pytest.approx([PEAK * 0.9**t for t in range(30)], rel=1e-9)


@pytest.mark.parametrize(("min_lr", "end"), [(0.0, PEAK / 100), (1e-4, 1e-4)])
def test_exponential_default_factor_reaches_its_target_at_the_last_step(min_lr, end):
    lrs = lr_curve(ScheduleSpec("exponential", min_lr=min_lr), lr=PEAK, total_steps=51)
    gamma = (end / PEAK) ** (1 / 50)
    assert lrs == pytest.approx([PEAK * gamma**t for t in range(51)], rel=1e-9)
    assert lrs[-1] == pytest.approx(end, rel=1e-9)


@pytest.mark.parametrize("min_lr", [0.0, 1e-4])
def test_linear_goes_from_peak_to_min_lr(min_lr):
    lrs = lr_curve(ScheduleSpec("linear", min_lr=min_lr), lr=PEAK, total_steps=51)
    assert lrs == pytest.approx([PEAK + (min_lr - PEAK) * t / 50 for t in range(51)], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("name", ["cosine", "step", "constant", "multistep", "linear", "exponential"])
def test_warmup_then_schedule(name):
    lrs = lr_curve(ScheduleSpec(name, warmup_steps=10), lr=PEAK, total_steps=111)
    assert lrs[0] == pytest.approx(PEAK / 100, rel=1e-9)  # starts at 1% of peak
    assert lrs[5] == pytest.approx(PEAK / 100 + 0.5 * (PEAK - PEAK / 100), rel=1e-9)  # linear
    assert lrs[:11] == pytest.approx([PEAK / 100 + (PEAK - PEAK / 100) * t / 10 for t in range(11)], rel=1e-9)
    assert lrs[10] == pytest.approx(PEAK, rel=1e-12)  # peak at the end of warmup
    # then the schedule's own curve over the remaining 101 steps, shifted by the warmup
    assert lrs[10:] == pytest.approx(lr_curve(name, lr=PEAK, total_steps=101), rel=1e-9, abs=1e-15)


def test_warmup_then_cosine_closed_form():
    lrs = lr_curve(ScheduleSpec("cosine", warmup_steps=10), lr=PEAK, total_steps=111)
    for step in (35, 60, 85, 110):  # textbook cosine with T_max 100, starting at step 10
        assert lrs[step] == pytest.approx(cosine(step - 10, 100), rel=1e-9, abs=1e-15)
    assert max(range(111), key=lrs.__getitem__) == 10


def test_warmup_cosine_is_cosine_with_warmup_and_the_old_call_still_works():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    old_call = build_scheduler("warmup_cosine", optimizer, total_steps=110, warmup_steps=10)
    lrs = drive(optimizer, old_call, range(110))
    assert lrs == lr_curve(ScheduleSpec("cosine", warmup_steps=10), lr=PEAK, total_steps=110)
    assert lrs == lr_curve(ScheduleSpec("warmup_cosine", warmup_steps=10), lr=PEAK, total_steps=110)


def test_warmup_keyword_overrides_the_spec():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    schedule = build_scheduler(ScheduleSpec("cosine", warmup_steps=50), optimizer, total_steps=100, warmup_steps=0)
    assert drive(optimizer, schedule, range(100)) == lr_curve("cosine", lr=PEAK, total_steps=100)


def test_warmup_is_clamped_to_leave_one_step():
    lrs = lr_curve(ScheduleSpec("cosine", warmup_steps=500), lr=PEAK, total_steps=10)
    assert lrs[0] == pytest.approx(PEAK / 100) and lrs[9] == pytest.approx(PEAK)


def test_onecycle_rises_to_the_peak_at_pct_start_then_anneals():
    lrs = lr_curve("onecycle", lr=PEAK, total_steps=100)
    assert lrs[0] == pytest.approx(PEAK / 25, rel=1e-9)  # torch's default div_factor
    assert max(range(100), key=lrs.__getitem__) == pytest.approx(30, abs=1)
    assert max(lrs) == pytest.approx(PEAK, rel=1e-9)
    assert lrs[-1] == pytest.approx(PEAK / 25 / 1e4, rel=1e-9)  # torch's default final_div_factor


def test_onecycle_linear_anneal_and_pct_start():
    lrs = lr_curve(ScheduleSpec("onecycle", anneal="linear", pct_start=0.5, min_lr=1e-5), lr=PEAK, total_steps=100)
    peak_at = max(range(100), key=lrs.__getitem__)
    assert peak_at == pytest.approx(50, abs=1)
    after_peak = [PEAK + (1e-5 - PEAK) * t / (99 - peak_at) for t in range(100 - peak_at)]
    assert lrs[peak_at:] == pytest.approx(after_peak, rel=1e-9)  # a straight line from the peak to min_lr


def test_onecycle_ends_at_min_lr():
    lrs = lr_curve(ScheduleSpec("onecycle", min_lr=1e-5), lr=PEAK, total_steps=100)
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-9)
    assert lrs[0] == pytest.approx(PEAK / 25, rel=1e-9)


def test_cosine_restarts_return_to_the_peak():
    spec = ScheduleSpec("cosine_restarts", restart_steps=10, restart_mult=2, min_lr=1e-4)
    lrs = lr_curve(spec, lr=PEAK, total_steps=80)
    for start, length in ((0, 10), (10, 20), (30, 40)):  # T_0 = 10, then 20, then 40
        assert lrs[start] == pytest.approx(PEAK, rel=1e-9)
        for t in range(length):
            assert lrs[start + t] == pytest.approx(cosine(t, length, floor=1e-4), rel=1e-9)
    assert lrs[5] == pytest.approx(5.5e-4, rel=1e-9) and lrs[20] == pytest.approx(5.5e-4, rel=1e-9)


def test_cosine_restarts_default_cycle_is_a_quarter_of_the_run():
    lrs = lr_curve("cosine_restarts", lr=PEAK, total_steps=100)
    assert [t for t in range(1, 100) if lrs[t] > lrs[t - 1]] == [25, 50, 75]


def test_plateau_lowers_the_lr_after_patience_epochs_without_improvement():
    # patience=2 tolerates two epochs without improvement; the third lowers the lr by the factor
    metrics = [1.0, 0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4]
    lrs = lr_curve("plateau", lr=PEAK, total_steps=80, metrics=metrics, steps_per_epoch=10)
    assert lrs[:50] == [PEAK] * 50  # metric reported after step 49 is the third stall
    assert lrs[50:] == pytest.approx([PEAK * 0.1] * 30, rel=1e-12)


def test_plateau_respects_factor_floor_and_mode():
    spec = ScheduleSpec("plateau", plateau_patience=0, plateau_factor=0.5, min_lr=3e-4, plateau_mode="max")
    lrs = lr_curve(spec, lr=PEAK, total_steps=40, metrics=[0.9, 0.8, 0.8, 0.8], steps_per_epoch=10)
    # epoch 2 is worse in "max" mode: halved from step 20; epoch 3 again, but not below min_lr
    assert lrs[::10] == pytest.approx([PEAK, PEAK, PEAK / 2, 3e-4], rel=1e-12)


def test_plateau_warms_up_first_and_ignores_metrics_during_warmup():
    spec = ScheduleSpec("plateau", warmup_steps=15, plateau_patience=0)
    lrs = lr_curve(spec, lr=PEAK, total_steps=40, metrics=[5.0, 1.0, 1.0, 1.0], steps_per_epoch=10)
    assert lrs[0] == pytest.approx(PEAK / 100) and lrs[15] == pytest.approx(PEAK)
    assert lrs[15:30] == pytest.approx([PEAK] * 15)  # epoch 1's 5.0 came during warmup: not a best
    assert lrs[30:] == pytest.approx([PEAK / 10] * 10)  # epoch 3 did not improve on epoch 2


def test_plateau_without_metrics_is_flat_after_warmup():
    lrs = lr_curve(ScheduleSpec("plateau", warmup_steps=4), lr=PEAK, total_steps=20)
    assert lrs[0] == pytest.approx(PEAK / 100) and lrs[4:] == [PEAK] * 16


# ------------------------------------------------------ every schedule
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_types(name):
    optimizer, schedule = new_schedule(EVERY_SCHEDULE[name])
    if name == "plateau":
        assert isinstance(schedule, PlateauSchedule)
    else:
        assert isinstance(schedule, torch.optim.lr_scheduler.LRScheduler)
    assert schedule.get_last_lr() == [optimizer.param_groups[0]["lr"]]


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_survives_a_state_dict_round_trip(name):
    spec = EVERY_SCHEDULE[name]
    optimizer, schedule = new_schedule(spec)
    drive(optimizer, schedule, range(22))
    saved = io.BytesIO()  # through torch.save, as in a checkpoint loaded with weights_only=True
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    optimizer2, schedule2 = new_schedule(spec)
    optimizer2.load_state_dict(state["optimizer"])
    schedule2.load_state_dict(state["schedule"])
    assert drive(optimizer2, schedule2, range(22, TOTAL)) == drive(optimizer, schedule, range(22, TOTAL))
    assert schedule2.get_last_lr() == schedule.get_last_lr()


@pytest.mark.parametrize("scale_at", [3, 22])  # during warmup and after it
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_scale_learning_rate_scales_the_rest_of_every_schedule(name, scale_at):
    spec = EVERY_SCHEDULE[name]
    reference = drive(*new_schedule(spec), range(TOTAL))
    optimizer, schedule = new_schedule(spec)
    before = drive(optimizer, schedule, range(scale_at))
    scale_learning_rate(optimizer, schedule, 0.5)
    after = drive(optimizer, schedule, range(scale_at, TOTAL))
    assert before == reference[:scale_at]
    assert after == pytest.approx([0.5 * lr for lr in reference[scale_at:]], rel=1e-12, abs=0)
    assert len(set(reference[scale_at:])) > 1 or name == "constant"  # the comparison covers a changing lr


def test_scale_learning_rate_with_no_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    scale_learning_rate(optimizer, None, 0.5)
    assert optimizer.param_groups[0]["lr"] == PEAK / 2


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ScheduleSpec("triangular"), "warmup_cosine"),
        (lambda: lr_curve("triangular", lr=PEAK, total_steps=10), "cosine_restarts"),
        (lambda: ScheduleSpec("onecycle", warmup_steps=5), "warmup_steps"),
        (lambda: new_schedule_with_warmup("onecycle"), "warmup_steps"),
        (lambda: ScheduleSpec("onecycle", anneal="sine"), "anneal.*cos, linear"),
        (lambda: ScheduleSpec("cosine_restarts", restart_mult=0), "restart_mult.*>= 1"),
        (lambda: ScheduleSpec("cosine_restarts", restart_steps=0), "restart_steps"),
        (lambda: ScheduleSpec("cosine", min_lr=-1e-5), "min_lr.*>= 0"),
        (lambda: ScheduleSpec("onecycle", pct_start=0.0), r"pct_start.*\(0, 1\)"),
        (lambda: ScheduleSpec("onecycle", pct_start=1.0), r"pct_start.*\(0, 1\)"),
        (lambda: ScheduleSpec("onecycle", pct_start=1.5), r"pct_start.*\(0, 1\)"),
        (lambda: ScheduleSpec("step", step_size=0), "step_size"),
        (lambda: ScheduleSpec("step", gamma=1.5), "gamma"),
        (lambda: ScheduleSpec("multistep", milestones=(20, 10)), "milestones"),
        (lambda: ScheduleSpec("multistep", milestones=(0, 10)), "milestones"),
        (lambda: ScheduleSpec("exponential", exp_gamma=0.0), "exp_gamma"),
        (lambda: ScheduleSpec("plateau", plateau_factor=1.0), "plateau_factor"),
        (lambda: ScheduleSpec("plateau", plateau_mode="best"), "plateau_mode.*min, max"),
        (lambda: ScheduleSpec("cosine", warmup_steps=-1), "warmup_steps"),
        (lambda: lr_curve("cosine", lr=PEAK, total_steps=0), "total_steps"),
        (lambda: lr_curve(ScheduleSpec("linear", min_lr=1.0), lr=PEAK, total_steps=10), "min_lr.*peak"),
        (lambda: lr_curve("onecycle", lr=PEAK, total_steps=3), "pct_start"),
    ],
)
def test_bad_arguments_are_config_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def new_schedule_with_warmup(name):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    return build_scheduler(name, optimizer, total_steps=100, warmup_steps=5)


# ------------------------------------------------------------------ plots
def test_plot_schedules_writes_a_png(tmp_path):
    specs = ["cosine", ScheduleSpec("step", warmup_steps=5), "onecycle", "plateau"]
    path = plot_schedules(specs, tmp_path / "schedules.png", lr=PEAK, total_steps=60, log_scale=True)
    assert path == tmp_path / "schedules.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


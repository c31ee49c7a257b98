"""What a finished study leaves in its folder: ``best.toml``, ``trials.csv``, ``report.md`` with
Optuna's own plots (``optuna.visualization.matplotlib``) and ``report.html``.

``best.toml`` holds the best trial's settings as given (the base settings with its sampled values),
so ``trainkit train --config DIR/best.toml --out NEW`` trains the same run again, to the same
``model_sha256`` on the same machine.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

from trainkit.config.names import OFF_WHEN_ZERO
from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError
from trainkit.checkpoint.rundir import read_json, write_atomically
from trainkit.tune.study import TuneSpec, trial_folder
from trainkit.tune.trials import TRIAL_FILE, describe_params

BEST_FILE = "best.toml"
# Optuna's plots in report.md: file -> (title, function name in optuna.visualization.matplotlib)
PLOTS = {
    "optimization_history.png": ("optimisation history", "plot_optimization_history"),
    "intermediate_values.png": ("validation curves of every trial (pruned ones end early)", "plot_intermediate_values"),
    "param_importances.png": ("parameter importances", "plot_param_importances"),
    "parallel_coordinate.png": ("parallel coordinates", "plot_parallel_coordinate"),
}
NOT_IN_BEST = ("out", "plots")  # where the best run goes is the user's choice; plots are on by default


def toml_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings TOML can hold: TOML has no null, so a setting that is off (None) is left out when
    that is its default, or written as 0 where 0 turns it off (clipping); anything else is refused."""
    defaults = TrainConfig().to_dict()
    values = {}
    for key, value in settings.items():
        if value is not None:
            values[key] = {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value
        elif key in OFF_WHEN_ZERO:
            values[key] = 0
        elif defaults.get(key) is not None:
            raise ConfigError(f"the base setting {key} is null, which best.toml cannot hold (TOML has no null); "
                              f"leave it out or give a value")  # fmt: skip
    return values


def write_results(spec: TuneSpec, study: Any) -> dict[str, Any]:
    """Every results file; returns the study's outcome (what `trainkit tune` prints)."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    counted = (states.COMPLETE, states.PRUNED, states.FAIL, states.RUNNING)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in counted}
    table = trial_rows(spec, trials)  # one read of every trial's summary, for trials.csv and report.md
    write_trials_csv(spec, table)
    complete = [t for t in trials if t.state == states.COMPLETE]
    best = study.best_trial if complete else None
    outcome: dict[str, Any] = {"study": spec.study_name, "out": spec.out, "trials": counts, "monitor": spec.monitor}
    if best is not None:
        write_best_toml(spec, best.number)
        outcome.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_run=str(trial_folder(spec, best.number)), best_config=str(spec.folder / BEST_FILE))  # fmt: skip
    notes = draw_plots(spec, study)
    write_atomically(spec.folder / "report.md", report_markdown(spec, table, best, counts, notes))
    write_html_report(spec)
    return outcome


def trial_rows(spec: TuneSpec, trials: list[Any]) -> tuple[list[str], list[list[Any]]]:
    names = [dimension.name for dimension in spec.dimensions]
    header = ["trial", "state", spec.monitor, *names, "epochs", "seconds", "run"]
    rows = []
    for trial in trials:
        folder = trial_folder(spec, trial.number)
        summary = read_json(folder / "summary.json", "the trial's summary") if (folder / "summary.json").is_file() else {}
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
        rows.append([trial.number, trial.state.name.lower(), trial.value if trial.value is not None else "",
                     *(trial.params.get(name, "") for name in names), summary.get("epochs_run", ""),
                     f"{seconds:.1f}" if seconds is not None else "", str(folder.relative_to(spec.folder))])  # fmt: skip
    return header, rows


def write_trials_csv(spec: TuneSpec, table: tuple[list[str], list[list[Any]]]) -> None:
    header, rows = table
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomically(spec.folder / "trials.csv", buffer.getvalue())


def write_best_toml(spec: TuneSpec, number: int) -> None:
    import tomli_w

    record = read_json(trial_folder(spec, number) / TRIAL_FILE, "the trial's record")
    settings = {key: value for key, value in record["settings"].items() if key not in NOT_IN_BEST}
    header = (f"# trainkit tune: the best trial ({number}) of study {spec.study_name}, {spec.monitor} "
              f"{record.get('value')}\n# trainkit train --config {spec.folder / BEST_FILE} --out NEW_FOLDER\n")  # fmt: skip
    write_atomically(spec.folder / BEST_FILE, header + tomli_w.dumps(toml_settings(settings)))


def draw_plots(spec: TuneSpec, study: Any) -> dict[str, str]:
    """Optuna's matplotlib plots; one that cannot be drawn (too few finished trials) gets a note instead."""
    import optuna
    import optuna.visualization.matplotlib as optuna_plots

    from trainkit.tracking.plots import pyplot

    plt = pyplot()
    notes = {}
    for name, (_, function) in PLOTS.items():
        path = spec.folder / name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                axes = getattr(optuna_plots, function)(study)
            figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figure.savefig(path, dpi=100)
            plt.close(figure)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            path.unlink(missing_ok=True)
            notes[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return notes


def report_markdown(
    spec: TuneSpec, table: tuple[list[str], list[list[Any]]], best: Any, counts: dict[str, int], notes: dict[str, str]
) -> str:
    direction = "maximise" if spec.direction == "maximize" else "minimise"
    sampler = spec.sampler if isinstance(spec.sampler, str) else type(spec.sampler).__name__
    pruner = spec.pruner if isinstance(spec.pruner, str) else type(spec.pruner).__name__
    lines = [f"# Tuning study `{spec.study_name}`", "",
             f"Objective: {direction} `{spec.monitor}` over {spec.trials} trials; sampler `{sampler}` "
             f"(seed {spec.sampler_seed}), pruner `{pruner}`; storage `{spec.storage}`.", "",
             "| complete | pruned | failed | running |", "| --- | --- | --- | --- |",
             f"| {counts['complete']} | {counts['pruned']} | {counts['fail']} | {counts['running']} |", ""]  # fmt: skip
    if best is not None:
        lines += [f"Best: trial {best.number}, `{spec.monitor}` {best.value:.6g} ({describe_params(best.params)}); "
                  f"`trainkit train --config {spec.folder / BEST_FILE} --out NEW` trains it again.", ""]  # fmt: skip
    header, rows = table
    lines += ["## Trials", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
    lines += ["", "## Plots (Optuna's)", ""]
    for name, (title, _) in PLOTS.items():
        lines.append(f"{title}: not drawn ({notes[name]})" if name in notes else f"![{title}]({name})")
        lines.append("")
    return "\n".join(lines)


def write_html_report(spec: TuneSpec) -> None:
    """report.md with its plots, then the trial runs' curves and settings (trainkit.tracking.report)."""
    from trainkit.tracking.report import write_report

    folders: list[Path] = [spec.folder]
    if any((spec.folder / "trials").glob("*/config.json")):
        folders.append(spec.folder / "trials")
    write_report(folders, spec.folder / "report.html")

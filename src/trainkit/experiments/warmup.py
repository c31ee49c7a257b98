"""Warmup comparison: does a post-norm Transformer need learning-rate warmup, and a pre-norm one not?

Xiong et al. 2020 ("On Layer Normalization in the Transformer Architecture") show that with
post-norm the gradients of the last layers are large at initialisation, so a large lr without
warmup diverges or stalls, while pre-norm trains without it. Here: the text Transformer at
several peak learning rates x warmup {none, short, long} x {pre, post}-norm x seeds, the same
budget each, with per-step loss and pre-clip gradient norm traces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainkit.experiments.core import Cell, summary_table, write_csv
from trainkit.experiments.sequence import plot_traces, setup_comparison, trace_row

FULL = {"steps": 500, "lrs": (1e-3, 3e-3, 1e-2), "warmups": {"none": 0, "short": 30, "long": 150}, "seeds": (0, 1)}
QUICK = {"steps": 30, "lrs": (3e-2,), "warmups": {"none": 0, "long": 10}, "seeds": (0,)}
POSITIONS = ("pre", "post")


def warmup_cells(base: Any, plan: dict[str, Any], seeds: Sequence[int]) -> list[Cell]:
    return [
        Cell(
            key=f"{position}-lr{lr:g}-warmup{name}-seed{seed}",
            group=f"{position}-norm lr {lr:g} warmup {name} ({steps} steps)",
            config=dataclasses.replace(base, norm_position=position, lr=lr, warmup_steps=steps, seed=seed),
        )
        for position in POSITIONS
        for lr in plan["lrs"]
        for name, steps in plan["warmups"].items()
        for seed in seeds
    ]


def compare_warmup(
    out_dir: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None, data_file: str | None = None,
    **_: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run every cell (cached), then write results.csv, report.md and the trace plots."""
    setting = setup_comparison(out_dir, quick=quick, seeds=seeds, data_file=data_file, full=FULL, quick_plan=QUICK)
    out_dir, plan, seeds, base = setting.out_dir, setting.plan, setting.seeds, setting.bases["transformer"]
    results = setting.run(warmup_cells(base, plan, seeds))
    rows = [{"cell": r["group"], "norm_position": r["config"]["norm_position"], "lr": r["config"]["lr"],
             "warmup_steps": r["config"]["warmup_steps"], "seed": r["config"]["seed"],
             **trace_row(r, r["config"]["clip_norm"])} for r in results]  # fmt: skip
    write_csv(out_dir / "results.csv", rows)
    for position in POSITIONS:
        chosen = [r for r in results if r["config"]["norm_position"] == position]
        label = lambda r: f"lr {r['config']['lr']:g}, warmup {r['config']['warmup_steps']}"  # noqa: E731
        plot_traces(chosen, out_dir / f"loss_{position}.png", field="losses", ylabel=f"training loss ({position}-norm)",
                    log_scale=False, label=label)  # fmt: skip
        plot_traces(chosen, out_dir / f"grad_norm_{position}.png", field="grad_norms", log_scale=True,
                    ylabel=f"pre-clip gradient norm ({position}-norm)", label=label)  # fmt: skip
    write_report(out_dir / "report.md", base, rows, seeds, setting.unigram, plan)
    return rows


def write_report(path: Path, base: Any, rows: list[dict[str, Any]], seeds: Sequence[int], unigram: float,
                 plan: dict[str, Any]) -> None:  # fmt: skip
    table = summary_table(rows, "cell", ("val_loss", "diverged", "grad_norm_spikes", "max_grad_norm"))
    warmups = ", ".join(f"{name} = {steps}" for name, steps in plan["warmups"].items())
    text = f"""# Warmup comparison: pre-norm vs post-norm Transformer

`{base.data_file}`, {base.tokenizer} tokenizer; Transformer {base.layers} layers x {base.heads} heads x width
{base.width}, block {base.block_size}, batch {base.batch_size}, {plan['steps']} optimizer steps of AdamW (weight
decay {base.weight_decay}), linear warmup then cosine to {base.min_lr:g}, gradient clipping at norm
{base.clip_norm}, {base.precision}, seeds {list(seeds)}. Warmup steps: {warmups}.

`val_loss`: mean nats per token over the whole validation split after the budget. `diverged`: the
loss became NaN/inf, or the final validation loss is no better than the training text's unigram
entropy ({unigram:.3f} nats: a model that learned nothing from context). `grad_norm_spikes`: steps whose
pre-clip gradient norm exceeds 5x the run's median. Means ± std over seeds.

{table}

Per-step training loss (trailing mean of 25 steps), first seed:

![pre-norm loss](loss_pre.png)
![post-norm loss](loss_post.png)

Pre-clip gradient norm per step:

![pre-norm gradient norm](grad_norm_pre.png)
![post-norm gradient norm](grad_norm_post.png)

Per-run rows: `results.csv`; per-run outputs: `runs/<cell>/`.
"""
    path.write_text(text)

"""Clipping comparison: what gradient clipping does for an LSTM and a Transformer at a high lr.

Pascanu et al. 2013 ("On the difficulty of training recurrent neural networks") explain
exploding gradients in RNNs and propose rescaling the gradient when its norm exceeds a
threshold. Here: each model at a high learning rate with no clipping, norm clipping at 1 and
at 5, and clipping each gradient element (value clipping), the same budget and seeds each,
with per-step pre-clip gradient norms, the fraction of steps clipped and divergences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainkit.experiments.core import Cell, summary_table, write_csv
from trainkit.experiments.sequence import plot_traces, setup_comparison, trace_row

# name -> (clip_norm, clip_value)
CLIPPING = {"none": (None, None), "norm 1": (1.0, None), "norm 5": (5.0, None), "value 0.1": (None, 0.1)}
FULL = {"steps": 500, "seeds": (0, 1), "lr": {"lstm": 2e-2, "transformer": 1e-2}, "models": ("lstm", "transformer")}
QUICK = {"steps": 30, "seeds": (0,), "lr": {"lstm": 5e-2}, "models": ("lstm",)}  # the RNN Pascanu et al. study


def clipping_cells(bases: dict[str, Any], plan: dict[str, Any], seeds: Sequence[int]) -> list[Cell]:
    return [
        Cell(
            key=f"{model}-{name.replace(' ', '')}-seed{seed}",
            group=f"{model} lr {plan['lr'][model]:g}, clip {name}",
            config=dataclasses.replace(bases[model], lr=plan["lr"][model], clip_norm=norm, clip_value=value, seed=seed),
        )
        for model in plan["models"]
        for name, (norm, value) in CLIPPING.items()
        for seed in seeds
    ]


def compare_clipping(
    out_dir: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None, data_file: str | None = None,
    **_: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run every cell (cached), then write results.csv, report.md and the gradient-norm plots."""
    setting = setup_comparison(out_dir, quick=quick, seeds=seeds, data_file=data_file, full=FULL, quick_plan=QUICK)
    out_dir, plan, seeds, bases = setting.out_dir, setting.plan, setting.seeds, setting.bases
    results = setting.run(clipping_cells(bases, plan, seeds))
    rows = []
    for result in results:
        config = result["config"]
        clip = next(name for name, limits in CLIPPING.items() if limits == (config["clip_norm"], config["clip_value"]))
        rows.append({"cell": result["group"], "model": config["model"], "clipping": clip, "seed": config["seed"],
                     **trace_row(result, config["clip_norm"])})  # fmt: skip
    write_csv(out_dir / "results.csv", rows)
    for model in plan["models"]:
        chosen = [r for r in results if r["config"]["model"] == model]
        plot_traces(chosen, out_dir / f"grad_norm_{model}.png", field="grad_norms", log_scale=True,
                    ylabel=f"pre-clip gradient norm ({model})", label=lambda r: r["group"])  # fmt: skip
        plot_traces(chosen, out_dir / f"loss_{model}.png", field="losses", log_scale=False,
                    ylabel=f"training loss ({model})", label=lambda r: r["group"])  # fmt: skip
    write_report(out_dir / "report.md", bases, rows, seeds, setting.unigram, plan)
    return rows


def describe_model(config: Any) -> str:
    if config.model == "lstm":
        return f"{config.layers} layers x width {config.width}"
    return f"{config.layers} layers x {config.heads} heads x width {config.width}"


def write_report(path: Path, bases: dict[str, Any], rows: list[dict[str, Any]], seeds: Sequence[int], unigram: float,
                 plan: dict[str, Any]) -> None:  # fmt: skip
    table = summary_table(rows, "cell", ("val_loss", "diverged", "nonfinite", "clipped_fraction", "grad_norm_spikes",
                                         "max_grad_norm"))  # fmt: skip
    lstm = bases["lstm"]
    models = "; ".join(f"{name}: {describe_model(config)}, lr {plan['lr'][name]:g}" for name, config in bases.items())
    text = f"""# Clipping comparison: LSTM and Transformer at a high learning rate

`{lstm.data_file}`, {lstm.tokenizer} tokenizer, block {lstm.block_size}, batch {lstm.batch_size}, {plan['steps']}
optimizer steps of AdamW with the text recipe's warmup and cosine schedule, {lstm.precision}, seeds {list(seeds)}.
{models}.
Clipping: none; the total gradient norm rescaled to at most 1 or 5 (`--clip-norm`); each gradient
element clipped to [-0.1, 0.1] (`--clip-value`).

`clipped_fraction`: steps whose pre-clip norm exceeded the norm threshold. `nonfinite`: runs whose
loss became NaN/inf. `diverged`: nonfinite, or a final validation loss no better than the unigram
entropy of the training text ({unigram:.3f} nats). `grad_norm_spikes`: steps above 5x the run's median
pre-clip norm. Means ± std over seeds.

{table}

{{plots}}

Per-run rows: `results.csv`; per-run outputs: `runs/<cell>/`.
"""
    path.write_text(text.replace("{plots}", "\n".join(f"![{m} gradient norm](grad_norm_{m}.png)\n![{m} loss](loss_{m}.png)"
                                                      for m in bases)))

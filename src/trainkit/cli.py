"""The ``trainkit`` command line (also ``python -m trainkit``).

Every flag of ``trainkit train`` maps to a ``TrainConfig`` field. Precedence: defaults,
then ``--config FILE`` (TOML/YAML/JSON), then the flags given. Any user mistake exits
with status 2 and one line naming the problem; a traceback means a trainkit bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from trainkit import __version__
from trainkit.choices import DATASET_NAMES, NORM_POSITIONS, TOKENIZERS, TTA_MODES
from trainkit.config.files import load_config_file, recipe_config
from trainkit.config.names import (
    MAX_SEED, MODES, TASK_NAMES, NONFINITE_POLICIES, OPTIMIZERS, PRECISIONS, SAVE_ERROR_POLICIES, SCHEDULES,
)  # fmt: skip
from trainkit.config.schema import TrainConfig
from trainkit.config.sections import SECTION_OF, SECTIONS, flat_settings
from trainkit.distributed import STRATEGIES, env_rank
from trainkit.errors import CheckpointError, TrainkitError
from trainkit.exits import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_UNVERIFIED, EXIT_USAGE, exit_status  # noqa: F401 (the codes, read from here too)
from trainkit.checkpoint.export import EXPORT_FORMATS
from trainkit.recipes.factories import parse_key_values
from trainkit.tracking.loggers import LOGGERS
from trainkit.tasks.metrics import BUILTIN_METRICS
from trainkit.optim.optimizers import LR_SCALINGS
from trainkit.checkpoint.signals import graceful_stop
from trainkit.tune.names import PRUNERS, SAMPLERS

if TYPE_CHECKING:
    from trainkit.recipes.from_checkpoint import Factories

TEXT_COMPARISONS = ("warmup", "clipping", "transformer_init", "sequence_norm")  # train on --data-file
COMPARISONS = ("schedules", "init", "norm", "regularization", *TEXT_COMPARISONS)  # modules of trainkit.experiments
TRUST_HELP = ("import the MODULE:FUNCTION factories named inside the checkpoint or run folder: they are code, and "
              "never run unless you name them yourself or pass this (docs/reliability.md, 'What is safe to load')")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are a single line instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def optional_positive(text: str) -> float | None:
    """'0' or 'none' turns a clipping threshold off."""
    if text.lower() in ("0", "none", "off"):
        return None
    return float(text)


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def seed_list(text: str) -> list[int]:
    """Comma-separated seeds: at least one, each in NumPy's range."""
    seeds = int_list(text)
    if not seeds or any(not 0 <= seed <= MAX_SEED for seed in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds in 0..{MAX_SEED}, comma separated, got {text!r}")
    return seeds


def name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


def batch_size(text: str) -> int | str:
    """An integer, or 'auto' to find the largest batch that fits (trainkit.loop.memory)."""
    return "auto" if text == "auto" else int(text)


def learning_rate(text: str) -> float | str:
    """A number, or 'auto' to run the LR finder first."""
    return "auto" if text == "auto" else float(text)


def add_train_flags(parser: argparse.ArgumentParser, *, resumable: bool = True) -> None:
    """Flags default to SUPPRESS so only those the user typed override the config file.
    ``resumable``: --resume/--force-resume too (not for `trainkit tune`, which always continues)."""
    add = parser.add_argument
    add("--config", help="TOML/YAML/JSON file of settings; flags override it")
    if resumable:
        add("--resume", action="store_true", help="continue the run in --out from its newest valid checkpoint")
        add("--force-resume", action="store_true", help="resume even if settings or data differ from the checkpoint's")
        add("--trust-factories", action="store_true", help=TRUST_HELP)
    # one group per TrainConfig section (trainkit.config.sections), in its order
    groups = {section: parser.add_argument_group(f"{section} settings") for section in SECTIONS}
    groups["data"].description = "defaults: the production MNIST recipe; in a config file each group may be a table: [optim] lr = 3e-4"

    def flag(name: str, **kw: Any) -> None:
        dest = kw.get("dest", name.removeprefix("--").replace("-", "_"))
        groups[SECTION_OF[dest]].add_argument(name, default=argparse.SUPPRESS, **kw)

    flag("--dataset", help="mnist, fashion-mnist, synthetic, text (with --data-file), or MODULE:FUNCTION returning "
                            "(train, val[, test]) datasets (default mnist)")
    groups["data"].add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword argument of a MODULE:FUNCTION dataset (repeatable; config file: dataset_args)")
    flag("--num-workers", type=int, help="DataLoader worker processes for Dataset inputs (default 0)")
    flag("--data-dir", help="folder with the IDX files (default: $TRAINKIT_DATA_DIR, then the cache, then download)")
    flag("--val-size", type=int, help="training images held out for validation (default 5000)")
    flag("--train-size", type=int, help="train on only the first N training images (default: all)")
    flag("--augment", dest="augment_shift", type=int, help="random shifts of up to N pixels (default: 0 MLP, 2 CNN)")
    flag("--model", help="mlp, residual_mlp, cnn; transformer, lstm (text); or MODULE:FUNCTION returning an "
                          "nn.Module (default mlp; transformer for --dataset text)")
    groups["network"].add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword argument of a MODULE:FUNCTION model (repeatable; config file: model_args)")
    flag("--task", choices=TASK_NAMES, help="what the batches mean and what is measured (default classification)")
    flag("--metrics", type=name_list, help="built-in metrics, comma separated: " + ", ".join(BUILTIN_METRICS)
         + " (default: the task's own)")
    flag("--loss", help="a torch.nn loss class instead of the task's, e.g. HuberLoss, L1Loss")
    flag("--data-file", help="--dataset text: any UTF-8 text file")
    flag("--tokenizer", choices=TOKENIZERS, help="--dataset text: char, byte or bpe (trained on the training split) "
                                                  "(default char)")
    flag("--vocab-size", type=int, help="--tokenizer bpe: vocabulary size (default 1024)")
    flag("--val-fraction", type=float, help="--dataset text: the end of the text held out for validation (default 0.1)")
    flag("--block-size", type=int, help="--dataset text: tokens per window, the Transformer's context (default 64)")
    flag("--layers", type=int, help="transformer/lstm: layers (default 4 transformer, 2 lstm)")
    flag("--heads", type=int, help="transformer: attention heads (default 4)")
    flag("--width", type=int, help="transformer/lstm: embedding and hidden width (default 128 transformer, 256 lstm)")
    flag("--norm-position", choices=NORM_POSITIONS, help="transformer: pre (GPT-2) or post norm (default pre)")
    flag("--attention-dropout", type=float, help="transformer: dropout on attention weights (default: --dropout)")
    flag("--tie-weights", action=argparse.BooleanOptionalAction,
         help="language models: the head shares the token embedding (default on)")
    flag("--hidden", type=int_list, help="MLP hidden widths, comma separated (default 256,128)")
    flag("--channels", type=int_list, help="cnn: output channels of each conv stage, comma separated (default 32,64,128)")
    flag("--norm", help="batch, layer, group or none; rms too for transformer/lstm (default batch; text: layer)")
    flag("--dropout", type=float, help="dropout rate (default 0.3)")
    flag("--drop-path", type=float, help="residual_mlp: stochastic depth rate of the last block (default 0)")
    flag("--activation", help="relu, gelu, silu, tanh, ... (default relu)")
    flag("--init", help="he, xavier, lecun, orthogonal, gpt, auto, default, ... (default he)")
    flag("--optimizer", choices=OPTIMIZERS, help="(default adamw)")
    flag("--fused-optimizer", action=argparse.BooleanOptionalAction,
         help="AdamW's fused kernel instead of foreach (default off; on for --dataset text)")
    flag("--lr", type=learning_rate, help="peak learning rate, or auto: run the LR finder first (default 1e-3)")
    flag("--weight-decay", type=float, help="decoupled weight decay on weights only (default 0.01)")
    flag("--momentum", type=float, help="SGD momentum (default 0.9)")
    flag("--batch-size", type=batch_size, help="micro-batch size, or auto: the largest that fits (default 128)")
    flag("--memory-budget", type=float, help="GiB a CPU step may use for --batch-size auto (default: half of free RAM)")
    flag("--epochs", type=int, help="maximum epochs; early stopping may end sooner (default: 20 MLP, 12 CNN, 10 others)")
    flag("--max-steps", type=int, help="optimizer steps to train; when given it is the budget (default: epochs)")
    flag("--val-every-steps", type=int, help="also validate every N optimizer steps; 0 = epoch ends only (default 0)")
    flag("--schedule", choices=SCHEDULES, help="(default warmup_cosine)")
    flag("--warmup", type=float, help="epochs of linear warmup before the schedule (default 1 for warmup_cosine, else 0)")
    flag("--warmup-steps", type=int, help="linear warmup in optimizer steps instead of --warmup (text default 75)")
    flag("--min-lr", type=float, help="lr floor of cosine/linear/cosine_restarts/onecycle/plateau (default 0)")
    flag("--step-epochs", type=float, help="step: epochs between decays (default a third of the run)")
    flag("--gamma", type=float, help="step/multistep decay factor (default 0.1)")
    flag("--milestones", type=float_list, help="multistep: epochs at which to decay, comma separated")
    flag("--pct-start", type=float, help="onecycle: fraction of the run spent rising (default 0.3)")
    flag("--anneal", choices=("cos", "linear"), help="onecycle: annealing shape (default cos)")
    flag("--restart-epochs", type=float, help="cosine_restarts: first cycle in epochs (default a quarter of the run)")
    flag("--restart-mult", type=int, help="cosine_restarts: cycle length multiplier (default 1)")
    flag("--plateau-patience", type=int, help="plateau: epochs without improvement before lowering (default 2)")
    flag("--plateau-factor", type=float, help="plateau: lr multiplier (default 0.1)")
    flag("--clip-norm", type=optional_positive, help="clip the gradient norm; 0 = off (default 1.0)")
    flag("--clip-value", type=optional_positive, help="clip each gradient element; 0 = off (default off)")
    flag("--accumulate", type=int, help="micro-batches per optimizer step (default 1)")
    flag("--lr-scaling", choices=tuple(LR_SCALINGS),
         help="scale --lr with the effective batch (batch x accumulate) against --lr-reference-batch (default off)")
    flag("--lr-reference-batch", type=int, help="the effective batch --lr was chosen for (default 128)")
    flag("--ema", type=float, help="average the weights: EMA with this decay every step, e.g. 0.999 (default off)")
    flag("--swa-start", type=int, help="stochastic weight averaging of each epoch's end from this epoch (default off)")
    flag("--swa-lr", type=float, help="SWA: the lr from --swa-start on, annealed to over one epoch (default: the schedule's)")
    flag("--eval-average", action=argparse.BooleanOptionalAction,
         help="validation, best.pt, the test and exports use the EMA/SWA average (default on)")
    flag("--label-smoothing", type=float, help="cross-entropy label smoothing, e.g. 0.1 (default 0)")
    flag("--tta", choices=TTA_MODES, help="also report the test with test-time augmentation: shifts (default off)")
    flag("--precision", choices=PRECISIONS, help="fp32, bf16 (CPU/CUDA) or fp16 (CUDA) (default fp32)")
    flag("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC conv layout (default: on for cnn)")
    flag("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default off)")
    flag("--threads", type=int, help="torch intra-op threads (default: one per core)")
    flag("--deterministic", action=argparse.BooleanOptionalAction,
         help="CUDA: deterministic kernels, so the same seed gives the same weights (default on; docs/reliability.md)")
    flag("--tf32", action=argparse.BooleanOptionalAction,
         help="CUDA: fp32 matmuls and convolutions in TF32, faster on Ampere and later but rounded (default off)")
    flag("--sync-batchnorm", action=argparse.BooleanOptionalAction,
         help="under ddp/fsdp: BatchNorm normalises with the global batch's statistics, not each rank's (default off)")
    flag("--fsdp-offload", action=argparse.BooleanOptionalAction,
         help="fsdp on CUDA: keep parameter shards and optimizer state in CPU memory (default off)")
    flag("--fsdp-units", type=name_list,
         help="fsdp: submodules sharded one by one, comma separated (default: the children of the model's containers)")
    flag("--grad-checkpointing", action=argparse.BooleanOptionalAction,
         help="recompute activations in backward: less memory for ~1 extra forward (default off)")
    flag("--patience", type=int, help="early-stopping patience in epochs; 0 = off (default 5)")
    flag("--min-delta", type=float, help="smallest change that counts as improvement (default 0)")
    flag("--monitor", help="history metric for early stopping and best checkpoint (default val_loss)")
    flag("--monitor-mode", choices=MODES, help="auto: from the metric's name, loss down, accuracy up (default auto)")
    flag("--keep-checkpoints", type=int, help="newest checkpoint files to keep (default 3)")
    flag("--keep-every-epochs", type=int, help="also keep every K-th epoch's checkpoint; 0 = off (default 0)")
    flag("--checkpoint-every-steps", type=int, help="mid-epoch checkpoint every N optimizer steps; 0 = off")
    flag("--on-save-error", choices=SAVE_ERROR_POLICIES, help="after a failed save: continue (default) or stop")
    flag("--on-nonfinite", choices=NONFINITE_POLICIES, help="NaN/inf loss: raise (default), skip or rollback")
    flag("--rollback-lr-factor", type=float, help="lr multiplier after each rollback (default 0.5)")
    flag("--max-rollbacks", type=int, help="give up after this many rollbacks (default 3)")
    flag("--max-skipped-steps", type=int,
         help="skip: stop (exit 3) when more steps than this were skipped (default 10%% of an epoch's steps)")
    flag("--seed", type=int, help="(default 0)")
    flag("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    flag("--strategy", choices=STRATEGIES,
         help="single, ddp (data parallel), fsdp (sharded data parallel; both launched with torchrun "
              "--nproc_per_node N) or auto: ddp under torchrun")
    flag("--out", help="output directory (default runs/<dataset>-<model>-<time>)")
    flag("--plots", action=argparse.BooleanOptionalAction, help="write loss/metric/lr PNGs at the end (default on)")
    flag("--logger", type=name_list, help=f"where to log, comma separated: {', '.join(LOGGERS)} (default csv, always on)")
    flag("--log-every-steps", type=int, help="loggers: per-step loss, lr, gradient norm, clip rate every N steps (default 50)")
    flag("--mlflow-uri", help="mlflow tracking URI (default sqlite:///<the --out folder's parent>/mlflow.db)")
    flag("--mlflow-experiment", help="mlflow experiment name (default trainkit)")


def add_factory_flags(parser: argparse.ArgumentParser) -> None:
    """For a command that rebuilds a model from a checkpoint: the factories the user names themselves."""
    parser.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                        help="your model factory, for a checkpoint of a run that used one")
    parser.add_argument("--dataset", default=None, metavar="MODULE:FUNCTION",
                        help="your dataset factory, for a checkpoint of a run that used one")
    parser.add_argument("--trust-factories", action="store_true", help=TRUST_HELP)


def factories_of(args: argparse.Namespace) -> Factories:
    """What the user named (or trusts) for a command that rebuilds a model from a checkpoint."""
    from trainkit.recipes.from_checkpoint import Factories

    return Factories(model=args.model, dataset=args.dataset, trust=args.trust_factories)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="trainkit", description="Train deep networks reliably and fast on PyTorch.")
    parser.add_argument("--version", action="version", version=f"trainkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_train_flags(commands.add_parser("train", help="train a model (default: the MNIST MLP recipe)"))
    evaluate = commands.add_parser("evaluate", help="test accuracy of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data-dir", default=None)
    evaluate.add_argument("--device", default="auto")
    add_factory_flags(evaluate)
    sample = commands.add_parser("generate", help="sample text from a language model's checkpoint or run folder")
    sample.add_argument("checkpoint", help="a checkpoint (.pt) of a --dataset text run, or its run folder")
    sample.add_argument("--prompt", default="\n", help="text to continue (default a newline)")
    sample.add_argument("--tokens", type=int, default=200, help="tokens to sample (default 200)")
    sample.add_argument("--temperature", type=float, default=1.0, help="below 1: safer, above 1: wilder (default 1)")
    sample.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only (default all)")
    sample.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default 0)")
    sample.add_argument("--device", default="auto")
    add_factory_flags(sample)
    exporter = commands.add_parser("export", help="a checkpoint's model as safetensors, torch.export or ONNX, verified")
    exporter.add_argument("checkpoint")
    exporter.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors",
                          help="safetensors (weights), torch-export (.pt2 program) or onnx (default safetensors)")
    exporter.add_argument("--out", default=None, help="the file to write (default: the checkpoint's path, new suffix)")
    exporter.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never a run's own file)")
    exporter.add_argument("--data-dir", default=None, help="where the run's data is, if it moved (its rows verify the export)")
    add_factory_flags(exporter)
    inspect = commands.add_parser("inspect", help="verify a checkpoint and show what it holds")
    inspect.add_argument("checkpoint")
    profiler = commands.add_parser("profile", help="profile training steps: time per phase, top operators, trace")
    add_train_flags(profiler)
    profiler.add_argument("--steps", type=int, default=20, help="optimizer steps to profile (default 20)")
    profiler.add_argument("--skip-steps", type=int, default=5, help="steps run before profiling starts (default 5)")
    doctor = commands.add_parser("doctor", help="examine the job `trainkit train` would run: what would keep it "
                                 "from training, with the evidence and the fix; exit 1 when something was found")
    add_train_flags(doctor, resumable=False)
    finder = commands.add_parser("lr-find", help="LR range test: loss vs lr, suggestions, lr_find.json/.png")
    add_train_flags(finder)
    finder.add_argument("--start-lr", type=float, default=1e-7)
    finder.add_argument("--end-lr", type=float, default=10.0)
    finder.add_argument("--num-iter", type=int, default=100)
    schedules = commands.add_parser("schedules", help="plot learning-rate schedules over a run")
    schedules.add_argument("--plot", required=True, help="output PNG")
    schedules.add_argument("--schedules", default="constant,step,cosine,warmup_cosine,onecycle,cosine_restarts",
                           help="comma separated names: " + ", ".join(SCHEDULES))  # fmt: skip
    schedules.add_argument("--lr", type=float, default=1e-3)
    schedules.add_argument("--steps", type=int, default=1000, help="optimizer steps in the run")
    schedules.add_argument("--warmup-steps", type=int, default=100, help="warmup of warmup_cosine")
    compare = commands.add_parser("compare", help="run a comparison experiment: table + plots")
    compare.add_argument("experiment", choices=COMPARISONS)
    compare.add_argument("--out", required=True)
    compare.add_argument("--quick", action="store_true", help="tiny budget on synthetic data (seconds)")
    compare.add_argument("--seeds", type=seed_list, default=None, help="default: each comparison's own")
    compare.add_argument("--dataset", default="mnist", choices=DATASET_NAMES)
    compare.add_argument("--data-dir", default=None)
    compare.add_argument("--data-file", default=None,
                         help=f"{', '.join(TEXT_COMPARISONS)}: the text (default $TRAINKIT_DATA_DIR/text/kjv.txt)")
    tuner = commands.add_parser("tune", help="hyper-parameter search on Optuna; trials are trainkit runs, resumable")
    tuner.add_argument("--space", required=True, help="TOML/YAML/JSON file: one table per setting, low/high or choices")
    tuner.add_argument("--trials", type=int, required=True, help="trials the study ends with (finished, pruned or failed)")
    tuner.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna's sampler (default tpe)")
    tuner.add_argument("--pruner", choices=PRUNERS, default="median",
                       help="stops unpromising trials at a validation (default median)")
    tuner.add_argument("--sampler-seed", type=int, default=0, help="the sampler's seed (default 0)")
    tuner.add_argument("--storage", help="an Optuna storage URL (default sqlite:///<--out>/study.db)")
    tuner.add_argument("--study-name", help="the study's name in the storage (default: --out's folder name)")
    tuner.add_argument("--workers", type=int, default=1,
                       help="trial processes on the study, the cores shared between them (default 1)")
    add_train_flags(tuner, resumable=False)  # the base settings of every trial; --out is the study folder
    runs = commands.add_parser("runs", help="the runs under a folder: status, best and test metric, what differs")
    runs.add_argument("folder", nargs="?", default="runs", help="where to look (default runs/)")
    report = commands.add_parser("report", help="one self-contained HTML page of runs and comparisons")
    report.add_argument("folders", nargs="+", help="run folders, folders of runs, or `trainkit compare` folders")
    report.add_argument("--out", required=True, help="the HTML file to write, e.g. report.html")
    report.add_argument("--overwrite", action="store_true",
                        help="replace --out even when it is not an earlier trainkit report (never a run's own file)")
    return parser


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """The config file's settings overridden by the flags typed; also returns those flags."""
    file_values, flags = given_settings(args)
    config = recipe_config({**file_values, **flags}, source=args.config or "flags")
    return config, flags


def given_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config file's settings and the setting flags typed (which win over the file)."""
    settings = {field.name for field in dataclasses.fields(TrainConfig)}
    flags = {key: value for key, value in vars(args).items() if key in settings}
    file_values = flat_settings(load_config_file(args.config), args.config) if args.config else {}
    for name in ("model", "dataset"):  # --model-arg k=v entries override the config file's table
        pairs = getattr(args, f"{name}_arg", [])
        if pairs:
            table = file_values.get(f"{name}_args", {})
            flags[f"{name}_args"] = {**(table if isinstance(table, dict) else {}), **parse_key_values(pairs, f"--{name}-arg")}
    return file_values, flags


def run_tune(args: argparse.Namespace) -> int:
    from trainkit.tune import tune

    file_values, flags = given_settings(args)
    base = {**file_values, **flags}
    out = base.pop("out", None)
    if out is None:
        raise TrainkitError("trainkit tune needs --out DIR: the study, its trials and results live there")
    outcome = tune(base, args.space, trials=args.trials, out=out, sampler=args.sampler, pruner=args.pruner,
                   storage=args.storage, study_name=args.study_name, workers=args.workers,
                   sampler_seed=args.sampler_seed)  # fmt: skip
    print(json.dumps(outcome, indent=2))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from trainkit.recipes.factories import require_named_factories
    from trainkit.recipes.resume import resume_config
    from trainkit.recipes.run import train_run

    with graceful_stop() as guard:  # from the first moment: a SIGTERM in start-up is a clean stop too
        guard.resumable = args.resume
        config, flags = train_config_from_args(args)
        if args.resume:
            if config.out is None:
                raise TrainkitError("--resume needs --out DIR naming the run to continue")
            named = config.to_dict()  # what this command names itself: its flags and --config file
            config = resume_config(Path(config.out), flags, force=args.force_resume, given=config)
            require_named_factories(config.to_dict(), named, trust=args.trust_factories,
                                    source=str(Path(config.out) / "config.json"))
        summary = train_run(config, resume=args.resume, force_resume=args.force_resume)
    if env_rank() == 0:  # under torchrun every rank returns the same summary; print it once
        print(json.dumps(summary, indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from trainkit.recipes.from_checkpoint import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device, factories=factories_of(args))
    measured = ", ".join(f"{key.removeprefix('test_')} {value:.4f}" for key, value in result.items()
                         if key.startswith("test_") and key != "test_samples")  # fmt: skip
    print(f"{result['checkpoint']} (epoch {result['epoch']}): {result['split']} {measured} on {result['test_samples']} samples")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from trainkit.recipes.from_checkpoint import generate_from_checkpoint

    print(generate_from_checkpoint(args.checkpoint, prompt=args.prompt, tokens=args.tokens,
                                   temperature=args.temperature, top_k=args.top_k, seed=args.seed, device=args.device,
                                   factories=factories_of(args)))  # fmt: skip
    return 0


def run_export(args: argparse.Namespace) -> int:
    from trainkit.recipes.from_checkpoint import export_checkpoint

    result = export_checkpoint(args.checkpoint, format=args.format, out=args.out, data_dir=args.data_dir,
                               factories=factories_of(args), overwrite=args.overwrite)
    print(f"wrote {result['path']} ({result['format']}; verified on {result['verified_on_rows']} validation rows, "
          f"largest output difference {result['max_abs_difference']:.3g})")  # fmt: skip
    return 0


def run_lr_find(args: argparse.Namespace) -> int:
    from trainkit.recipes.run import lr_find_run

    config, _ = train_config_from_args(args)
    result = lr_find_run(config, start_lr=args.start_lr, end_lr=args.end_lr, num_iter=args.num_iter)
    print(json.dumps(result, indent=2))
    return 0


def run_schedules(args: argparse.Namespace) -> int:
    from trainkit.optim.schedules import ScheduleSpec, plot_schedules

    names = [name for name in args.schedules.split(",") if name]
    specs = [ScheduleSpec(name, warmup_steps=args.warmup_steps if name == "warmup_cosine" else 0) for name in names]
    path = plot_schedules(specs, args.plot, lr=args.lr, total_steps=args.steps)
    print(f"wrote {path}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    import importlib

    from trainkit.checkpoint.rundir import make_folder

    make_folder(Path(args.out))
    module = importlib.import_module(f"trainkit.experiments.{args.experiment}")
    compare = getattr(module, f"compare_{args.experiment}")
    seeds = {"seeds": args.seeds} if args.seeds is not None else {}
    text = {"data_file": args.data_file} if args.experiment in TEXT_COMPARISONS else {}
    compare(args.out, quick=args.quick, dataset=args.dataset, data_dir=args.data_dir, **seeds, **text)
    from trainkit.tracking.report import write_report

    write_report([Path(args.out)], Path(args.out) / "report.html")
    print(f"wrote {Path(args.out) / 'report.md'} and report.html")
    return 0


def run_runs(args: argparse.Namespace) -> int:
    from trainkit.tracking.runs import runs_table

    print(runs_table(Path(args.folder)))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from trainkit.tracking.report import write_report

    path = write_report([Path(folder) for folder in args.folders], Path(args.out), overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0



def run_profile(args: argparse.Namespace) -> int:
    from trainkit.profiling import profile_training

    config, _ = train_config_from_args(args)
    result, out_dir = profile_training(config, steps=args.steps, warmup_steps=args.skip_steps)
    print(result.operators)
    print(result.split_table())
    print(f"wrote {out_dir / 'profile.txt'} and {out_dir / 'trace.json'} (open in https://ui.perfetto.dev)")
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    """Exit 0: nothing of severity warning or error; 1: something was (as linters do); 2: a usage error."""
    from trainkit.recipes.checkup import examine_job, write_report

    config, _ = train_config_from_args(args)
    report, about = examine_job(config)
    print(report.format())
    if config.out:
        print(f"wrote {write_report(report, about, Path(config.out))}")
    return 1 if report.problems() else 0


def run_inspect(args: argparse.Namespace) -> int:
    from trainkit.checkpoint.file import require_checkpoint_file
    from trainkit.checkpoint.store import load_checkpoint, verify_checkpoint
    from trainkit.recipes.factories import describe_factories, untrusted_factories
    from trainkit.recipes.resume import saved_settings
    from trainkit.checkpoint.sharded import is_sharded_checkpoint

    sharded = is_sharded_checkpoint(Path(args.checkpoint))
    if not sharded:
        require_checkpoint_file(Path(args.checkpoint))  # a missing file, folder or FIFO: a usage error (exit 2)
    problem = verify_checkpoint(args.checkpoint)
    if problem is not None:
        print(f"{args.checkpoint}: FAILS verification: {problem}")
        return EXIT_UNVERIFIED
    try:
        payload = load_checkpoint(args.checkpoint, weights=False)  # a sharded one's shards stay on disk
    except CheckpointError as exc:
        print(f"{args.checkpoint}: sha256 ok, but unusable: {exc}")
        return EXIT_UNVERIFIED
    position = payload["position"]
    where = "end of epoch" if position is None else f"mid-epoch, {position.get('batches_done')} batches into epoch"
    last = payload["history"][-1] if payload["history"] else {}
    shards = f", sharded by {payload['run_info'].get('world_size', 1)} process(es)" if sharded else ""
    print(f"{args.checkpoint}: verifies (sha256 ok{' for every file' if sharded else ''}){shards}")
    print(f"  epoch {payload['epoch']} ({where}), optimizer step {payload['global_step']}")
    print(f"  best {payload['config'].get('monitor')} {payload['best_metric']} at epoch {payload['best_epoch']}")
    print(f"  last epoch metrics: {json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()})}")
    print(f"  rollbacks {payload['rollbacks']}, versions {payload.get('versions')}")
    print(f"  config: {json.dumps(saved_settings(payload), default=str)}")
    factories = untrusted_factories(saved_settings(payload), {})
    if factories:
        print(f"  {describe_factories(factories)}: not run by evaluate/export/generate unless you name it "
              f"(--model/--dataset) or pass --trust-factories")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # under torchrun only rank 0 logs progress; the other ranks report errors only
    level = logging.INFO if env_rank() == 0 else logging.ERROR
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    handlers = {
        "train": run_train,
        "evaluate": run_evaluate,
        "inspect": run_inspect,
        "generate": run_generate,
        "export": run_export,
        "lr-find": run_lr_find,
        "schedules": run_schedules,
        "compare": run_compare,
        "profile": run_profile,
        "doctor": run_doctor,
        "runs": run_runs,
        "report": run_report,
        "tune": run_tune,
    }
    prog = f"trainkit {args.command}" + (f" (rank {env_rank()})" if env_rank() else "")
    return exit_status(prog, lambda: handlers[args.command](args))

"""Data-parallel training (--strategy ddp): sharding units, and real 2-process gloo runs on CPU.

The multi-process tests launch ``python -m torch.distributed.run --nproc_per_node 2`` (what
``torchrun`` is) on the synthetic dataset. Runs are kept to a few seconds: 999 training
images (15 global batches of 64 plus a short one of 39, split 20/19 between the ranks, which
exercises the loss weighting) and 2 epochs.

Weights are compared via the saved ``model.safetensors``. DDP vs one process: the same
global batches in the same order, but the gradient is averaged over ranks instead of computed
in one backward, so float rounding differs: asserted within ``DDP_VS_SINGLE_ATOL`` (measured
max |diff| about 5e-8). That comparison uses ``--norm none --dropout 0``: BatchNorm normalises
with per-rank batch statistics and dropout masks differ per rank, so with them the runs are
different (by design) computations. Killed-and-resumed DDP vs uninterrupted DDP: exact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainkit.checkpoint.store import CHECKPOINT_NAME, load_checkpoint, verify_checkpoint
from trainkit.checkpoint.signals import EXIT_INTERRUPTED
from trainkit.cli import main
from trainkit.exits import EXIT_USAGE
from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit.distributed import resolve_strategy
from trainkit.errors import ConfigError
from trainkit.recipes.run import check_ddp_settings

RUN = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "64", "--device", "cpu",
       "--train-size", "999", "--val-size", "200", "--patience", "0"]  # fmt: skip
EXACT = ["--norm", "none", "--dropout", "0"]  # per-rank BatchNorm statistics / dropout masks differ
RESUMABLE = ["--augment", "1", "--checkpoint-every-steps", "10"]  # default norm=batch, dropout=0.3
STEPS = 2 * 16  # 2 epochs x (15 full global batches + 1 short one)
DDP_VS_SINGLE_ATOL = 1e-6
# SGD, not AdamW: the bias of a Linear before BatchNorm has a zero gradient up to rounding, which
# Adam's normalised step turns into lr-sized random moves (measured 8e-4 apart after 32 steps).
SGD_BN = ["--dropout", "0", "--optimizer", "sgd", "--lr", "0.05"]
SYNC_BN_ATOL = 1e-5
# A resume on another world size continues the run with other dropout/augmentation streams (and, with
# BatchNorm, other batch statistics): epoch 2's metrics within this of the uninterrupted run's.
WORLD_CHANGE_RTOL = 0.1  # global statistics from all-reduced sums (E[x^2] - mean^2) vs one process's batch_norm
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(out: Path, *extra: str, kill_at: str | None = None, signal_name: str = "KILL", strategy: str = "ddp",
             processes: int = 2, kill_rank: int = 1):  # fmt: skip
    """`torchrun --nproc_per_node 2 -m trainkit train ... --strategy ddp` with one thread per rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINKIT_KILL") and k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", TRAINKIT_OFFLINE="1")
    if kill_at:  # only rank ``kill_rank`` dies; torchrun then tears down the other
        env.update(TRAINKIT_KILL_AT=kill_at, TRAINKIT_KILL_SIGNAL=signal_name, TRAINKIT_KILL_RANK=str(kill_rank))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master-port", str(free_port()), "-m", "trainkit", "train", *RUN,
               "--strategy", strategy, "--out", str(out), *extra]  # fmt: skip
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=120)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def history_rows(out: Path) -> list[dict[str, float]]:
    lines = (out / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, map(float, line.split(",")))) for line in lines[1:]]


def without_timing(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "samples_per_second")} for row in rows]


def files_in(out: Path) -> list[str]:
    return sorted(str(path.relative_to(out)) for path in out.rglob("*"))


# --------------------------------------------------------------- sharding (no processes)
def ids_loader(n: int, batch: int, *, rank: int = 0, world: int = 1, **options) -> DeviceBatches:
    """x holds each sample's index, so batches show which samples a rank got."""
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return DeviceBatches(x, x.squeeze(1).long(), batch, seed=3, rank=rank, world_size=world, **options)


def sample_ids(loader: DeviceBatches, epoch: int, start_batch: int = 0) -> list[list[int]]:
    return [y.tolist() for _, y in loader.epoch(epoch, start_batch)]


@pytest.mark.parametrize("n,batch,world", [(1000, 64, 2), (999, 64, 2), (1000, 96, 3), (1003, 64, 4), (256, 64, 4)])
def test_ranks_split_every_global_batch_of_the_single_process_order(n, batch, world):
    single = ids_loader(n, batch)
    ranks = [ids_loader(n, batch, rank=r, world=world) for r in range(world)]
    for epoch in (1, 2):
        reference = sample_ids(single, epoch)  # the (seed, epoch) permutation, cut into global batches
        per_rank = [sample_ids(loader, epoch) for loader in ranks]
        assert all(len(batches) == len(reference) == len(loader) for batches, loader in zip(per_rank, ranks))
        for b, global_batch in enumerate(reference):
            slices = [per_rank[r][b] for r in range(world)]
            assert [i for part in slices for i in part] == global_batch  # same permutation, contiguous slices
            sizes = [len(part) for part in slices]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            if len(global_batch) == batch:
                assert sizes == [batch // world] * world  # full batches: exactly B / W each
        seen = [i for batches in per_rank for part in batches for i in part]
        assert len(seen) == len(set(seen)) == n  # disjoint, and together they cover the epoch
    assert sample_ids(ranks[0], 1) != sample_ids(ranks[0], 2)  # a new permutation each epoch


def test_resuming_mid_epoch_on_a_rank_yields_the_remaining_slices():
    loader = ids_loader(999, 64, rank=1, world=2)
    assert sample_ids(loader, 2, start_batch=5) == sample_ids(loader, 2)[5:]


def test_a_last_global_batch_smaller_than_the_world_is_dropped_in_training_and_kept_in_evaluation():
    # 129 = 2 x 64 + 1: the last global batch has 1 sample for 2 ranks
    train = [ids_loader(129, 64, rank=r, world=2) for r in range(2)]
    assert [len(loader) for loader in train] == [2, 2]  # lockstep: every rank takes every DDP step
    assert sum(len(part) for r in range(2) for part in sample_ids(train[r], 1)) == 128
    evaluation = [ids_loader(129, 64, rank=r, world=2, shuffle=False, lockstep=False) for r in range(2)]
    kept = sorted(i for r in range(2) for part in sample_ids(evaluation[r], 0) for i in part)
    assert kept == list(range(129))
    assert [len(sample_ids(loader, 0)) for loader in evaluation] == [3, 2]  # rank 1's slice is empty


def test_global_samples_counts_the_samples_of_global_batches():
    loader = ids_loader(999, 64, rank=1, world=2)
    assert loader.global_samples(0, 1) == 64
    assert loader.global_samples(14, 2) == 64 + 39
    assert loader.global_samples(15, 1) == 39
    assert sum(loader.global_samples(b, 1) for b in range(len(loader))) == 999


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ConfigError, match="rank must be in 0..1"):
        ids_loader(10, 4, rank=2, world=2)


# ------------------------------------------------------------ settings (no processes)
def test_strategy_resolution(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_strategy("auto") == "single"
    assert resolve_strategy("single") == "single"
    with pytest.raises(ConfigError, match=r"launch with `torchrun --nproc_per_node N -m trainkit train"):
        resolve_strategy("ddp")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert resolve_strategy("auto") == "ddp"
    assert resolve_strategy("ddp") == "ddp"


def test_ddp_without_torchrun_is_a_one_line_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["train", "--dataset", "synthetic", "--strategy", "ddp", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and "\n" not in err
    assert "torchrun --nproc_per_node N -m trainkit train" in err
    assert not (tmp_path / "run").exists()


def test_the_global_batch_must_be_divisible_by_the_world_size():
    check_ddp_settings(TrainConfig(batch_size=96).resolved(), 3)  # fine
    with pytest.raises(ConfigError, match="--batch-size 100 is the global batch and must be divisible by the 3"):
        check_ddp_settings(TrainConfig(batch_size=100).resolved(), 3)


# --------------------------------------------------------- real 2-process runs (gloo, CPU)
@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *RUN, *EXACT, "--strategy", "single", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(out, *EXACT)
    assert result.returncode == 0, result.stderr
    return out


def test_ddp_final_weights_match_a_single_process_run_with_the_same_global_batch(single_run, ddp_run):
    difference = max_abs_difference(weights(single_run), weights(ddp_run))
    assert difference < DDP_VS_SINGLE_ATOL, difference
    single, ddp = (json.loads((out / "summary.json").read_text()) for out in (single_run, ddp_run))
    assert ddp["optimizer_steps"] == single["optimizer_steps"] == STEPS
    assert ddp["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-3)  # 1000 test images, all-reduced
    for a, b in zip(history_rows(single_run), history_rows(ddp_run), strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key  # metrics cover all ranks' samples


def test_two_nodes_of_one_process_each_train_what_one_node_of_two_processes_trains(ddp_run, tmp_path):
    """`torchrun --nnodes 2 --node-rank 0/1`, a static rendezvous on 127.0.0.1, one process per
    "node", both on this machine and one shared --out: the same 2-rank run, bit for bit."""
    out, port = tmp_path / "run", str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINKIT_KILL") and k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", TRAINKIT_OFFLINE="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "trainkit", "train", *RUN, *EXACT, "--strategy", "ddp", "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]  # fmt: skip
    results = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results[1][1][-2000:] + results[0][1][-2000:]
    two_nodes, one_node = weights(out), weights(ddp_run)
    assert all(torch.equal(two_nodes[key], one_node[key]) for key in one_node)
    assert history_rows(out)[-1]["val_loss"] == history_rows(ddp_run)[-1]["val_loss"]
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == STEPS


def test_sync_batchnorm_gives_two_processes_the_statistics_of_one_process_over_the_global_batch(tmp_path):
    """With BatchNorm (dropout off, SGD): --sync-batchnorm DDP equals one process within SYNC_BN_ATOL,
    running statistics included; plain DDP normalises each rank's half-batch and ends far from it."""
    single = tmp_path / "single"
    assert main(["train", *RUN, *SGD_BN, "--strategy", "single", "--out", str(single)]) == 0
    runs = {name: tmp_path / name for name in ("synced", "plain")}
    for name, extra in (("synced", ["--sync-batchnorm"]), ("plain", [])):
        result = torchrun(runs[name], *SGD_BN, *extra)
        assert result.returncode == 0, result.stderr
    reference = weights(single)
    synced, plain = (max_abs_difference(reference, weights(run)) for run in runs.values())
    assert synced < SYNC_BN_ATOL, synced
    assert plain > 100 * SYNC_BN_ATOL, plain
    statistics = [key for key in reference if key.endswith(("running_mean", "running_var"))]
    assert statistics and max_abs_difference({k: reference[k] for k in statistics},
                                             {k: weights(runs["synced"])[k] for k in statistics}) < SYNC_BN_ATOL


def test_only_rank_0_writes_files(single_run, ddp_run):
    assert files_in(ddp_run) == files_in(single_run)  # no rank-1 duplicates, no leftover temp files
    hidden = [name for name in files_in(ddp_run) if name.rsplit("/", 1)[-1].startswith(".")]
    assert hidden == [".lock"]  # the run folder's lock (trainkit.checkpoint.rundir), no leftover temp files
    assert (ddp_run / ".lock").read_text().strip() != ""  # rank 0 took it
    assert len(history_rows(ddp_run)) == 2  # one row per epoch, not one per rank
    assert json.loads((ddp_run / "config.json").read_text())["strategy"] == "ddp"
    assert load_checkpoint(ddp_run / "checkpoints" / "epoch-0002.pt")["run_info"]["world_size"] == 2


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> Path:
    """Uninterrupted DDP run with BatchNorm, dropout and augmentation (per-rank RNG streams)."""
    out = tmp_path_factory.mktemp("ddp-reference") / "run"
    result = torchrun(out, *RESUMABLE)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def killed_ddp_run(tmp_path_factory) -> tuple[Path, Path]:
    """A DDP run whose rank 1 was SIGKILLed at step 25 (epoch 2; newest checkpoint: step 20),
    and an untouched copy of it for the world-size test."""
    out = tmp_path_factory.mktemp("ddp-killed") / "run"
    killed = torchrun(out, *RESUMABLE, kill_at="step:25")
    assert killed.returncode != 0, killed.stderr
    assert not (out / "summary.json").exists()
    copy = out.with_name("copy")
    shutil.copytree(out, copy)
    return out, copy


def test_killed_ddp_run_resumed_under_torchrun_equals_the_uninterrupted_run(ddp_reference, killed_ddp_run):
    out, _ = killed_ddp_run
    names = sorted(path.name for path in (out / "checkpoints").iterdir())
    assert "epoch-0002-step-00000020.pt" in names and "epoch-0002-step-00000030.pt" not in names
    assert all(verify_checkpoint(out / "checkpoints" / name) is None for name in names if CHECKPOINT_NAME.match(name))
    resumed = torchrun(out, *RESUMABLE, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    resumed_weights, reference_weights = weights(out), weights(ddp_reference)
    assert all(torch.equal(resumed_weights[k], reference_weights[k]) for k in reference_weights)  # exact
    assert without_timing(history_rows(out)) == without_timing(history_rows(ddp_reference))  # per-rank sums restored


def test_a_two_process_checkpoint_resumes_on_one_process_and_continues_the_run(ddp_reference, killed_ddp_run, caplog):
    """2 -> 1: the newest checkpoint is mid-epoch 2 (step 20); the run ends at the same step count, its
    first epoch is the checkpoint's, the second close to the uninterrupted 2-process run's."""
    _, copy = killed_ddp_run
    assert main(["train", "--out", str(copy), "--resume", "--strategy", "single"]) == 0
    assert "resuming a checkpoint of 2 process(es) on 1: training continues from optimizer step 20" in caplog.text
    assert json.loads((copy / "summary.json").read_text())["optimizer_steps"] == STEPS
    resumed, reference = without_timing(history_rows(copy)), without_timing(history_rows(ddp_reference))
    assert resumed[0] == reference[0]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert resumed[1][key] == pytest.approx(reference[1][key], rel=WORLD_CHANGE_RTOL), key


def test_a_one_process_checkpoint_resumes_on_two_processes_and_continues_the_run(tmp_path):
    """1 -> 2, killed at step 25 (newest checkpoint: step 20), resumed under torchrun."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(["train", *RUN, *RESUMABLE, "--strategy", "single", "--out", str(reference)]) == 0
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    killed = subprocess.run([sys.executable, "-m", "trainkit", "train", *RUN, *RESUMABLE, "--strategy", "single",
                             "--out", str(out)], env={**env, "TRAINKIT_KILL_AT": "step:25"}, capture_output=True)  # fmt: skip
    assert killed.returncode == -9
    resumed = torchrun(out, *RESUMABLE, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming a checkpoint of 1 process(es) on 2" in resumed.stderr
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == STEPS
    rows, expected = without_timing(history_rows(out)), without_timing(history_rows(reference))
    assert rows[0] == expected[0]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert rows[1][key] == pytest.approx(expected[1][key], rel=WORLD_CHANGE_RTOL), key


def test_sigterm_on_one_rank_stops_all_ranks_at_the_same_step_and_rank_0_saves(tmp_path):
    out = tmp_path / "run"
    stopped = torchrun(out, *RESUMABLE, kill_at="step:25", signal_name="TERM")  # SIGTERM to rank 1 only
    assert stopped.returncode != 0
    assert "received SIGTERM: stopped at optimizer step 25" in stopped.stderr, stopped.stderr  # rank 1
    # Rank 0 followed at the same step: the mid-epoch save at 25 (not a multiple of the save interval)
    # happens only for an agreed interrupt. (Rank 0's own message may be cut off: torchrun sends it
    # SIGTERM as soon as rank 1 has exited, so the test does not rely on it.)
    assert f"exitcode  : {EXIT_INTERRUPTED}" in stopped.stderr
    saved = out / "checkpoints" / "epoch-0002-step-00000025.pt"
    assert verify_checkpoint(saved) is None
    assert load_checkpoint(saved)["global_step"] == 25
    assert not (out / "summary.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the logging extra is not installed")
def test_under_ddp_only_rank_0_logs_and_the_log_holds_the_global_history(tmp_path):
    from test_loggers import tensorboard_scalars

    out = tmp_path / "run"
    result = torchrun(out, "--logger", "csv,tensorboard", "--log-every-steps", "5")
    assert result.returncode == 0, result.stderr
    writers = {path.name.rsplit(".", 2)[-2] for path in (out / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # one process (PID) wrote events
    scalars = tensorboard_scalars(out)
    assert [value for _, value in scalars["epoch/val_loss"]] == pytest.approx(
        [row["val_loss"] for row in history_rows(out)], rel=1e-6)  # fmt: skip


def test_a_rank_that_runs_out_of_memory_alone_stops_the_run_in_one_line():
    """Rank 1 runs out of memory, rank 0 does not (it waits in the step's all-reduce): rank 1 waits
    OOM_AGREEMENT_S (3 s here) for the others, then stops with one line; torchrun ends rank 0."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
               str(free_port()), str(Path(__file__).with_name("oom_alone_worker.py"))]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "TrainkitError: out of memory at step 3 on rank 1 but not on every rank" in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - started < 60  # not a hang: 3 s of waiting, then torchrun's teardown


def test_a_dataloader_run_resumes_only_on_the_world_size_that_wrote_it(tmp_path):
    """Your DataLoader keeps its position per process: another world size is one line, not a wrong order."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from trainkit.errors import CheckpointError
    from trainkit.loop.trainer import Trainer

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    config = TrainConfig(epochs=1, batch_size=16, device="cpu", patience=0)
    Trainer(nn.Linear(4, 2), config, out_dir=tmp_path / "run").fit(loader)
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "epoch-0001.pt")
    payload["run_info"]["world_size"] = 2  # as if two processes had written it
    longer = TrainConfig(epochs=2, batch_size=16, device="cpu", patience=0)
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) but 1 are running, and your DataLoader's"):
        Trainer(nn.Linear(4, 2), longer, out_dir=tmp_path / "run").fit(loader, resume_from=payload)

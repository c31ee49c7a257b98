"""--strategy fsdp (trainkit.distributed.fsdp) and sharded checkpoints (trainkit.checkpoint.sharded): real 2-process
gloo runs on CPU, with the helpers and settings of test_distributed.

FSDP vs DDP vs one process: the same global batches; FSDP reduce-scatters what DDP all-reduces,
so the float rounding may differ: asserted within ``FSDP_ATOL`` (measured max |diff| 3e-8 vs
DDP, 5e-7 vs one process with clipping active; the NaN/OOM scenarios of fsdp_worker.py: 0).
Killed-and-resumed FSDP vs uninterrupted FSDP on the same world size: exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from test_distributed import (
    EXACT, RESUMABLE, RUN, STEPS, SYNC_BN_ATOL, TORCHRUN_ENV, WORLD_CHANGE_RTOL, free_port, history_rows,
    max_abs_difference, torchrun, weights, without_timing,
)  # fmt: skip
from trainkit.checkpoint.file import model_sha256
from trainkit.checkpoint.store import load_checkpoint, verify_checkpoint
from trainkit.cli import main
from trainkit.exits import EXIT_USAGE
from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError
from trainkit.distributed.fsdp import check_offload, shard_units

FSDP_ATOL = 1e-6
CLIPPED = ["--clip-norm", "0.1"]  # every step clipped: the norm of sharded gradients is all-reduced
CNN = ["--model", "cnn", "--channels", "4,8", "--accumulate", "2", "--epochs", "1"]
BF16_RTOL = 1e-2  # FSDP's bf16 parameters vs DDP's autocast: different casts, the same run within this
WORKER = Path(__file__).with_name("fsdp_worker.py")
# early stopping on (it never stops in 2 epochs): its best-weights copy is sharded in the checkpoints too
RESUMED = [*RESUMABLE, "--patience", "5"]


def fsdp(out: Path, *extra: str, **options):
    return torchrun(out, *extra, strategy="fsdp", **options)


def checkpoint_names(out: Path) -> list[str]:
    return sorted(path.name for path in (out / "checkpoints").iterdir())


# ----------------------------------------------------------------- units (no processes)
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: FSDP needs both in one unit


def test_the_units_are_the_blocks_and_tied_weights_stay_with_the_root():
    model = TiedLM()
    assert shard_units(model) == list(model.blocks)  # embed/head share a weight and stay with the root
    model.head = nn.Linear(8, 10)  # untied: still the root's (a parent may read a top-level module's weights)
    assert shard_units(model) == list(model.blocks)
    assert shard_units(model, ["head", "blocks"]) == [model.head, *model.blocks]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert shard_units(mlp) == [mlp[1], mlp[3]]
    assert shard_units(model, ["blocks.1"]) == [model.blocks[1]]
    with pytest.raises(ConfigError, match=r"--fsdp-units nope: no such submodule; this model has embed, blocks"):
        shard_units(model, ["nope"])


@pytest.mark.parametrize("settings,message", [
    ({"strategy": "fsdp", "ema": 0.99}, "--ema is not supported with --strategy fsdp"),
    ({"strategy": "fsdp", "compile": True}, "--compile is not supported with --strategy fsdp"),
    ({"strategy": "ddp", "fsdp_offload": True}, "--fsdp-offload applies to --strategy fsdp"),
    ({"fsdp_units": ["blocks"]}, "--fsdp-units applies to --strategy fsdp"),
])  # fmt: skip
def test_settings_fsdp_does_not_combine_with_are_refused_before_any_work(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings).validate()


def test_offloading_shards_on_a_cpu_run_is_refused():
    check_offload(True, torch.device("cuda", 0))  # where it applies
    with pytest.raises(ConfigError, match="--fsdp-offload keeps shards in CPU memory between a GPU's uses; on cpu"):
        check_offload(True, torch.device("cpu"))


def test_fsdp_without_torchrun_is_a_one_line_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["train", "--dataset", "synthetic", "--strategy", "fsdp", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and "\n" not in err and "--strategy fsdp needs one process per device" in err


# ------------------------------------------------- FSDP vs DDP vs one process (gloo, CPU)
@pytest.fixture(scope="module", params=["mlp", "cnn"])
def three_runs(request, tmp_path_factory) -> dict[str, Path]:
    """One process, DDP and FSDP on the same data and settings (MLP with clipping; CNN with accumulation)."""
    extra = [*EXACT, *(CLIPPED if request.param == "mlp" else CNN)]
    base = tmp_path_factory.mktemp(request.param)
    runs = {name: base / name for name in ("single", "ddp", "fsdp")}
    assert main(["train", *RUN, *extra, "--strategy", "single", "--out", str(runs["single"])]) == 0
    for strategy in ("ddp", "fsdp"):
        result = torchrun(runs[strategy], *extra, strategy=strategy)
        assert result.returncode == 0, result.stderr[-3000:]
    return runs


def test_fsdp_trains_what_ddp_and_one_process_train(three_runs):
    single, ddp, sharded = (weights(three_runs[name]) for name in ("single", "ddp", "fsdp"))
    assert max_abs_difference(ddp, sharded) < FSDP_ATOL
    assert max_abs_difference(single, sharded) < FSDP_ATOL
    rows = {name: history_rows(out) for name, out in three_runs.items()}
    for a, b in zip(rows["ddp"], rows["fsdp"], strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "lr", "grad_norm", "clip_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    summary = json.loads((three_runs["fsdp"] / "summary.json").read_text())
    assert summary["best_checkpoint"] == "checkpoints/best.dcp"
    assert summary["model_sha256"] == model_sha256(sharded)  # rank 0 hashed the whole weights, not its shards


def test_a_sharded_checkpoint_is_a_verified_folder_that_exports_one_safetensors_file(three_runs, tmp_path, capsys):
    out = three_runs["fsdp"]
    epoch_end = sorted((out / "checkpoints").glob("epoch-*[0-9].dcp"))[-1]
    assert sorted(p.name for p in epoch_end.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                           "manifest.json", "state.pt"]  # fmt: skip
    assert verify_checkpoint(epoch_end) is None
    assert main(["inspect", str(epoch_end)]) == 0
    assert "verifies (sha256 ok for every file), sharded by 2 process(es)" in capsys.readouterr().out
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp folders left
    payload = load_checkpoint(epoch_end)  # whole weights, read on one process without a process group
    final = weights(out)
    assert payload["run_info"]["world_size"] == 2 and payload["model"].keys() == final.keys()
    assert all(torch.equal(payload["model"][key], final[key]) for key in final)  # patience 0: the last epoch
    exported = tmp_path / "model.safetensors"
    assert main(["export", str(epoch_end), "--format", "safetensors", "--out", str(exported)]) == 0
    assert max_abs_difference(load_file(str(exported)), final) == 0


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict[str, dict]:
    """fsdp_worker.py's scenarios under DDP and FSDP (one torchrun each)."""
    results = {}
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | {"OMP_NUM_THREADS": "1"}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path_factory.mktemp(f"worker-{strategy}")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                   str(free_port()), str(WORKER), strategy, str(out)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-12000:]
        results[strategy] = torch.load(out / "results.pt")
    return results


@pytest.mark.parametrize("scenario", ["nan-skip", "nan-rollback", "oom"])
def test_nan_policies_oom_back_off_and_uneven_evaluation_shards_under_fsdp_match_ddp(scenario, worker_results):
    """fsdp_worker.py: a NaN loss on rank 1 only (skip: the step is dropped on both ranks; rollback:
    both reload the sharded checkpoint at step 12 and halve the lr), or an out-of-memory error above
    micro-batches of 10 (both halve to 8); 203 validation rows give the ranks 7 and 6 batches."""
    ddp, sharded = worker_results["ddp"][scenario], worker_results["fsdp"][scenario]
    assert max_abs_difference(ddp["weights"], sharded["weights"]) < FSDP_ATOL
    assert sharded["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-6)
    expected = {"nan-skip": {"skipped": 1, "steps": 30}, "nan-rollback": {"rollbacks": 1, "lr_scale": 0.5, "steps": 30},
                "oom": {"micro_batch_size": 8, "steps": 15}}[scenario]  # fmt: skip
    assert {key: sharded[key] for key in expected} == expected == {key: ddp[key] for key in expected}


def test_bf16_under_fsdp_trains_the_run_that_autocast_trains_under_ddp(worker_results):
    """FSDP's MixedPrecisionPolicy (bf16 parameters, fp32 gradient reduction) vs DDP's autocast."""
    ddp, sharded = worker_results["ddp"]["bf16"], worker_results["fsdp"]["bf16"]
    assert sharded["val_loss"] == pytest.approx(ddp["val_loss"], rel=BF16_RTOL)
    assert max_abs_difference(ddp["weights"], sharded["weights"]) < 0.05  # measured: identical for Linear layers


def test_sync_batchnorm_under_fsdp_gives_the_global_batch_statistics_as_under_ddp(worker_results):
    """With BatchNorm and --sync-batchnorm, FSDP ends where DDP does (DDP's synced statistics equal one
    process's over the global batch: test_distributed), running statistics included."""
    ddp, sharded = worker_results["ddp"]["sync-bn"], worker_results["fsdp"]["sync-bn"]
    assert any(key.endswith("running_mean") for key in sharded["weights"])
    assert max_abs_difference(ddp["weights"], sharded["weights"]) < SYNC_BN_ATOL


# ------------------------------------------------------------- kills and resumes
@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory) -> Path:
    """Uninterrupted FSDP run with BatchNorm, dropout and augmentation (per-rank RNG streams)."""
    out = tmp_path_factory.mktemp("fsdp-reference") / "run"
    result = fsdp(out, *RESUMED)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed_fsdp_run(tmp_path_factory) -> Path:
    """An FSDP run whose rank 1 was SIGKILLed at step 25 (epoch 2; newest checkpoint: step 20), kept
    untouched: each test resumes a copy."""
    out = tmp_path_factory.mktemp("fsdp-killed") / "run"
    killed = fsdp(out, *RESUMED, kill_at="step:25")
    assert killed.returncode != 0 and not (out / "summary.json").exists()
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def assert_same_run(out: Path, reference: Path) -> None:
    resumed, expected = weights(out), weights(reference)
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)  # bit for bit
    assert without_timing(history_rows(out)) == without_timing(history_rows(reference))


def test_a_killed_fsdp_run_resumed_on_the_same_world_size_equals_the_uninterrupted_run(
    fsdp_reference, killed_fsdp_run, tmp_path
):
    out = copy_of(killed_fsdp_run, tmp_path)
    names = checkpoint_names(out)
    assert "epoch-0002-step-00000020.dcp" in names and "epoch-0002-step-00000030.dcp" not in names
    resumed = fsdp(out, *RESUMED, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, fsdp_reference)
    # retention (newest 3 and best.dcp) left what it left in the uninterrupted run
    assert checkpoint_names(out) == checkpoint_names(fsdp_reference) == [
        "best.dcp", "epoch-0002-step-00000020.dcp", "epoch-0002-step-00000030.dcp", "epoch-0002.dcp"]  # fmt: skip


@pytest.mark.parametrize("kill_at", ["save:shards_written:2", "save:before_rename:2"])
def test_an_fsdp_run_killed_during_a_sharded_save_resumes_exactly(fsdp_reference, tmp_path, kill_at):
    """Rank 0, which commits, killed in the second save (the end of epoch 1): once every rank's shards
    are written, or with the folder complete but not yet renamed. The temporary folder never counts
    as a checkpoint; resume starts from step 10's and replays the same run."""
    out = tmp_path / "run"
    killed = fsdp(out, *RESUMED, kill_at=kill_at, kill_rank=0)
    assert killed.returncode != 0
    assert [name for name in checkpoint_names(out) if not name.startswith(".")] == ["epoch-0001-step-00000010.dcp"]
    assert [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".epoch-0001.dcp")]  # the unfinished save
    resumed = fsdp(out, *RESUMED, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # cleaned up
    assert_same_run(out, fsdp_reference)


def test_a_damaged_shard_is_detected_and_resume_falls_back_to_the_previous_checkpoint(
    fsdp_reference, killed_fsdp_run, tmp_path
):
    out = copy_of(killed_fsdp_run, tmp_path)
    shard = out / "checkpoints" / "epoch-0002-step-00000020.dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in rank 1's shard
    shard.write_bytes(bytes(data))
    resumed = fsdp(out, *RESUMED, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "__1_0.distcp fails its sha256 check" in resumed.stderr
    assert "epoch-0002-step-00000020.dcp.corrupt" in checkpoint_names(out)
    assert_same_run(out, fsdp_reference)  # replayed from epoch 1's end: the same run


@pytest.mark.parametrize("strategy", ["single", "fsdp"])
def test_a_two_process_fsdp_checkpoint_resumes_on_one_process(fsdp_reference, killed_fsdp_run, tmp_path, caplog,
                                                              strategy):  # fmt: skip
    """2 -> 1: DCP reshards the two ranks' shards into one process's model and optimizer: a plain
    process (no process group), or one FSDP process under torchrun."""
    out = copy_of(killed_fsdp_run, tmp_path)
    if strategy == "single":
        assert main(["train", "--out", str(out), "--resume", "--strategy", "single"]) == 0
        log = caplog.text
    else:
        resumed = fsdp(out, *RESUMED, "--resume", processes=1)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        log = resumed.stderr
    assert "resuming a checkpoint of 2 process(es) on 1: training continues from optimizer step 20" in log
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == STEPS
    resumed, reference = without_timing(history_rows(out)), without_timing(history_rows(fsdp_reference))
    assert resumed[0] == reference[0]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert resumed[1][key] == pytest.approx(reference[1][key], rel=WORLD_CHANGE_RTOL), key


def test_a_one_process_checkpoint_resumes_on_two_fsdp_processes(fsdp_reference, tmp_path):
    """1 -> 2: a one-file checkpoint of a single-process run, killed at step 25, resumed sharded."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | {"TRAINKIT_KILL_AT": "step:25"}
    killed = subprocess.run([sys.executable, "-m", "trainkit", "train", *RUN, *RESUMED, "--strategy", "single",
                             "--out", str(out)], env=env, capture_output=True)  # fmt: skip
    assert killed.returncode == -9
    resumed = fsdp(out, *RESUMED, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming a checkpoint of 1 process(es) on 2" in resumed.stderr
    assert "epoch-0002.dcp" in checkpoint_names(out)  # from here on, sharded checkpoints
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == STEPS
    rows, expected = without_timing(history_rows(out)), without_timing(history_rows(fsdp_reference))
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert rows[1][key] == pytest.approx(expected[1][key], rel=WORLD_CHANGE_RTOL), key

"""The host/device boundary (trainkit.devices), proven on a CPU.

On a CPU the device and the host are the same memory, so a checkpoint loaded "to the device"
works by accident. Here the run trains on ``cpu:0``, a device name that is not the host's
(``cpu``), as ``cuda:0`` is not, and ``torch.load`` puts whatever a read asks to place anywhere
but the host on ``meta``: a stand-in that, like a GPU, the host cannot read from
(``torch.set_rng_state`` refuses it with the same TypeError it gives a CUDA tensor). Every resume
path must still reproduce the uninterrupted run, bit for bit.

CUDA's own calls (RNG per device, set_device, the process-group backend, deterministic kernels,
TF32, bf16 support, device counts) are replaced by recording fakes: what they are asked is the
logic under test. benchmarks/gpu_check.sh checks the same promises on a real GPU.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

from crashes import CrashAtEpoch
from trainkit import devices, distributed
from trainkit.loop import memory
from trainkit.loop.callbacks import Callback
from trainkit.checkpoint.file import model_sha256, save_checkpoint
from trainkit.checkpoint.store import CheckpointDir, load_checkpoint
from trainkit.config.files import recipe_config
from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit.errors import ConfigError, TrainkitError
from trainkit.tracking.loggers import RunLogger
from trainkit.recipes.from_checkpoint import evaluate_checkpoint, export_checkpoint, generate_from_checkpoint
from trainkit.recipes.resume import resume_config
from trainkit.recipes.run import train_run
from trainkit.loop.trainer import Trainer
from trainkit.distributed.strategies import DataParallel

RUN_DEVICE = "cpu:0"  # the same memory as the host, another device name: what cuda:0 is to a GPU host


@pytest.fixture
def device_is_not_the_host(monkeypatch) -> list[torch.device]:
    """torch.load places on ``meta`` what a read asks to put anywhere but the host; returns where
    each read asked to place its tensors."""
    real_load = torch.load
    asked: list[torch.device] = []

    def load(*args, map_location=None, **kwargs):
        if map_location is not None:
            asked.append(torch.device(map_location))
            if torch.device(map_location) != devices.HOST:
                map_location = "meta"
        return real_load(*args, map_location=map_location, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return asked


def toy_data(n: int = 192, batch: int = 32, shuffle: bool = True) -> DeviceBatches:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DeviceBatches(x, y, batch, seed=3, shuffle=shuffle)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "samples_per_second")} for row in rows]


def dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, state, loss) -> None:
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def fit(out: Path, *, crash_at: int | None = None, resume_from: Path | None = None, **settings) -> Trainer:
    config = TrainConfig(batch_size=32, epochs=3, patience=0, device=RUN_DEVICE, lr=3e-3, checkpoint_every_steps=4,
                         **settings)  # fmt: skip
    trainer = Trainer(dropout_model(), config, out_dir=out, callbacks=[CrashAtStep(crash_at)] if crash_at else [])
    trainer.fit(toy_data(), resume_from=resume_from)
    return trainer


# ------------------------------------------------------------------ 1. checkpoints load to the host
def test_a_trainer_resumed_from_a_checkpoint_read_to_the_host_matches_the_uninterrupted_run(
    tmp_path, device_is_not_the_host
):
    whole = fit(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "killed", crash_at=10)  # mid-epoch 2: the last save is at step 8
    newest = CheckpointDir(tmp_path / "killed" / "checkpoints").latest()
    assert newest.name == "epoch-0002-step-00000008.pt"
    resumed = fit(tmp_path / "killed", resume_from=newest)
    assert model_sha256(resumed.model) == model_sha256(whole.model)
    assert without_timing(resumed.state.history) == without_timing(whole.state.history)
    assert device_is_not_the_host and set(device_is_not_the_host) == {devices.HOST}
    # non-fused AdamW reads `step` on the host every step: it stays a host scalar, the moments go to the weights
    for param, state in resumed.optimizer.state.items():
        assert state["step"].device == devices.HOST and state["exp_avg"].device == param.device


def test_a_stateful_dataloaders_generators_resume_from_a_checkpoint_read_to_the_host(tmp_path, device_is_not_the_host):
    """A torchdata StatefulDataLoader's sampler and loader generators are host state in the checkpoint."""
    from torch.utils.data import TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> StatefulDataLoader:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(160, 12, generator=gen)
        dataset = TensorDataset(x, (x[:, 0] > 0).long())
        return StatefulDataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))

    def run(out: Path, crash_at: int | None = None, resume_from: Path | None = None) -> Trainer:
        config = TrainConfig(batch_size=16, epochs=2, patience=0, device=RUN_DEVICE, checkpoint_every_steps=3)
        trainer = Trainer(dropout_model(), config, out_dir=out, callbacks=[CrashAtStep(crash_at)] if crash_at else [])
        trainer.fit(loader(), resume_from=resume_from)
        return trainer

    whole = run(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "killed", crash_at=14)
    resumed = run(tmp_path / "killed", resume_from=CheckpointDir(tmp_path / "killed" / "checkpoints").latest())
    assert model_sha256(resumed.model) == model_sha256(whole.model)
    assert set(device_is_not_the_host) == {devices.HOST}


def test_the_train_jobs_resume_reads_checkpoints_to_the_host(
    synthetic_config, tmp_path, device_is_not_the_host
):
    config = synthetic_config(device=RUN_DEVICE, patience=0, checkpoint_every_steps=7, epochs=2)
    whole = train_run(synthetic_config(device=RUN_DEVICE, patience=0, checkpoint_every_steps=7, epochs=2,
                                       out=str(tmp_path / "whole")))  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(config, extra_callbacks=[CrashAtEpoch(2)])
    resumed = train_run(resume_config(Path(config.out), {}), resume=True)
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert set(device_is_not_the_host) == {devices.HOST}


class NaNOnce(nn.Module):
    """Cross-entropy, NaN on the n-th training call only."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, logits, targets):
        loss = nn.functional.cross_entropy(logits, targets)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.n:
                return loss * float("nan")
        return loss


def test_rollback_reloads_a_checkpoint_read_to_the_host_and_keeps_its_fallback_there(tmp_path, device_is_not_the_host):
    config = TrainConfig(batch_size=32, epochs=2, patience=0, device=RUN_DEVICE, lr=3e-3, on_nonfinite="rollback",
                         checkpoint_every_steps=3)  # fmt: skip
    trainer = Trainer(dropout_model(), config, out_dir=tmp_path, loss_fn=NaNOnce(5))
    trainer.fit(toy_data())
    assert trainer.rollbacks == 1 and trainer.state.global_step == 12
    assert set(device_is_not_the_host) == {devices.HOST}
    fallback = [t for t in trainer.nonfinite.fallback["model"].values()]
    assert all(t.device == devices.HOST for t in fallback)
    assert all(t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()  # a copy, not the live weights
               for t, p in zip(fallback, trainer.model.state_dict().values()))  # fmt: skip


# ------------------------------------------------------------------ RNG states by device
class FakeCuda:
    """Records what the RNG code asks of torch.cuda; each device's generator is a distinct ByteTensor."""

    def __init__(self, monkeypatch, count: int = 2) -> None:
        self.states = {index: torch.full((16,), index, dtype=torch.uint8) for index in range(count)}
        self.set_calls: list[tuple[int, torch.Tensor]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.refuse)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.refuse)

    @staticmethod
    def index(device) -> int:
        return device if isinstance(device, int) else torch.device(device).index

    def get_rng_state(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        assert state.device == devices.HOST and state.dtype == torch.uint8
        self.set_calls.append((self.index(device), state))

    @staticmethod
    def refuse(*args, **kwargs):
        raise AssertionError("every GPU's generator was asked for (and the CUDA runtime started)")


def test_the_cuda_generator_of_the_run_device_is_saved_with_its_index_and_restored_onto_the_run_device(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    saved = devices.rng_state(torch.device("cuda", 1))
    assert saved["cuda"]["index"] == 1 and torch.equal(saved["cuda"]["state"], cuda.states[1])
    # a cuda:1 run resumed on cuda:0 (or on a machine with one GPU) continues cuda:1's stream there
    devices.restore_rng(saved, torch.device("cuda", 0))
    assert [(index, state.tolist()) for index, state in cuda.set_calls] == [(0, cuda.states[1].tolist())]
    # an older checkpoint's list of every GPU's state: the entry of this device's index
    older = {**saved, "cuda": [cuda.states[0], cuda.states[1]]}
    devices.restore_rng(older, torch.device("cuda", 1))
    assert cuda.set_calls[-1][0] == 1 and torch.equal(cuda.set_calls[-1][1], cuda.states[1])


def test_a_cpu_run_never_asks_for_a_gpu_generator(monkeypatch, tmp_path):
    """On a GPU host a CPU run (or a gloo rank) must not start the CUDA runtime: its checkpoints,
    the LR finder and the batch-size search touch no CUDA generator."""
    FakeCuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_rng_state", FakeCuda.refuse)
    trainer = Trainer(dropout_model(), TrainConfig(batch_size=32, epochs=1, patience=0, device="cpu"), out_dir=tmp_path)
    trainer.lr_find(toy_data(), num_iter=5)
    trainer.fit(toy_data())
    assert load_checkpoint(CheckpointDir(tmp_path / "checkpoints").latest())["rng"]["cuda"] is None
    with memory.leaves_no_trace(trainer.model):
        pass


# ------------------------------------------------------------------ 2. mixed precision
class NormsSeen(Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, state, grad_norm) -> None:
        self.norms.append(float(grad_norm))


def test_steps_the_grad_scaler_skips_are_not_gradients_in_the_history_or_the_callbacks():
    """A loss scale of 2**127 overflows the first steps, as fp16's does at the start and after each growth."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 12, generator=gen) * 10
    y = (x[:, 0] > 0).long()
    seen = NormsSeen()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    config = TrainConfig(batch_size=32, epochs=2, patience=0, device="cpu", lr=1e-2, clip_norm=1.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
    trainer = Trainer(model, config, callbacks=[seen], scaler=scaler)
    history = trainer.fit(DeviceBatches(x, y, 32, seed=1))
    overflowed = sum(row["scaler_skipped_steps"] for row in history)
    halvings = round(math.log2(2.0**127 / scaler.get_scale()))
    assert overflowed >= 1 and overflowed == halvings  # each overflow halved the scale once
    assert all(math.isfinite(norm) for norm in seen.norms) and seen.norms.count(0.0) == overflowed
    for epoch, row in enumerate(history):  # 8 steps an epoch; the means are over the steps really taken
        taken = [norm for norm in seen.norms[8 * epoch : 8 * epoch + 8] if norm != 0.0]
        assert row["grad_norm"] == pytest.approx(sum(taken) / len(taken), rel=1e-6)
        assert row["clip_fraction"] == sum(norm > 1.0 for norm in taken) / len(taken)


def test_a_grad_scaler_that_is_not_one_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="scaler must be a torch.amp.GradScaler, got str"):
        Trainer(dropout_model(), TrainConfig(device="cpu"), scaler="fp16")


@pytest.fixture(scope="module")
def fp16_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """An image run's and a text run's checkpoint, relabelled as trained with --precision fp16 (a CUDA run's)."""
    from trainkit.recipes.text.data import TextData  # noqa: F401 - the text recipe

    folder = tmp_path_factory.mktemp("fp16")
    corpus = folder / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 60)
    runs = {
        "image": TrainConfig(dataset="synthetic", epochs=1, batch_size=64, device="cpu", patience=0,
                             out=str(folder / "image")),
        "text": recipe_config({"dataset": "text", "data_file": str(corpus), "max_steps": 4, "batch_size": 8,
                               "layers": 1, "width": 32, "heads": 2, "block_size": 16, "device": "cpu",
                               "precision": "fp32", "out": str(folder / "text")}),
    }  # fmt: skip
    paths = {}
    for name, config in runs.items():
        train_run(config)
        path = CheckpointDir(Path(config.out) / "checkpoints").latest()
        payload = load_checkpoint(path)
        payload["config"]["precision"] = "fp16"
        save_checkpoint(payload, path)
        paths[name] = path
    return paths


def test_an_fp16_checkpoint_evaluates_exports_and_generates_on_a_cpu_only_host(fp16_checkpoints, caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="trainkit"):
        evaluated = evaluate_checkpoint(fp16_checkpoints["image"], device="cpu")
    assert 0.0 <= evaluated["test_accuracy"] <= 1.0 and math.isfinite(evaluated["test_loss"])
    assert any("--precision fp16, which needs CUDA; using fp32 on cpu" in r.getMessage() for r in caplog.records)
    exported = export_checkpoint(fp16_checkpoints["image"], format="safetensors", out=tmp_path / "m.safetensors")
    assert exported["max_abs_difference"] == 0.0
    text = generate_from_checkpoint(fp16_checkpoints["text"], prompt="the ", tokens=12, device="cpu")
    assert text.startswith("the ") and len(text) == 16


# ------------------------------------------------------------------ 3. processes and devices
def test_the_process_group_serves_cuda_and_host_tensors_on_a_gpu_run(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw.get("device_id"))))  # fmt: skip
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: calls.append(("group", kw["backend"])))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    device = torch.device("cuda", 1)
    with distributed.process_group(device):
        pass
    assert ("init", "cuda:nccl,cpu:gloo", device) in calls and ("set_device", device) in calls
    assert distributed.backend_for(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize(
    "local_rank, visible, world, asked, expected",
    [(1, 4, 4, "cuda", "cuda:1"), (3, 1, 4, "cuda", "cuda:0"),  # a scheduler gave each task its own GPU
     (5, 2, 8, "cuda", "cuda:1"), (0, 2, 1, "cuda:1", "cuda:1"), (0, 1, 1, "cpu", "cpu")],
)  # fmt: skip
def test_each_rank_maps_to_a_gpu_it_can_see(monkeypatch, local_rank, visible, world, asked, expected):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert distributed.ddp_device(torch.device(asked)) == torch.device(expected)


def test_a_single_process_on_cuda_n_makes_it_the_current_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.use_device(torch.device("cuda", 1)) == torch.device("cuda", 1) and chosen == [1]
    assert devices.use_device(torch.device("cuda")) == torch.device("cuda", 0)
    assert devices.use_device(torch.device("cpu")) == torch.device("cpu") and chosen == [1, 0]


def test_tuner_workers_spread_over_the_visible_gpus(monkeypatch):
    from trainkit.tune.workers import worker_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_devices("auto", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cpu", 2) == [None, None] and worker_devices("cuda:1", 2) == [None, None]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_devices("cuda", 2) == [None, None]


# ------------------------------------------------------------------ 4. loggers
class Backend:
    name = "fake"

    def open(self, saved, first_step): ...

    def write(self, points): ...


def test_the_logger_keeps_each_step_on_the_device_of_its_loss():
    """``meta`` stands in for a GPU: with clipping off the clip count is a host number."""
    logger = RunLogger([Backend()], every_steps=1, clip_norm=None)
    state = type("State", (), {"global_step": 1, "lr": 0.1})()
    logger.on_before_optimizer_step(state, torch.tensor(2.0, device="meta"))
    logger.on_batch_end(state, torch.tensor(1.0, device="meta"))
    assert logger.kept_steps[0][2].device.type == "meta"
    # steps restored from a checkpoint (host tensors) are written with the new ones
    logger.kept_steps = [(1, 0.1, torch.tensor([1.0, 2.0, 0.0])), (2, 0.1, torch.tensor([0.5, 1.0, 0.0]))]
    assert [value for _, key, value in logger.points() if key == "step/grad_norm"] == [2.0, 1.0]


# ------------------------------------------------------------------ 5. out of memory
class OutOfMemoryOnCall(nn.Module):
    """Linear-BatchNorm-ReLU-Linear that raises torch.OutOfMemoryError on the given training forward
    calls (1-based), the way a GPU does when memory runs short at one micro-batch."""

    def __init__(self, calls: set[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.calls, self.seen = calls, 0
        self.net = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)  # BatchNorm's statistics are updated before the failure, as in a real backward
        if self.training:
            self.seen += 1
            if self.seen in self.calls:
                raise torch.OutOfMemoryError("simulated")
        return out


def oom_run(model: nn.Module, batch_size: int, accumulate: int) -> Trainer:
    config = TrainConfig(batch_size=batch_size, accumulate=accumulate, epochs=2, patience=0, device="cpu", lr=3e-3,
                         clip_norm=None)  # fmt: skip
    trainer = Trainer(model, config)
    trainer.fit(toy_data(batch=batch_size))
    return trainer


def test_an_oom_after_the_first_micro_batch_counts_nothing_twice():
    """Micro-batch 2 of step 1 runs out: micro-batch 1's metrics and BatchNorm update must not count twice."""
    backed_off = oom_run(OutOfMemoryOnCall({2}), batch_size=32, accumulate=2)
    from_start = oom_run(OutOfMemoryOnCall(set()), batch_size=16, accumulate=4)
    assert backed_off.micro_batch_size == 16
    for got, want in zip(backed_off.model.state_dict().values(), from_start.model.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # BatchNorm statistics included
    for got, want in zip(backed_off.state.history, from_start.state.history):
        assert got["train_accuracy"] == want["train_accuracy"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)


def test_an_oom_in_the_device_copy_backs_off_like_one_in_the_forward(monkeypatch):
    import trainkit.loop.trainer as trainer_module

    real, copies = trainer_module.to_device, []

    def to_device(batch, device, memory_format=None):
        copies.append(1)
        if len(copies) == 3:
            raise torch.OutOfMemoryError("simulated")
        return real(batch, device, memory_format)

    monkeypatch.setattr(trainer_module, "to_device", to_device)
    trainer = oom_run(OutOfMemoryOnCall(set()), batch_size=32, accumulate=1)
    assert trainer.micro_batch_size == 16 and trainer.state.global_step == 12


def test_an_oom_allocating_the_optimizer_state_is_retried_once_then_explained(monkeypatch):
    reference = oom_run(OutOfMemoryOnCall(set()), batch_size=32, accumulate=1)
    config = TrainConfig(batch_size=32, epochs=2, patience=0, device="cpu", lr=3e-3, clip_norm=None)
    trainer = Trainer(OutOfMemoryOnCall(set()), config)
    real_step, failures = trainer.optimizer.step, [1]

    def step(optimizer, *args, **kwargs):
        if failures:
            failures.pop()
            raise torch.OutOfMemoryError("simulated")
        return real_step(*args, **kwargs)

    trainer.optimizer.step = types.MethodType(step, trainer.optimizer)  # (schedulers wrap a bound step)
    trainer.fit(toy_data())
    assert model_sha256(trainer.model) == model_sha256(reference.model)  # the retried step is the same step

    always = Trainer(OutOfMemoryOnCall(set()), config)

    def out_of_memory(optimizer, *args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    always.optimizer.step = types.MethodType(out_of_memory, always.optimizer)
    with pytest.raises(TrainkitError, match=r"out of memory in the optimizer step at step 1, allocating its state"):
        always.fit(toy_data())


class LargeEvaluationOutOfMemory(nn.Module):
    def __init__(self, limit: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.limit = limit
        self.net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x):
        if not self.training and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("simulated")
        return self.net(x)


def test_an_oom_in_evaluation_evaluates_in_pieces_with_the_same_numbers():
    model = LargeEvaluationOutOfMemory(limit=50)
    trainer = Trainer(model, TrainConfig(device="cpu", patience=0))
    whole = trainer.evaluate(toy_data(batch=32, shuffle=False))
    pieces = trainer.evaluate(toy_data(batch=192, shuffle=False))  # 192 and 96 run out: pieces of 48
    assert trainer.eval_micro_batch_size == 48
    assert pieces["accuracy"] == whole["accuracy"] and pieces["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_under_ddp_a_rank_that_ran_out_alone_or_mid_reduction_stops_the_run_in_one_line(monkeypatch):
    trainer = Trainer(OutOfMemoryOnCall(set()), TrainConfig(device="cpu", patience=0))
    trainer.backoff.strategy = DataParallel()  # the back-off as a DDP rank runs it
    group = [next(iter(toy_data().epoch(1)))]
    with pytest.raises(TrainkitError, match="backward pass that all-reduces DDP's gradients, which cannot be retried"):
        trainer.backoff.halve(group, 1, mid_reduction=True)
    monkeypatch.setattr(distributed, "every_rank_out_of_memory", lambda: False)
    with pytest.raises(TrainkitError, match="out of memory at step 1 on rank 0 but not on every rank"):
        trainer.backoff.halve(group, 1)
    monkeypatch.setattr(distributed, "every_rank_out_of_memory", lambda: True)
    trainer.backoff.halve(group, 1)  # every rank ran out: all halve together
    assert trainer.micro_batch_size == 16


class FakeMemory:
    """A CUDA device's readings for trainkit.loop.memory: ``free`` bytes, and a step peak of ``per_row``
    bytes a row of the batch tried (``rows``, set as the search slices its inputs)."""

    def __init__(self, free: int, per_row: int) -> None:
        self.free_bytes, self.per_row, self.rows = free, per_row, 0

    def free(self) -> int:
        return self.free_bytes

    def step_peak(self, step) -> int:
        step()
        return self.rows * self.per_row

    def release(self) -> None:
        pass


class Rows:
    """Training inputs that tell the fake memory how many rows the search tried."""

    def __init__(self, x: torch.Tensor, fake: FakeMemory) -> None:
        self.x, self.fake, self.device = x, fake, x.device

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        self.fake.rows = rows.stop
        return self.x[rows]


def test_batch_size_auto_on_cuda_leaves_headroom_and_room_for_the_runs_weight_copies():
    model = OutOfMemoryOnCall(set())
    x, y = torch.randn(4096, 12), torch.randint(0, 3, (4096,))
    copy_bytes = memory.state_bytes(model)
    per_row = copy_bytes // 100

    def choose(free: int, copies: int = 0) -> int:
        fake = FakeMemory(free, per_row)
        return memory.find_batch_size_by_trial(model, lambda: torch.optim.AdamW(model.parameters()), Rows(x, fake), y,
                                               cap=4096, weight_copies=copies, memory=fake).batch_size  # fmt: skip

    assert choose(700 * per_row) == 512  # 595 rows' worth once 15% is left over
    assert choose(1100 * per_row) == 512  # 1024 rows would just fit in 1100, but not with 15% left over
    assert choose(700 * per_row, copies=2) == 256  # two copies of the weights (200 rows' worth) held beside it
    assert memory.weight_copies_of(TrainConfig(ema=0.99, patience=5)) == 2
    assert memory.weight_copies_of(TrainConfig(patience=0, on_nonfinite="rollback")) == 0  # rollback's copy: host


# ------------------------------------------------------------------ 6. determinism and numerics
# Run in a fresh process: MKL's vector math initialises once per process, and this one has run it.
VML_MODE_AFTER_IMPORT = """
import ctypes, os, sys, torch
library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
library.vmlGetMode.restype = ctypes.c_uint
before = library.vmlGetMode()
import trainkit.devices
print(before, library.vmlGetMode())
"""
VML_FTZDAZ_OFF = 0x140000  # the mode bits ATen passes with every VML call; a thread that made none has them clear


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch computes elementwise ops without MKL")
def test_importing_trainkit_initialises_mkl_vector_math_on_one_thread_first():
    """Same seed, other weights in about 1 fresh process in 20 on a busy machine, before: two
    threads making MKL VML's first call at once (AdamW's sqrt) could compute one half on another
    path (benchmarks/first_call_race.py). trainkit's import makes that first call on its own thread."""
    done = subprocess.run([sys.executable, "-c", VML_MODE_AFTER_IMPORT], capture_output=True, text=True, check=True)
    before, after = (int(word) for word in done.stdout.split())
    assert not before & VML_FTZDAZ_OFF, "the process had made a VML call before importing trainkit"
    assert after & VML_FTZDAZ_OFF == VML_FTZDAZ_OFF


def test_cuda_runs_turn_on_deterministic_kernels_and_leave_tf32_off_unless_asked(monkeypatch):
    asked = {}
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset by the test")  # restored when it ends
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode: asked.update(deterministic=mode))
    monkeypatch.setattr(devices, "set_tf32", lambda enabled: asked.update(tf32=enabled))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    devices.configure_numerics(torch.device("cuda", 0), deterministic=True, tf32=False)
    assert asked == {"deterministic": True, "tf32": False} and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    devices.configure_numerics(torch.device("cuda", 0), deterministic=False, tf32=True)
    assert asked == {"deterministic": False, "tf32": True}
    asked.clear()
    devices.configure_numerics(torch.device("cpu"), deterministic=True, tf32=True)
    assert asked == {}  # a CPU run changes no global switch


def test_an_op_without_a_deterministic_kernel_is_one_line_naming_the_way_out():
    class Nondeterministic(nn.Linear):
        def forward(self, x):
            raise RuntimeError("scatter_add_cuda_kernel does not have a deterministic implementation, but you set ...")

    trainer = Trainer(Nondeterministic(12, 3), TrainConfig(device="cpu", patience=0))
    with pytest.raises(ConfigError, match=r"scatter_add_cuda_kernel does not .*; pass --no-deterministic"):
        trainer.fit(toy_data())


def test_the_deterministic_and_tf32_flags_reach_the_config(tmp_path):
    from trainkit.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--no-deterministic", "--tf32", "--out", str(tmp_path)])
    config, _ = train_config_from_args(args)
    assert config.deterministic is False and config.tf32 is True
    assert TrainConfig().deterministic is True and TrainConfig().tf32 is False


# ------------------------------------------------------------------ 7. the rest
def test_sync_batchnorm_keeps_the_text_models_time_major_transpose():
    from trainkit.recipes.text.models import TokenBatchNorm

    x = torch.randn(4, 5, 8)  # (batch, time, channels): time != channels, so a lost transpose fails
    for device in ("cpu", "cuda"):  # GlobalBatchNorm (gloo) and torch's SyncBatchNorm
        norm = TokenBatchNorm(8)
        expected = norm(x)
        converted = distributed.sync_batchnorm(nn.Sequential(TokenBatchNorm(8)), torch.device(device))[0]
        torch.testing.assert_close(converted(x), expected)  # no process group: plain batch statistics
        assert not isinstance(converted, TokenBatchNorm) and set(converted.state_dict()) == set(norm.state_dict())


def test_an_export_of_a_model_elsewhere_runs_on_a_host_copy(monkeypatch, tmp_path):
    from trainkit.checkpoint import export

    model = nn.Sequential(nn.Linear(4, 3))
    rebuilt = []

    def rebuild():
        rebuilt.append(nn.Sequential(nn.Linear(4, 3)))
        return rebuilt[-1]

    monkeypatch.setattr(export, "module_device", lambda module: torch.device("meta") if module is model else devices.HOST)
    result = export.export_model(model, torch.randn(2, 4), "safetensors", tmp_path / "m.safetensors", rebuild=rebuild)
    assert result["max_abs_difference"] == 0.0 and model.training  # the caller's model is left as it was
    assert model_sha256(rebuilt[0]) == model_sha256(model)


def test_predict_returns_host_tensors_batch_by_batch(monkeypatch):
    import trainkit.loop.evaluation as evaluation_module

    moved = []
    monkeypatch.setattr(evaluation_module, "to_host", lambda tree: moved.append(tree) or devices.to_host(tree))
    trainer = Trainer(OutOfMemoryOnCall(set()).eval(), TrainConfig(device="cpu", eval_batch_size=50, patience=0))
    outputs = trainer.predict(torch.randn(120, 12))
    assert outputs.shape == (120, 3) and outputs.device == devices.HOST and len(moved) == 3


def test_bf16_is_chosen_for_the_runs_device_by_what_it_does(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_speedup", lambda: 2.4)  # AVX-512 BF16 or AMX
    assert recipe_config({"dataset": "text", "device": "cpu"}).precision == "bf16"
    monkeypatch.setattr(devices, "cpu_bf16_speedup", lambda: 0.3)  # emulated
    assert recipe_config({"dataset": "text", "device": "cpu"}).precision == "fp32"
    asked = []

    def current(device):
        asked.append(("device", device))
        return nullcontext()

    def supported(including_emulation=True):
        asked.append(("emulation", including_emulation))
        return False  # a V100 or T4: bf16 only emulated

    monkeypatch.setattr(torch.cuda, "device", current)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert devices.fast_bf16(torch.device("cuda", 1)) is False
    assert asked == [("device", torch.device("cuda", 1)), ("emulation", False)]


def test_host_copy_is_a_detached_host_copy():
    live = {"w": torch.ones(3, requires_grad=True), "nested": [torch.zeros(2)]}
    copied = devices.host_copy(live)
    live["w"].data.add_(1)
    assert torch.equal(copied["w"], torch.ones(3)) and not copied["w"].requires_grad
    assert copied["nested"][0].device == devices.HOST

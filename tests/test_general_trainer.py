"""The Trainer on any model, data and task: data kinds, batch structures, step styles, tasks,
budgets, callbacks and user optimizers, each checked on values (see docs/your-own-model.md)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainkit.loop.callbacks import Callback
from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError
from trainkit.tasks.base import StepOutput, Task
from trainkit.tasks.kinds import MultiLabel, NextToken, Regression
from trainkit.loop.trainer import Trainer

LOOP = dict(device="cpu", patience=0, clip_norm=None, schedule="constant", epochs=2, batch_size=16)


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{**LOOP, **overrides})


def classification_data(n: int = 96, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def small_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class PairDataset(Dataset):
    """Map-style samples in a chosen structure: tuple, nested tuple or dict."""

    def __init__(self, data: TensorDataset, kind: str) -> None:
        self.x, self.y = data.tensors
        self.kind = kind

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        x, y = self.x[index], self.y[index]
        if self.kind == "nested":
            return (x[:3], x[3:]), y
        if self.kind == "dict":
            return {"left": x[:3], "right": x[3:], "targets": y}
        return x, y


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_classifier()

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([left, right], dim=1))


# ------------------------------------------------------------------ data kinds
@pytest.mark.parametrize("kind", ["tensor_dataset", "dataset", "dataloader", "list_of_batches"])
def test_every_data_kind_trains_and_evaluates_to_the_same_weights(kind):
    """fit and evaluate take the same data; unshuffled kinds give identical steps."""
    data = classification_data()
    as_list = [(data.tensors[0][i : i + 16], data.tensors[1][i : i + 16]) for i in range(0, 96, 16)]
    inputs = {
        "tensor_dataset": data,
        "dataset": PairDataset(data, "tuple"),
        "dataloader": DataLoader(data, batch_size=16),
        "list_of_batches": as_list,
    }[kind]
    model = small_classifier()
    trainer = Trainer(model, config(epochs=1))
    history = trainer.fit(inputs, inputs)
    assert history[-1]["train_loss"] > 0 and 0 <= history[-1]["val_accuracy"] <= 1
    results = trainer.evaluate(inputs)
    assert results["accuracy"] == pytest.approx(history[-1]["val_accuracy"])
    if kind in ("dataloader", "list_of_batches"):  # both unshuffled, same batches: same updates
        reference = small_classifier()
        Trainer(reference, config(epochs=1)).fit(as_list)
        assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(reference)))


def test_anything_else_is_a_one_line_error_naming_the_accepted_kinds():
    trainer = Trainer(small_classifier(), config())
    with pytest.raises(ConfigError, match="int.*Dataset.*DataLoader") as error:
        trainer.fit(42)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------- batch structures
@pytest.mark.parametrize("kind", ["nested", "dict"])
def test_two_input_batches_train_exactly_like_one_concatenated_input(kind):
    data = classification_data()
    plain, two = small_classifier(), TwoInputs()
    loader = lambda k: DataLoader(PairDataset(data, k), batch_size=16)  # noqa: E731
    Trainer(plain, config()).fit(loader("tuple"))
    history = Trainer(two, config()).fit(loader(kind), loader(kind))
    assert all(torch.equal(a, b) for a, b in zip(weights(plain), weights(two.net)))
    assert "val_accuracy" in history[-1]


def test_micro_batch_splitting_cuts_every_tensor_of_a_dict_batch():
    from trainkit.data.runtime import split_batch

    batch = {"left": torch.arange(10).reshape(5, 2), "scale": torch.tensor(2.0), "name": "x", "targets": torch.arange(5)}
    pieces = split_batch(batch, 2)
    assert [len(p["targets"]) for p in pieces] == [2, 2, 1]
    assert torch.equal(torch.cat([p["left"] for p in pieces]), batch["left"])
    assert all(p["scale"] is batch["scale"] and p["name"] == "x" for p in pieces)


# ------------------------------------------------------------------ step styles
class OwnLoss(nn.Module):
    """A Hugging Face-style model: computes its loss when given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_classifier()

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(inputs)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


class DictOfInputsAndLabels(Dataset):
    def __init__(self, data: TensorDataset) -> None:
        self.x, self.y = data.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict:
        return {"inputs": self.x[index], "labels": self.y[index]}


@pytest.mark.parametrize("style", ["own_loss", "step_function"])
def test_a_model_returning_its_own_loss_and_a_step_function_match_the_default_step(style):
    """A Hugging Face-style model gets the batch's labels (its forward names them) and its loss is
    used; the same through a step function. Both train exactly like the default step."""
    data = classification_data()
    default, own = small_classifier(), OwnLoss()
    Trainer(default, config()).fit(DataLoader(data, batch_size=16))
    step = (lambda model, batch: model(**batch)) if style == "step_function" else None
    loader = DataLoader(DictOfInputsAndLabels(data), batch_size=16)
    history = Trainer(own, config(), step=step).fit(loader, loader)
    assert all(torch.equal(a, b) for a, b in zip(weights(default), weights(own.net)))
    if style == "own_loss":  # the logits it returned feed the metrics
        assert 0.0 < history[-1]["val_accuracy"] <= 1.0


def test_a_step_function_may_return_a_step_output_whose_outputs_feed_the_metrics():
    def step(model, batch):
        x, y = batch
        logits = model(x)
        return StepOutput(nn.functional.cross_entropy(logits, y), logits, y)

    task = Task(step=step, metrics=["accuracy"])
    history = Trainer(small_classifier(), config(), task=task).fit(classification_data(), classification_data(seed=1))
    assert 0.0 < history[-1]["train_accuracy"] <= 1.0 and "val_accuracy" in history[-1]


def test_a_step_function_returning_a_number_is_a_one_line_error():
    trainer = Trainer(small_classifier(), config(), step=lambda model, batch: 1.0)
    with pytest.raises(ConfigError, match="step function <lambda> returned float"):
        trainer.fit(classification_data())


# ----------------------------------------------------------------------- tasks
def test_regression_reports_mae_and_r2_and_no_accuracy(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(256, generator=generator)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    trainer = Trainer(model, config(epochs=20, lr=0.05), task="regression", out_dir=tmp_path)
    history = trainer.fit(TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:]))
    last = history[-1]
    assert "train_accuracy" not in last and last["val_r2"] > 0.98
    with torch.no_grad():
        predicted = model(x[200:]).squeeze(1)
    assert last["val_mae"] == pytest.approx((predicted - y[200:]).abs().mean().item(), rel=1e-5)
    header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["epoch", "train_loss", "train_mae", "train_r2", "val_loss", "val_mae"]


def test_regression_refuses_outputs_that_would_broadcast():
    trainer = Trainer(nn.Linear(4, 3), config(), task=Regression())
    with pytest.raises(ConfigError, match=r"outputs of shape \(16, 3\) do not match targets of shape \(16,\)"):
        trainer.fit(TensorDataset(torch.randn(32, 4), torch.randn(32)))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, transpose: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head, self.transpose = nn.Embedding(vocab, 8), nn.Linear(8, vocab), transpose

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.embed(ids))
        return logits.transpose(1, 2) if self.transpose else logits


def token_data(n: int = 64, length: int = 6, vocab: int = 11, pad_from: int | None = None) -> TensorDataset:
    """Next token = (token + 1) mod vocab: learnable from the current token alone."""
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    targets = (ids + 1) % vocab
    if pad_from is not None:
        targets[::2, pad_from:] = -100  # half the sequences are shorter: padding is ignored
    return TensorDataset(ids, targets)


def test_next_token_perplexity_is_exp_loss_and_token_accuracy_counts_real_tokens_only():
    trainer = Trainer(TinyLM(), config(epochs=10, lr=0.05), task=NextToken())
    history = trainer.fit(token_data(pad_from=3), token_data(pad_from=3))
    last = history[-1]
    assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]), rel=1e-9)
    assert last["val_token_accuracy"] > 0.9 and last["train_perplexity"] > 1
    ids, targets = token_data(pad_from=3).tensors
    with torch.no_grad():
        predicted = trainer.model(ids).argmax(-1)
    real = targets != -100
    assert last["val_token_accuracy"] == pytest.approx(((predicted == targets) & real).sum().item() / real.sum().item())


def test_next_token_refuses_vocab_on_dim_1_with_a_hint():
    trainer = Trainer(TinyLM(transpose=True), config(), task="next_token")
    with pytest.raises(ConfigError, match=r"\(batch, time, vocab\).*transpose\(1, 2\)"):
        trainer.fit(token_data())


def test_multilabel_exact_match_and_f1():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 5, generator=generator)
    y = torch.stack([x[:, 0] > 0, x[:, 1] > 0, x[:, 0] + x[:, 1] > 0], dim=1).float()
    torch.manual_seed(0)
    history = Trainer(nn.Linear(5, 3), config(epochs=30, lr=0.05), task=MultiLabel()).fit(TensorDataset(x, y), TensorDataset(x, y))
    assert history[-1]["val_exact_match"] > 0.8 and history[-1]["val_f1"] > 0.9


def test_a_function_and_a_torchmetrics_metric_appear_in_the_history():
    torchmetrics = pytest.importorskip("torchmetrics")

    def error_rate(outputs, targets):
        return (outputs.argmax(1) != targets).float().mean()

    metrics = {"accuracy": "accuracy", "error_rate": error_rate,
               "tm_accuracy": torchmetrics.classification.MulticlassAccuracy(num_classes=2, average="micro")}
    history = Trainer(small_classifier(), config(), metrics=metrics).fit(classification_data(), classification_data(seed=1))
    last = history[-1]
    assert last["val_error_rate"] == pytest.approx(1 - last["val_accuracy"])
    assert last["val_tm_accuracy"] == pytest.approx(last["val_accuracy"])


# ---------------------------------------------------- accumulation exactness
def test_accumulation_over_variable_length_batches_equals_one_big_batch():
    """Micro-batches of 1 and 27 real tokens (1 and 7 rows): the group's loss is the mean over all
    28 tokens, exactly as one batch holding both (not weighted by rows, nor the mean of means)."""
    ids, targets = token_data(n=8, length=6, pad_from=1).tensors  # rows alternate 1 and 6 real tokens
    first, second = (ids[:1], targets[:1]), (ids[1:8], targets[1:8])
    one_step = dict(epochs=1, lr=0.1, optimizer="sgd", momentum=0.0, weight_decay=0.0)
    accumulated, big = TinyLM(), TinyLM()
    Trainer(accumulated, config(accumulate=2, **one_step), task="next_token").fit([first, second])
    Trainer(big, config(**one_step), task="next_token").fit([(ids, targets)])
    for a, b in zip(weights(accumulated), weights(big)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    mean_of_means = TinyLM()
    torch.manual_seed(0)
    Trainer(mean_of_means, config(accumulate=2, **one_step),
            step=lambda model, batch: NextToken().step(model, batch), task=None).fit([first, second])  # fmt: skip
    assert not torch.allclose(weights(mean_of_means)[0], weights(big)[0], atol=1e-6), "weighting by rows would differ"


# ------------------------------------------------------------------ budgets
def test_max_steps_ends_mid_epoch_and_val_every_steps_adds_rows(tmp_path):
    trainer = Trainer(small_classifier(), config(max_steps=9, val_every_steps=4, epochs=None), out_dir=tmp_path)
    history = trainer.fit(classification_data(), classification_data(seed=1))  # 6 steps an epoch
    assert trainer.state.global_step == 9
    assert [(row["epoch"], row["step"]) for row in history] == [(1, 4), (1, 6), (2, 8), (2, 9)]
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["step"]) for r in rows] == [4, 6, 8, 9]
    assert trainer.scheduler.last_epoch == 9


# ---------------------------------------------------------------- callbacks
class Recorder(Callback):
    adds_metrics = ("val_twice_loss",)

    def __init__(self) -> None:
        self.norms, self.outputs = [], []

    def on_before_optimizer_step(self, state, grad_norm):
        self.norms.append(grad_norm.item())

    def on_batch_end(self, state, loss):
        self.outputs.append(state.step_output.outputs.shape)

    def on_validation_end(self, state):
        state.metrics["val_twice_loss"] = 2 * state.metrics["val_loss"]


def test_callbacks_see_the_gradient_norm_the_outputs_and_add_a_history_column(tmp_path):
    recorder = Recorder()
    trainer = Trainer(small_classifier(), config(monitor="val_twice_loss"), callbacks=[recorder], out_dir=tmp_path)
    history = trainer.fit(classification_data(), classification_data(seed=1))
    assert len(recorder.norms) == 12 and recorder.outputs[0] == (16, 2)
    assert sum(recorder.norms[:6]) / 6 == pytest.approx(history[0]["grad_norm"], rel=1e-5)
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert float(rows[-1]["val_twice_loss"]) == pytest.approx(2 * history[-1]["val_loss"])
    assert trainer.best_metric == pytest.approx(min(row["val_twice_loss"] for row in history))


class StopNow(Callback):
    def on_batch_end(self, state, loss):
        if state.global_step == 3:
            state.request_stop("enough", now=True)


def test_stop_now_ends_training_after_the_current_step_with_a_final_row():
    trainer = Trainer(small_classifier(), config(epochs=5), callbacks=[StopNow()])
    history = trainer.fit(classification_data(), classification_data(seed=1))
    assert trainer.state.global_step == 3 and len(history) == 1 and "val_loss" in history[0]


# --------------------------------------------------------- user optimizers
def test_a_user_optimizer_and_scheduler_are_used_as_given():
    model = small_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    trainer = Trainer(model, config(), optimizer=optimizer, scheduler=scheduler)
    history = trainer.fit(classification_data())
    assert trainer.optimizer is optimizer and scheduler.last_epoch == 12
    assert history[-1]["lr"] == pytest.approx(0.1 * 0.5**4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: dict(optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)), "holds none of the model's"),
        (lambda m: dict(optimizer="adam"), "must be a torch.optim.Optimizer, got str"),
        (lambda m: dict(optimizer=(o := torch.optim.SGD(m.parameters(), lr=0.1)),
                        scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(o)), "schedule='plateau'"),
    ],
)
def test_user_optimizer_mistakes_are_one_line_errors(make, message):
    model = small_classifier()
    with pytest.raises(ConfigError, match=message):
        Trainer(model, config(), **make(model))


def test_a_custom_model_gets_loop_defaults_not_the_mnist_recipe():
    trainer = Trainer(small_classifier(), TrainConfig(model="mine", device="cpu"))
    assert trainer.config.epochs == 10 and trainer.config.channels_last is False
    assert "model" not in trainer.state_dict()["config"] and "hidden" not in trainer.state_dict()["config"]


def test_a_monitor_the_task_does_not_produce_is_refused_before_training():
    trainer = Trainer(small_classifier(), config(monitor="val_r2"))
    with pytest.raises(ConfigError, match="--monitor 'val_r2' is not a metric of this run; choose one of val_loss"):
        trainer.fit(classification_data(), classification_data())


def test_wrong_types_at_the_trainer_are_one_line_errors():
    with pytest.raises(ConfigError, match="needs a torch.nn.Module as its model, got function"):
        Trainer(small_classifier, config())
    with pytest.raises(ConfigError, match="callbacks must be trainkit.Callback instances, got function"):
        Trainer(small_classifier(), config(), callbacks=[lambda state: None])


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, state, loss):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


TIMING = ("epoch_seconds", "samples_per_second")


def test_a_run_with_max_steps_and_val_every_steps_resumes_exactly_from_a_mid_epoch_checkpoint(tmp_path):
    """Killed at step 5 (after the step-4 validation point and its checkpoint), resumed from the
    newest checkpoint: the same rows, best epoch and final weights as the uninterrupted run."""
    from trainkit.checkpoint.store import CheckpointDir

    settings = config(max_steps=10, val_every_steps=4, epochs=None, checkpoint_every_steps=2)
    data, val = PairDataset(classification_data(), "dict"), classification_data(seed=1)
    full = Trainer(TwoInputs(), settings, out_dir=tmp_path / "full")
    full_history = full.fit(data, PairDataset(val, "dict"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(TwoInputs(), settings, out_dir=tmp_path / "crash", callbacks=[CrashAtStep(5)]).fit(data, PairDataset(val, "dict"))
    path, payload = CheckpointDir(tmp_path / "crash" / "checkpoints").newest_valid()
    assert payload["global_step"] == 4 and payload["position"]["validated"]
    resumed = Trainer(TwoInputs(), settings, out_dir=tmp_path / "crash")
    history = resumed.fit(data, PairDataset(val, "dict"), resume_from=path)
    strip = lambda rows: [{k: v for k, v in row.items() if k not in TIMING} for row in rows]  # noqa: E731
    assert strip(history) == strip(full_history) and [row["step"] for row in history] == [4, 6, 8, 10]
    assert resumed.best_epoch == full.best_epoch
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed.model), weights(full.model)))


def test_import_trainkit_is_light_and_the_trainer_does_not_load_the_mnist_recipe():
    import subprocess
    import sys

    recipe = ("trainkit.recipes", "trainkit.recipes.images", "trainkit.nn.models", "trainkit.nn.layers", "trainkit.nn.init")
    code = ("import sys, trainkit; assert 'torch' not in sys.modules; "
            "from trainkit import Trainer, TrainConfig, Callback, EarlyStopping; "
            f"loaded = [m for m in {recipe!r} if m in sys.modules]; assert not loaded, loaded; print(Trainer.__name__)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "Trainer", result.stderr


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Trainer(small_classifier(), config(), loss_fn=5), "loss_fn must be callable, got int"),
        (lambda: Trainer(small_classifier(), config(), task=5), "task must be a trainkit Task or one of classification"),
        (lambda: Trainer(small_classifier(), config(), task="ranking"), "--task must be one of classification, multilabel"),
        (lambda: Trainer(small_classifier(), config(), task=Regression(), loss_fn=nn.L1Loss()), "pass loss_fn to the Task"),
        (lambda: Trainer(small_classifier(), config(), metrics=5), "metrics must be a mapping of name -> metric"),
        (lambda: Trainer(small_classifier(), config(), metrics=["auc"]), "auc"),
        (lambda: TrainConfig(task="ranking").resolved(), "--task must be one of"),
        (lambda: TrainConfig(monitor="val_r2").resolved(), "--monitor 'val_r2' is not a metric of the run"),
        (lambda: TrainConfig(task="regression", monitor="val_r2", max_steps=0).resolved(), "--max-steps must be an integer >= 1"),
        (lambda: TrainConfig(model_args=[1]).resolved(), "--model-args must be a table of settings"),
    ],
)
def test_task_and_setting_mistakes_are_one_line_errors(make, message):
    with pytest.raises(ConfigError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "batch, message",
    [
        ((torch.randn(4, 6), torch.zeros(4, dtype=torch.long), torch.zeros(4)), "a batch tuple must be \\(inputs, targets\\), got 3"),
        ({"left": torch.randn(4, 3), "right": torch.randn(4, 3)}, "the batch has no targets and the model returned no loss"),
        ({"left": torch.randn(4, 3), "rigth": torch.randn(4, 3), "y": torch.zeros(4, dtype=torch.long)},
         "the model's forward does not take the batch's keys \\(left, rigth\\)"),
    ],
)
def test_batches_the_task_cannot_unpack_are_one_line_errors(batch, message):
    trainer = Trainer(TwoInputs() if isinstance(batch, dict) else small_classifier(), config())
    with pytest.raises(ConfigError, match=message):
        trainer.fit([batch])


def test_a_missing_target_key_and_an_unknown_loss_name_are_named():
    from trainkit.tasks.kinds import named_loss

    trainer = Trainer(small_classifier(), config(), task=Task(nn.CrossEntropyLoss(), target_key="label_ids"))
    with pytest.raises(ConfigError, match="the batch has no 'label_ids' \\(target_key\\); its keys: inputs, targets"):
        trainer.fit([{"inputs": torch.randn(4, 6), "targets": torch.zeros(4, dtype=torch.long)}])
    with pytest.raises(ConfigError, match="--loss 'Hubr' is not a torch.nn loss; choose one of .*HuberLoss"):
        named_loss("Hubr")
    assert isinstance(named_loss("HuberLoss"), nn.HuberLoss)


def test_dataclass_batches_are_split_by_field_and_train_like_tuples():
    import dataclasses

    @dataclasses.dataclass
    class Pair:
        left: torch.Tensor
        right: torch.Tensor
        labels: torch.Tensor

    x, y = classification_data().tensors
    as_tuples = [((x[i : i + 16, :3], x[i : i + 16, 3:]), y[i : i + 16]) for i in range(0, 96, 16)]
    as_dataclasses = [Pair(left, right, labels) for (left, right), labels in as_tuples]
    by_tuple, by_dataclass = TwoInputs(), TwoInputs()
    Trainer(by_tuple, config()).fit(as_tuples)
    history = Trainer(by_dataclass, config()).fit(as_dataclasses, as_dataclasses)
    assert all(torch.equal(a, b) for a, b in zip(weights(by_tuple), weights(by_dataclass)))
    assert "val_accuracy" in history[-1]


def test_the_configs_task_loss_and_metrics_build_the_trainers_task_when_none_is_given():
    trainer = Trainer(nn.Linear(4, 1), config(task="regression", loss="HuberLoss", metrics=["mae"]))
    assert isinstance(trainer.task, Regression) and isinstance(trainer.task.loss_fn, nn.HuberLoss)
    assert list(trainer.task.metric_specs) == ["mae"]
    assert isinstance(Trainer(nn.Linear(4, 1), config(task="regression"), task=MultiLabel()).task, MultiLabel)

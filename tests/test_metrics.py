"""trainkit.tasks.metrics: values by hand, accumulation, one reduce, no host sync, resume."""

from __future__ import annotations

import ast
import io
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from trainkit.tasks import metrics as metrics_module
from trainkit.errors import CheckpointError, ConfigError
from trainkit.tasks.metrics import (
    BUILTIN_METRICS, Accuracy, ExactMatch, F1Score, FunctionMetric, MeanAbsoluteError, MeanSquaredError, Metric, MetricSet, R2Score, TokenAccuracy, TorchMetric, as_metric,
)  # fmt: skip


@pytest.fixture
def torchmetrics():
    return pytest.importorskip("torchmetrics")


@pytest.fixture
def sklearn_metrics():
    return pytest.importorskip("sklearn.metrics")


def value(metric: Metric, *batches: tuple[torch.Tensor, torch.Tensor]) -> float:
    for outputs, targets in batches:
        metric.update(outputs, targets)
    return metric.compute(metric.sums(torch.device("cpu")))


def logits_for(classes: list[int], num_classes: int = 3) -> torch.Tensor:
    return F.one_hot(torch.tensor(classes), num_classes).float()


# 4 samples, 4 classes: true classes 0, 1, 2, 3; rows rank the classes as shown in comments
TOPK_OUTPUTS = torch.tensor([
    [0.9, 0.05, 0.03, 0.02],  # top1 0 (hit)
    [0.5, 0.3, 0.15, 0.05],  # top1 0, 2nd 1 (top-2 hit)
    [0.4, 0.3, 0.2, 0.1],  # class 2 is 3rd (top-3 hit)
    [0.1, 0.2, 0.3, 0.4],  # top1 3 (hit)
])  # fmt: skip
TOPK_TARGETS = torch.tensor([0, 1, 2, 3])

# multi-label logits (> 0 predicts positive) and targets
ML_OUTPUTS = torch.tensor([[2.0, -1.0, 3.0], [-2.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
ML_TARGETS = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
# predicted: [1,0,1] [0,1,0] [1,0,0] [0,0,0] -> rows 2 and 3 exact; TP 3, FP 1, FN 1


def test_accuracy_top1_topk_and_nan() -> None:
    assert value(Accuracy(), (TOPK_OUTPUTS, TOPK_TARGETS)) == 2 / 4
    assert value(Accuracy(top_k=2), (TOPK_OUTPUTS, TOPK_TARGETS)) == 3 / 4
    assert value(Accuracy(top_k=3), (TOPK_OUTPUTS, TOPK_TARGETS)) == 4 / 4
    assert math.isnan(value(Accuracy()))
    assert Accuracy().sums(torch.device("cpu")).tolist() == [0.0, 0.0]


def test_accuracy_ignore_index_and_spatial_outputs() -> None:
    targets = torch.tensor([0, -100, 2, 1])
    # predicted 0, 1, 2, 0: of the 3 counted targets, 2 are right
    assert value(Accuracy(ignore_index=-100), (logits_for([0, 1, 2, 0]), targets)) == 2 / 3
    # (N, C, d) segmentation-style: 2 images x 3 pixels, 6 targets, 4 right
    outputs = torch.stack([logits_for([0, 1, 2]).T, logits_for([2, 2, 1]).T])  # (2, 3 classes, 3 pixels)
    targets = torch.tensor([[0, 1, 0], [2, 0, 1]])
    assert outputs.shape == (2, 3, 3)
    assert value(Accuracy(), (outputs, targets)) == 4 / 6
    assert value(Accuracy(ignore_index=0), (outputs, targets)) == 3 / 3  # counted: 1, 2, 1 (all right)


def test_accuracy_shape_errors_are_one_line() -> None:
    long = torch.long
    for outputs, targets in [(torch.zeros(4, 3), torch.zeros(4, 1, dtype=long)),  # would broadcast to (4, 4)
                             (torch.zeros(4, 3), torch.zeros(4, 3)), (torch.zeros(4, 3), torch.zeros(5, dtype=long))]:
        with pytest.raises(ConfigError) as err:
            Accuracy().update(outputs, targets)
        assert "\n" not in str(err.value) and str(tuple(outputs.shape)) in str(err.value)
    with pytest.raises(ConfigError, match="top_k=5"):
        Accuracy(top_k=5).update(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError):
        Accuracy(top_k=0)


def test_mse_mae_against_torch_and_by_hand() -> None:
    outputs, targets = torch.tensor([[1.0], [2.0], [4.0], [0.0]]), torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert value(MeanSquaredError(), (outputs, targets)) == (0 + 1 + 4 + 0) / 4
    assert value(MeanAbsoluteError(), (outputs, targets)) == (0 + 1 + 2 + 0) / 4
    torch.manual_seed(0)
    a, b = torch.randn(7, 3), torch.randn(7, 3)
    assert value(MeanSquaredError(), (a, b)) == pytest.approx(F.mse_loss(a, b).item(), rel=1e-6)
    assert value(MeanAbsoluteError(), (a, b)) == pytest.approx(F.l1_loss(a, b).item(), rel=1e-6)
    with pytest.raises(ConfigError) as err:
        MeanSquaredError().update(torch.zeros(4, 2), torch.zeros(4))
    assert "(4, 2)" in str(err.value) and "(4,)" in str(err.value) and "\n" not in str(err.value)


def test_r2_by_hand_sklearn_pooling_and_nan(sklearn_metrics) -> None:
    r2_score = sklearn_metrics.r2_score
    y, pred = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 5.0])
    assert value(R2Score(), (pred, y)) == pytest.approx(1 - 1 / 5)  # SSE 1, SST 2.25+.25+.25+2.25
    torch.manual_seed(1)
    y = torch.randn(20) * 3 + 10
    pred = y + torch.randn(20)
    batches = [(pred[:7, None], y[:7]), (pred[7:], y[7:])]
    assert value(R2Score(), *batches) == pytest.approx(r2_score(y.double().numpy(), pred.double().numpy()), rel=1e-9)
    y2, pred2 = torch.randn(10, 2), torch.randn(10, 2)  # two outputs are pooled into one R²
    assert value(R2Score(), (pred2, y2)) == pytest.approx(r2_score(y2.reshape(-1).numpy(), pred2.reshape(-1).numpy()))
    assert math.isnan(value(R2Score()))
    assert math.isnan(value(R2Score(), (torch.tensor([1.0, 2.0, 3.0]), torch.full((3,), 0.1))))


def test_exact_match_and_f1_by_hand(sklearn_metrics) -> None:
    assert value(ExactMatch(), (ML_OUTPUTS, ML_TARGETS)) == 2 / 4
    assert value(F1Score(), (ML_OUTPUTS, ML_TARGETS)) == 2 * 3 / (2 * 3 + 1 + 1)
    pred = (ML_OUTPUTS > 0).int().numpy()
    assert value(F1Score(), (ML_OUTPUTS, ML_TARGETS.bool())) == pytest.approx(
        sklearn_metrics.f1_score(ML_TARGETS.numpy(), pred, average="micro"))
    # threshold 1.5: predicted [1,0,1] [0,0,0] [0,0,0] [0,0,0] -> rows 3 exact; TP 1 FP 1 FN 3
    assert value(ExactMatch(threshold=1.5), (ML_OUTPUTS, ML_TARGETS.float())) == 1 / 4
    assert value(F1Score(threshold=1.5), (ML_OUTPUTS, ML_TARGETS)) == 2 / (2 + 1 + 3)
    assert math.isnan(value(F1Score(), (-torch.ones(2, 3), torch.zeros(2, 3))))
    with pytest.raises(ConfigError, match=r"\(4, 3\).*\(4, 2\)"):
        ExactMatch().update(ML_OUTPUTS, ML_TARGETS[:, :2])


def test_token_accuracy() -> None:
    outputs = torch.stack([logits_for([0, 1, 2, 0]), logits_for([1, 1, 1, 1])])  # (B=2, T=4, V=3)
    targets = torch.tensor([[0, 2, 2, -100], [1, -100, -100, 0]])
    assert value(TokenAccuracy(), (outputs, targets)) == 3 / 5  # counted 0,2,2 | 1,0: right 0,2 | 1
    assert value(TokenAccuracy(ignore_index=0), (outputs, torch.tensor([[0, 1, 2, 0], [1, 0, 0, 2]]))) == 3 / 4
    with pytest.raises(ConfigError) as err:
        TokenAccuracy().update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    assert "(B, T, V)" in str(err.value) and "(2, 3)" in str(err.value) and "\n" not in str(err.value)


def test_function_metric_weights_by_rows_and_rejects_numbers() -> None:
    def mean_output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.mean()

    batches = [(torch.full((1, 2), 1.0), torch.zeros(1)), (torch.full((3, 2), 5.0), torch.zeros(3))]
    assert value(FunctionMetric(mean_output), *batches) == (1 * 1.0 + 3 * 5.0) / 4
    per_row = FunctionMetric(lambda o, t: o.sum(dim=1))  # a vector is averaged first
    assert value(per_row, *batches) == (1 * 2.0 + 3 * 10.0) / 4

    def as_number(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return 1.0

    with pytest.raises(ConfigError) as err:
        FunctionMetric(as_number).update(torch.zeros(2, 2), torch.zeros(2))
    assert "as_number" in str(err.value) and "float" in str(err.value) and "\n" not in str(err.value)


def test_torchmetric_matches_accuracy_and_restores(torchmetrics) -> None:
    torch.manual_seed(2)
    batches = [(torch.randn(n, 3), torch.randint(0, 3, (n,))) for n in (5, 8, 3)]
    wrapped = TorchMetric(torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro"))
    assert wrapped.width == 0 and wrapped.sums(torch.device("cpu")).shape == (0,)
    assert math.isnan(wrapped.compute(torch.zeros(0)))
    expected = value(Accuracy(), *batches)
    for outputs, targets in batches[:2]:
        wrapped.update(outputs, targets)
    saved = torch.load(_saved(wrapped.state_dict()), weights_only=True)
    wrapped.update(*batches[2])
    assert wrapped.compute(torch.zeros(0)) == pytest.approx(expected)
    restored = TorchMetric(torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro"))
    restored.load_state_dict(saved)
    restored.update(*batches[2])
    assert restored.compute(torch.zeros(0)) == pytest.approx(expected)
    restored.reset()
    assert math.isnan(restored.compute(torch.zeros(0)))


def test_as_metric_and_builtin_names(torchmetrics) -> None:
    acc = Accuracy()
    assert as_metric(acc) is acc
    assert isinstance(as_metric(torchmetrics.MeanSquaredError()), TorchMetric)
    assert isinstance(as_metric(lambda o, t: o.mean()), FunctionMetric)
    expected = {"accuracy": Accuracy, "top5_accuracy": Accuracy, "mse": MeanSquaredError, "mae": MeanAbsoluteError,
                "r2": R2Score, "exact_match": ExactMatch, "f1": F1Score, "token_accuracy": TokenAccuracy}
    assert set(BUILTIN_METRICS) == set(expected)
    for name, cls in expected.items():
        assert type(as_metric(name)) is cls
    assert as_metric("top5_accuracy").top_k == 5
    for bad, word in [(3, "int"), ("accurcy", "'accurcy'"), (None, "NoneType"), (Accuracy, "Accuracy()")]:
        with pytest.raises(ConfigError) as err:
            as_metric(bad)
        assert word in str(err.value) and "\n" not in str(err.value)


def test_metric_set_names() -> None:
    assert MetricSet({"acc": "accuracy", "val_2": Accuracy()}).names == ("acc", "val_2")
    for bad in ["", "val-acc", 3]:
        with pytest.raises(ConfigError):
            MetricSet({bad: "accuracy"})
    with pytest.raises(ConfigError):
        MetricSet(["accuracy"])


def everything() -> MetricSet:
    """One of each sum-based built-in, all updatable from the same (outputs, targets)."""
    return MetricSet({
        "acc": "accuracy", "top2": Accuracy(top_k=2), "acc_ign": Accuracy(ignore_index=1), "mse": "mse", "mae": "mae",
        "r2": "r2", "em": "exact_match", "f1": F1Score(threshold=0.1), "mean": FunctionMetric(lambda o, t: o.mean()),
        "tokens": TokenAccuracy(ignore_index=2),
    })  # fmt: skip


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3) outputs and n class ids (split_view turns them into one-hot targets where needed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def split_view(metrics: MetricSet, outputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Classification metrics see the labels (tokens: one sequence), the others one-hot targets."""
    one_hot = F.one_hot(labels, 3).float()
    for m in metrics.metrics.values():
        if isinstance(m, TokenAccuracy):
            m.update(outputs[None], labels[None])
        elif isinstance(m, (Accuracy, TorchMetric)):
            m.update(outputs, labels)
        else:
            m.update(outputs, one_hot)


def test_batches_of_different_sizes_equal_the_concatenated_data() -> None:
    batches = [batch(n, seed) for seed, n in enumerate((5, 1, 8, 3))]
    pieces, whole = everything(), everything()
    for outputs, labels in batches:
        split_view(pieces, outputs, labels)
    split_view(whole, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    got, want = pieces.results(), whole.results()
    assert got == pytest.approx(want, rel=1e-6)  # float32 batch sums differ in rounding only
    assert {k: got[k] for k in ("acc", "top2", "acc_ign", "em", "f1", "tokens")} == {  # counts: exact
        k: want[k] for k in ("acc", "top2", "acc_ign", "em", "f1", "tokens")}
    assert not any(math.isnan(v) for v in got.values())


def test_results_reduce_once_and_doubled_sums_keep_ratios(torchmetrics) -> None:
    metrics = everything()
    for seed, n in enumerate((6, 4)):
        split_view(metrics, *batch(n, seed))
    calls = []

    def double(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return t * 2

    assert metrics.results(double) == pytest.approx(metrics.results(), rel=1e-12)
    assert len(calls) == 1 and calls[0].dtype == torch.float64
    assert calls[0].shape == (sum(m.width for m in metrics.metrics.values()),)
    fresh = everything()  # never updated: one reduce still, every value NaN
    assert all(math.isnan(v) for v in fresh.results(double).values()) and len(calls) == 2
    def double_in_place(t: torch.Tensor) -> None:  # like torch.distributed.all_reduce
        t.mul_(2)

    in_place = metrics.results(double_in_place)
    assert in_place == pytest.approx(metrics.results(), rel=1e-12)
    only_torch = MetricSet({"tm": torchmetrics.MeanSquaredError()})
    only_torch.update(torch.ones(3), torch.zeros(3))
    assert only_torch.results(double) == {"tm": 1.0} and len(calls) == 2


def test_update_never_syncs_with_the_host() -> None:
    metrics, (outputs, labels) = everything(), batch(6, 0)
    others = [(TokenAccuracy(), torch.randn(2, 4, 3), torch.tensor([[0, 1, -100, 2], [1, 1, 0, -100]])),
              (R2Score(), torch.randn(5, 1), torch.randn(5)), (Accuracy(top_k=2, ignore_index=0), *batch(4, 1))]
    syncs = ["item", "tolist", "__bool__", "__float__", "__int__", "numpy"]
    patches = [mock.patch.object(torch.Tensor, name, side_effect=AssertionError(name)) for name in syncs]
    for p in patches:
        p.start()
    try:
        with pytest.raises(AssertionError):  # the patches do catch a sync
            bool(torch.ones(()))
        for _ in range(2):  # the first update creates the accumulators, the second adds in place
            split_view(metrics, outputs, labels)
            for m, o, t in others:
                m.update(o, t)
    finally:
        for p in patches:
            p.stop()
    assert metrics.results()["acc"] == value(Accuracy(), (outputs, labels))


def _saved(state: object) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_state_dict_round_trip_mid_epoch_is_exact(torchmetrics) -> None:
    def make() -> MetricSet:
        metrics = everything()
        tm = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
        return MetricSet({**metrics.metrics, "tm": tm})

    batches = [batch(n, seed) for seed, n in enumerate((7, 2, 5, 4))]

    def feed(metrics: MetricSet, part: list) -> None:
        for outputs, labels in part:
            split_view(metrics, outputs, labels)

    uninterrupted, first = make(), make()
    feed(uninterrupted, batches)
    feed(first, batches[:2])
    saved = first.state_dict()
    resumed = make()
    resumed.load_state_dict(torch.load(_saved(saved), weights_only=True))
    for name, m in resumed.metrics.items():
        if m.width:
            assert torch.equal(m.sums(torch.device("cpu")), saved[name])
    feed(resumed, batches[2:])
    assert resumed.results() == uninterrupted.results()  # exactly, not approximately
    with pytest.raises(CheckpointError, match="acc"):
        MetricSet({"other": "accuracy"}).load_state_dict(saved)
    with pytest.raises(CheckpointError):
        Accuracy().load_sums(torch.zeros(3))


def test_trainkit_never_imports_torchmetrics() -> None:
    """torchmetrics is optional: only looked up in sys.modules, never imported by trainkit."""
    tree = ast.parse(Path(metrics_module.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "torchmetrics"]
    with mock.patch.dict(sys.modules, {"torchmetrics": None}):
        assert isinstance(as_metric(lambda o, t: o.mean()), FunctionMetric)
        with pytest.raises(ConfigError, match="torchmetrics.Metric"):
            TorchMetric(object())

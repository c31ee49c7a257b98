"""EpochBatches for every kind of input: DatasetBatches, LoaderBatches and as_epoch_batches."""

from __future__ import annotations

import io
import logging
import pickle
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from trainkit.data.dataset import DatasetBatches, _SeededIndices, batch_seed
from trainkit.data.device import DeviceBatches
from trainkit.data.epochs import ACCEPTED_DATA, EpochBatches, as_epoch_batches
from trainkit.data.loader import LoaderBatches
from trainkit.errors import CheckpointError, ConfigError


# ---------------------------------------------------------------------------- datasets


class Noisy(Dataset):
    """Sample i is (i + noise, i): noise drawn from torch's global RNG, like random augmentation."""

    def __init__(self, n: int = 30, noise: bool = True) -> None:
        self.n, self.noise = n, noise

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = torch.full((2,), float(i))
        if self.noise:
            x = x + torch.rand(2)
        return x, i


class AllRngs(Noisy):
    """Draws from torch, random and numpy."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x + random.random() + float(np.random.rand()), y


class Rows(Dataset):
    """A plain (non-Tensor) Dataset over two tensors, to compare with DeviceBatches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Dicts(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return {"x": torch.tensor([float(i)]), "label": i}


class Batched(Noisy):
    """A dataset with its own batched fetch; counts its calls."""

    def __init__(self, n: int = 30) -> None:
        super().__init__(n)
        self.calls = 0

    def __getitems__(self, indices: list[int]):
        self.calls += 1
        assert type(indices) is list
        return [self[i] for i in indices]


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.arange(10.0))


class SizedStream(Stream):
    def __len__(self) -> int:
        return 10


class DatasetLike:
    """Not a torch Dataset, but map-style (like a Hugging Face dataset)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.tensor(float(i))


def same(a, b) -> bool:
    """Batches equal exactly: nested lists/tuples/dicts of tensors and ints."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def rng_equal(a, b) -> bool:
    return (
        torch.equal(a[0], b[0])
        and a[1] == b[1]
        and a[2][0] == b[2][0]
        and np.array_equal(a[2][1], b[2][1])
        and a[2][2:] == b[2][2:]
    )


# ---------------------------------------------------------------------------- DatasetBatches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataset_resume_is_the_tail_with_random_augmentation(num_workers):
    batches = DatasetBatches(Noisy(), 4, seed=3, num_workers=num_workers)
    full = list(batches.epoch(1))
    assert len(full) == len(batches) == 8
    xs = torch.cat([b[0] for b in full])
    assert not torch.equal(xs, xs.round())  # the noise is really there
    assert sorted(torch.cat([b[1] for b in full]).tolist()) == list(range(30))  # each sample once
    assert torch.cat([b[1] for b in full]).tolist() != list(range(30))  # shuffled
    for k in (1, 5, 8):
        assert same_batches(list(batches.epoch(1, k)), full[k:])


def test_dataset_augmentation_does_not_depend_on_num_workers():
    serial = list(DatasetBatches(Noisy(), 4, seed=3).epoch(2))
    parallel = list(DatasetBatches(Noisy(), 4, seed=3, num_workers=2).epoch(2))
    assert same_batches(serial, parallel)


def test_dataset_epochs_differ_and_are_a_function_of_seed_and_epoch():
    a, b = DatasetBatches(Noisy(), 5, seed=1), DatasetBatches(Noisy(), 5, seed=1)
    assert same_batches(list(a.epoch(4)), list(b.epoch(4)))
    assert not same(list(a.epoch(4))[0][1], list(a.epoch(5))[0][1])  # another order
    assert not same_batches(list(a.epoch(4)), list(DatasetBatches(Noisy(), 5, seed=2).epoch(4)))
    # unshuffled: the same order every epoch, but fresh augmentation each epoch
    plain = DatasetBatches(Noisy(), 5, shuffle=False)
    e0, e1 = list(plain.epoch(0)), list(plain.epoch(1))
    assert torch.cat([b[1] for b in e0]).tolist() == list(range(30))
    assert same([b[1] for b in e0], [b[1] for b in e1]) and not same(e0[0][0], e1[0][0])


def test_dataset_leaves_the_loops_rngs_alone_and_numpys_a_function_of_the_batch():
    """torch's and Python's streams (dropout, the user's code) are restored after each fetch;
    numpy's global state is left as the last batch's seeded stream: deterministic, not restored."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = rng_states()
    batches = list(DatasetBatches(AllRngs(), 4, seed=9).epoch(0))
    assert len(batches) == 8
    after = rng_states()
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    np.random.seed(5)
    list(DatasetBatches(AllRngs(), 4, seed=9).epoch(0))
    assert rng_equal(after, rng_states()), "numpy's state after the epoch depends on (seed, epoch, batch) only"
    # and the samples do not depend on the global state either
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    assert same_batches(batches, list(DatasetBatches(AllRngs(), 4, seed=9).epoch(0)))


@pytest.mark.parametrize("n, lockstep", [(21, True), (21, False), (24, True)])
def test_dataset_shards_like_device_batches(n, lockstep):
    x, y = torch.randn(n, 3), torch.arange(n)
    per_rank = []
    for rank in range(2):
        shard = dict(seed=5, rank=rank, world_size=2, lockstep=lockstep)
        ours = DatasetBatches(Rows(x, y), 4, **shard)
        device = DeviceBatches(x, y, 4, **shard)
        assert len(ours) == len(device)
        assert [ours.global_samples(b, 2) for b in range(len(ours))] == [
            device.global_samples(b, 2) for b in range(len(ours))
        ]
        got = list(ours.epoch(3))
        assert same_batches(got, list(device.epoch(3)))
        per_rank.append(got)
    # rank 0 then rank 1 of each global batch is the single-process global batch, in order
    single = list(DatasetBatches(Rows(x, y), 4, seed=5, lockstep=lockstep).epoch(3))
    r0, r1 = per_rank
    if not lockstep and n % 4 == 1:  # the last global batch has 1 sample: rank 1 skips it
        assert len(r1) == len(r0) - 1
        r1 = r1 + [(x[:0], y[:0])]
    joined = [torch.cat([a[1], b[1]]) for a, b in zip(r0, r1)]
    assert same(joined, [b[1] for b in single[: len(joined)]])
    ids0, ids1 = torch.cat([b[1] for b in r0]), torch.cat([b[1] for b in r1])
    assert not set(ids0.tolist()) & set(ids1.tolist())
    expected = n if not lockstep else n - (n % 4 if n % 4 < 2 else 0)
    assert len(ids0) + len(ids1) == expected


def test_dataset_collates_dict_samples_into_dict_batches():
    batches = list(DatasetBatches(Dicts(), 4, shuffle=False).epoch(0))
    assert [sorted(b) for b in batches] == [["label", "x"]] * 3
    assert batches[0]["x"].shape == (4, 1)
    assert batches[-1]["label"].tolist() == [8, 9]


def test_dataset_custom_collate():
    batches = DatasetBatches(Noisy(noise=False), 8, shuffle=False, collate_fn=lambda samples: len(samples))
    assert list(batches.epoch(0)) == [8, 8, 8, 6]


def test_dataset_drop_last_and_len():
    assert len(DatasetBatches(Noisy(), 4)) == 8
    dropped = DatasetBatches(Noisy(), 4, drop_last=True)
    assert len(dropped) == 7
    batches = list(dropped.epoch(0))
    assert len(batches) == 7 and all(len(b[1]) == 4 for b in batches)
    assert dropped.global_samples(6, 1) == 4 and DatasetBatches(Noisy(), 4).global_samples(7, 1) == 2
    assert list(dropped.epoch(0, 7)) == []


def test_dataset_uses_the_datasets_own_getitems_after_seeding():
    data = Batched()
    batches = DatasetBatches(data, 4, seed=2)
    full = list(batches.epoch(0))
    assert data.calls == 8
    assert same_batches(list(batches.epoch(0, 3)), full[3:])
    assert data.calls == 8 + 5  # skipped batches are never fetched
    assert same_batches(full, list(DatasetBatches(Noisy(), 4, seed=2).epoch(0)))


def test_seeded_indices_keep_their_seed_through_pickle():
    indices = _SeededIndices([3, 1, 2], 12345)
    back = pickle.loads(pickle.dumps(indices))
    assert back == [3, 1, 2] and back.seed == 12345 and isinstance(back, list)
    assert batch_seed(0, 1, 2) != batch_seed(0, 1, 3) != batch_seed(0, 2, 2)
    assert batch_seed(0, 1, 2, rank=0, world_size=2) != batch_seed(0, 1, 2, rank=1, world_size=2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DatasetBatches(object(), 4), "needs a map-style Dataset"),
        (lambda: DatasetBatches(Stream(), 4), "Stream is an IterableDataset"),
        (lambda: DatasetBatches(Noisy(n=0), 4), "is empty"),
        (lambda: DatasetBatches(Noisy(), 0), "batch_size must be a positive integer, got 0"),
        (lambda: DatasetBatches(Noisy(), 2.0), "batch_size must be a positive integer, got 2.0"),
        (lambda: DatasetBatches(Noisy(), True), "batch_size must be a positive integer, got True"),
        (lambda: DatasetBatches(Noisy(), 4, num_workers=-1), "num_workers must be an integer >= 0, got -1"),
        (lambda: DatasetBatches(Noisy(), 4, num_workers=1.5), "num_workers must be an integer >= 0, got 1.5"),
        (lambda: DatasetBatches(Noisy(), 4, rank=2, world_size=2), "rank must be in 0..1, got 2"),
        (lambda: DatasetBatches(Noisy(), 4, collate_fn=3), "collate_fn must be callable"),
        (lambda: DatasetBatches(Noisy(), 4).epoch(0, 9), "start_batch must be in 0..8, got 9"),
    ],
)
def test_dataset_errors(make, message):
    with pytest.raises(ConfigError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- LoaderBatches


def test_loader_replay_yields_the_tail_and_warns_once(caplog):
    loader = DataLoader(Noisy(noise=False), batch_size=4)
    batches = LoaderBatches(loader)
    assert not batches.exact_resume and batches.state_dict() == {}
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        full = list(batches.epoch(0))
        assert caplog.records == []  # start_batch 0 logs nothing
        assert same_batches(list(batches.epoch(0, 3)), full[3:])
        assert same_batches(list(batches.epoch(1, 6)), full[6:])
    warnings = [r for r in caplog.records if r.name == "trainkit"]
    assert len(warnings) == 1
    assert "replays and discards its first 3 batches" in warnings[0].getMessage()
    assert "StatefulDataLoader" in warnings[0].getMessage()


def make_stateful(num_workers: int = 0, noise: bool = False, generator: bool = False) -> StatefulDataLoader:
    torch.manual_seed(123)  # its RandomSampler seeds itself from the global RNG when built
    return StatefulDataLoader(
        Noisy(n=26, noise=noise), batch_size=4, shuffle=True, num_workers=num_workers,
        generator=torch.Generator().manual_seed(7) if generator else None,
    )


def uninterrupted(k: int, **construction):
    """Two epochs, with the global RNG state and LoaderBatches state saved after k batches of epoch 0."""
    batches = LoaderBatches(make_stateful(**construction))
    epoch0, saved = [], None
    for i, batch in enumerate(batches.epoch(0)):
        epoch0.append(batch)
        if i + 1 == k:
            saved = (roundtrip(batches.state_dict()), rng_states())
    end_rng = rng_states()
    return epoch0, list(batches.epoch(1)), saved, end_rng


def resumed(k: int, saved, **construction):
    state, rng = saved
    batches = LoaderBatches(make_stateful(**construction))  # a new run: new loader, same construction
    batches.load_state_dict(state)
    torch.set_rng_state(rng[0])  # what the trainer restores from the checkpoint
    random.setstate(rng[1])
    np.random.set_state(rng[2])
    rest = list(batches.epoch(0, k))
    return batches, rest, rng_states(), list(batches.epoch(1))


@pytest.mark.parametrize("generator", [False, True])
@pytest.mark.parametrize("noise", [False, True])
def test_stateful_loader_resumes_exactly_mid_epoch(generator, noise):
    construction = dict(generator=generator, noise=noise)
    epoch0, epoch1, saved, end_rng = uninterrupted(3, **construction)
    assert len(epoch0) == 7
    batches, rest, rng_after, next_epoch = resumed(3, saved, **construction)
    assert batches.exact_resume
    assert same_batches(rest, epoch0[3:])
    assert rng_equal(rng_after, end_rng)  # the loop's random stream continues as if never stopped
    assert same_batches(next_epoch, epoch1)
    assert not same(epoch0[0][1], epoch1[0][1])  # and epochs do differ


def test_stateful_loader_state_taken_at_the_end_of_an_epoch():
    epoch0, epoch1, saved, _ = uninterrupted(7)
    assert saved[0]["done"] and saved[0]["batches"] == 7
    # the trainer resumes an end-of-epoch checkpoint with the next epoch from batch 0
    batches = LoaderBatches(make_stateful())
    batches.load_state_dict(saved[0])
    torch.set_rng_state(saved[1][0])
    assert same_batches(list(batches.epoch(1)), epoch1)
    # or with epoch(0, 7): nothing left of epoch 0, then epoch 1 as usual
    batches = LoaderBatches(make_stateful())
    batches.load_state_dict(saved[0])
    assert list(batches.epoch(0, 7)) == []
    assert same_batches(list(batches.epoch(1)), epoch1)


def test_stateful_loader_that_ran_dry():
    # steps_per_epoch longer than the loader: the pass ends early, torchdata marks it finished
    batches = LoaderBatches(make_stateful(), steps_per_epoch=9)
    epoch0 = list(batches.epoch(0))
    state = roundtrip(batches.state_dict())
    assert len(epoch0) == 7 and state["done"] and state["loader"]["_iterator_finished"]
    epoch1 = list(batches.epoch(1))
    again = LoaderBatches(make_stateful(), steps_per_epoch=9)
    again.load_state_dict(state)
    assert same_batches(list(again.epoch(1)), epoch1)


def test_stateful_loader_with_workers_restores_order_but_not_augmentation(caplog):
    epoch0, epoch1, saved, _ = uninterrupted(3, num_workers=2, noise=True)
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        batches, rest, _, next_epoch = resumed(3, saved, num_workers=2, noise=True)
    assert not batches.exact_resume
    assert same([b[1] for b in rest], [b[1] for b in epoch0[3:]])  # the order is exact
    # torchdata 0.11 restarts the workers' RNG at their base seed: the augmentation of the
    # remaining batches differs. If this starts failing, torchdata now restores it.
    assert not same([b[0] for b in rest], [b[0] for b in epoch0[3:]])
    assert same_batches(next_epoch, epoch1)  # fresh workers, same base seed: the next epoch matches
    assert any("random augmentation" in r.getMessage() for r in caplog.records)


def test_stateful_loader_state_is_checked():
    batches = LoaderBatches(make_stateful())
    list(batches.epoch(0))
    state = batches.state_dict()
    other = LoaderBatches(make_stateful())
    other.load_state_dict(state)
    with pytest.raises(CheckpointError, match="7 batches into epoch 0, but the run resumes at batch 2 of epoch 0"):
        list(other.epoch(0, 2))
    with pytest.raises(CheckpointError, match="lacks loader"):
        other.load_state_dict({"loader": {}})
    with pytest.raises(CheckpointError, match="the data is a list: resume with the loader"):
        LoaderBatches([1, 2]).load_state_dict(state)


def test_loader_sets_the_samplers_epoch():
    data = Noisy(n=20, noise=False)
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0)
    batches = LoaderBatches(DataLoader(data, batch_size=5, sampler=sampler))
    assert len(batches) == 2
    e2 = list(batches.epoch(2))
    assert sampler.epoch == 2
    e3 = list(batches.epoch(3))
    assert sampler.epoch == 3 and not same(e2, e3)
    assert same_batches(list(batches.epoch(2)), e2)


def test_loader_over_a_generator_with_steps_per_epoch():
    batches = LoaderBatches((torch.tensor([i]) for i in range(10)), steps_per_epoch=4)
    assert len(batches) == 4
    epochs = [[int(b) for b in batches.epoch(n)] for n in range(4)]
    assert epochs == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], []]  # ran dry: short, then empty


def test_loader_stops_after_len_batches():
    batches = LoaderBatches([torch.tensor([i]) for i in range(10)], steps_per_epoch=3)
    assert [[int(b) for b in batches.epoch(n)] for n in range(2)] == [[0, 1, 2], [0, 1, 2]]


def test_loader_without_length():
    batches = LoaderBatches(x for x in range(3))
    with pytest.raises(ConfigError, match="has no length: give max_steps / steps_per_epoch") as info:
        len(batches)
    assert "\n" not in str(info.value)
    assert list(batches.epoch(0)) == [0, 1, 2]  # one pass, however long
    with pytest.raises(ConfigError, match="steps_per_epoch must be a positive integer"):
        LoaderBatches([1], steps_per_epoch=0)
    with pytest.raises(ConfigError, match="needs an iterable of batches"):
        LoaderBatches(3)


# ---------------------------------------------------------------------------- as_epoch_batches


def test_dispatch_of_every_kind():
    x, y = torch.randn(12, 3), torch.arange(12)
    device = DeviceBatches(x, y, 4)
    assert as_epoch_batches(device, batch_size=99) is device
    assert isinstance(device, EpochBatches) and device.exact_resume

    fast = as_epoch_batches(TensorDataset(x, y), batch_size=4, seed=2, rank=1, world_size=2)
    assert isinstance(fast, DeviceBatches) and (fast.rank, fast.world_size, fast.seed) == (1, 2, 2)
    assert same_batches(list(fast.epoch(0)), list(DeviceBatches(x, y, 4, seed=2, rank=1, world_size=2).epoch(0)))
    assert isinstance(as_epoch_batches(TensorDataset(x), batch_size=4), DatasetBatches)
    assert isinstance(as_epoch_batches(TensorDataset(x, y, y), batch_size=4), DatasetBatches)

    mapped = as_epoch_batches(Noisy(), batch_size=4, seed=3, num_workers=0)
    assert isinstance(mapped, DatasetBatches) and isinstance(mapped, EpochBatches) and len(mapped) == 8
    assert isinstance(as_epoch_batches(DatasetLike(), batch_size=4), DatasetBatches)

    loader = as_epoch_batches(DataLoader(Noisy(), batch_size=10), batch_size=4)
    assert isinstance(loader, LoaderBatches) and len(loader) == 3 and not loader.exact_resume
    stateful = as_epoch_batches(make_stateful(), batch_size=4)
    assert isinstance(stateful, LoaderBatches) and stateful.exact_resume

    stream = as_epoch_batches(SizedStream(), batch_size=4)
    assert isinstance(stream, LoaderBatches) and len(stream) == 3
    assert [b.tolist() for b in stream.epoch(0)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    endless = as_epoch_batches(Stream(), batch_size=3, steps_per_epoch=2)
    assert len(endless) == 2 and [b.tolist() for b in endless.epoch(0)] == [[0, 1, 2], [3, 4, 5]]

    listed = as_epoch_batches([(x[:4], y[:4]), (x[4:], y[4:])], batch_size=4)
    assert isinstance(listed, LoaderBatches) and len(listed) == 2
    generated = as_epoch_batches((b for b in range(5)), batch_size=4, steps_per_epoch=5)
    assert isinstance(generated, LoaderBatches) and list(generated.epoch(0)) == [0, 1, 2, 3, 4]


def test_dispatch_under_ddp():
    data = Noisy(n=20, noise=False)
    with pytest.raises(ConfigError, match="pass the Dataset itself .* or use a DistributedSampler") as info:
        as_epoch_batches(DataLoader(data, batch_size=4), batch_size=4, rank=0, world_size=2)
    assert "\n" not in str(info.value)
    sampler = DistributedSampler(data, num_replicas=2, rank=1)
    assert isinstance(as_epoch_batches(DataLoader(data, sampler=sampler), batch_size=4, rank=1, world_size=2), LoaderBatches)
    sharded = as_epoch_batches(data, batch_size=4, rank=1, world_size=2)
    assert isinstance(sharded, DatasetBatches) and sharded.rank == 1


@pytest.mark.parametrize(
    "data, name",
    [(3, "int"), (None, "NoneType"), ("data.csv", "str"), (torch.zeros(4, 2), "Tensor"), ({"x": 1}, "dict")],
)
def test_dispatch_rejects_what_is_not_data(data, name):
    with pytest.raises(ConfigError) as info:
        as_epoch_batches(data, batch_size=4)
    message = str(info.value)
    assert message.startswith(f"cannot train on {name}")
    assert all(kind in message for kind in ACCEPTED_DATA) and "\n" not in message

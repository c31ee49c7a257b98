"""Tests for trainkit.data.idx and trainkit.recipes.images: IDX parsing, dataset resolution, downloads, splits and batching.

No test touches the network: an autouse fixture points every registry mirror at a
non-existent file:// folder and the cache at tmp_path.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trainkit.data import idx
from trainkit.recipes import images
from trainkit.choices import DATASET_NAMES
from trainkit.data.device import DeviceBatches, shift_images
from trainkit.data.idx import download_file, read_idx
from trainkit.recipes.images import default_cache_dir, find_dataset_dir, load_dataset
from trainkit.errors import ConfigError, DataError

SHARED_DATASETS = Path(__file__).parents[1].parent / "shared/datasets"
SHARED_MNIST = SHARED_DATASETS / "mnist"
needs_shared_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"shared MNIST copy not found at {SHARED_MNIST}",
)

FILE_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, *, gz: bool = False, type_code: int = 0x08) -> bytes:
    """Serialise ``array`` as IDX (big-endian header), optionally gzip-compressed."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    return gzip.compress(raw) if gz else raw


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    path.write_bytes(idx_bytes(array, gz=gz))
    return path


def write_tiny_dataset(folder: Path, n_train: int = 40, n_test: int = 10, seed: int = 0) -> Path:
    """Four gzip IDX files shaped like MNIST; pixel (0, 0)/(0, 1) encode the sample index."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        images[:, 0, 1] = np.arange(n) // 256
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def sample_ids(x: torch.Tensor, mean: float, std: float) -> list[int]:
    """Recover the sample indices encoded by write_tiny_dataset from normalised images."""
    pixels = torch.round((x[:, 0, 0, :2].double() * std + mean) * 255).long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Isolate every test from the user's cache, env vars and the network."""
    monkeypatch.setenv("TRAINKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRAINKIT_DATA_DIR", raising=False)
    monkeypatch.delenv("TRAINKIT_OFFLINE", raising=False)  # safe: every mirror is a local file:// folder
    dead_mirror = (tmp_path / "no-such-mirror").as_uri() + "/"
    for name, spec in list(images.IDX_DATASETS.items()):
        monkeypatch.setitem(images.IDX_DATASETS, name, dataclasses.replace(spec, mirrors=(dead_mirror,)))
    monkeypatch.setattr(idx.time, "sleep", lambda seconds: None)
    # These tensors are tiny: one thread avoids intra-op thread-pool overhead, which on a
    # busy 2-core machine made the training test 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------------------------

ARRAY = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_parses_values_and_shape(tmp_path, gz):
    path = write_idx(tmp_path / "a.idx", ARRAY, gz=gz)
    tensor = read_idx(path)
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (2, 3, 4)
    assert tensor.tolist() == ARRAY.tolist()
    tensor[0, 0, 0] = 99  # writable, not a view of read-only bytes


def test_read_idx_detects_gzip_by_magic_not_extension(tmp_path):
    raw_named_gz = tmp_path / "raw.gz"
    raw_named_gz.write_bytes(idx_bytes(ARRAY))
    gz_named_raw = tmp_path / "compressed.idx"
    gz_named_raw.write_bytes(idx_bytes(ARRAY, gz=True))
    assert read_idx(raw_named_gz).tolist() == ARRAY.tolist()
    assert read_idx(gz_named_raw).tolist() == ARRAY.tolist()


def test_read_idx_one_dimensional(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert read_idx(write_idx(tmp_path / "l.gz", labels)).tolist() == [3, 1, 4, 1, 5]


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_names_file_and_byte_counts(tmp_path, gz):
    path = tmp_path / "short-images.idx"
    raw = idx_bytes(ARRAY)[:-1]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert "short-images.idx" in message
    assert "truncated" in message
    assert "expects 24 data bytes, found 23" in message


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(ARRAY) + b"\x00\x00")
    with pytest.raises(DataError, match=r"long\.idx.*2 trailing bytes.*expects 24 data bytes, found 26"):
        read_idx(path)


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    with pytest.raises(DataError, match=r"picture\.png: wrong magic number 0x89504E47, not an IDX file"):
        read_idx(path)


def test_read_idx_unsupported_type_code(tmp_path):
    path = tmp_path / "floats.idx"
    path.write_bytes(idx_bytes(ARRAY, type_code=0x0D))
    with pytest.raises(DataError, match=r"floats\.idx: unsupported IDX type code 0x0D \(float\)"):
        read_idx(path)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\x00\x00", "header too short"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (b"\x00\x00\x08\x05" + b"\x00\x00\x00\x01" * 5 + b"\x00", "declares 5 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "header too short"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x00", "zero-sized dimension"),
    ],
)
def test_read_idx_bad_headers(tmp_path, content, expected):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as info:
        read_idx(path)
    assert "bad.idx" in str(info.value)


def test_read_idx_corrupt_gzip(tmp_path):
    good = idx_bytes(np.arange(4000, dtype=np.uint32).astype(np.uint8), gz=True)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.gz: corrupt or truncated gzip"):
        read_idx(cut)
    garbled = bytearray(good)
    garbled[12:40] = b"\xff" * 28
    mangled = tmp_path / "mangled.gz"
    mangled.write_bytes(bytes(garbled))
    with pytest.raises(DataError, match=r"mangled\.gz: corrupt or truncated gzip"):
        read_idx(mangled)


def test_read_idx_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="nope.gz: file not found"):
        read_idx(tmp_path / "nope.gz")
    with pytest.raises(DataError, match="is a directory"):
        read_idx(tmp_path)


# ---------------------------------------------------------------------------------------------
# load_dataset on small files
# ---------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        load_dataset("cifar10")
    for name in DATASET_NAMES:
        assert name in str(info.value)


def test_load_tiny_dataset_shapes_dtypes_and_normalisation(tmp_path):
    folder = write_tiny_dataset(tmp_path / "tiny", n_train=40, n_test=10)
    splits = load_dataset("mnist", folder, val_size=8, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (32, 8, 10)
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    assert tuple(splits.train.x.shape) == (32, 1, 28, 28)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    # statistics come from the training portion only
    raw = read_idx(folder / "train-images-idx3-ubyte.gz").double() / 255
    train_ids = sample_ids(splits.train.x, splits.mean, splits.std)
    assert splits.mean == pytest.approx(raw[train_ids].mean().item(), abs=1e-9)
    assert splits.std == pytest.approx(raw[train_ids].std(correction=0).item(), abs=1e-9)
    assert splits.train.x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert splits.train.x.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    # the same normalisation is applied to test; labels pass through unchanged
    expected_test = ((read_idx(folder / "t10k-images-idx3-ubyte.gz").double() / 255 - splits.mean) / splits.std)
    assert torch.allclose(splits.test.x[:, 0].double(), expected_test, atol=1e-5)
    assert splits.test.y.tolist() == [i % 10 for i in range(10)]


def test_split_partitions_training_set_and_depends_on_seed(tmp_path):
    folder = write_tiny_dataset(tmp_path / "tiny", n_train=40)
    a = load_dataset("mnist", folder, val_size=10, seed=1)
    b = load_dataset("mnist", folder, val_size=10, seed=1)
    c = load_dataset("mnist", folder, val_size=10, seed=2)
    ids_train, ids_val = sample_ids(a.train.x, a.mean, a.std), sample_ids(a.val.x, a.mean, a.std)
    assert sorted(ids_train + ids_val) == list(range(40))
    assert a.val.y.tolist() == [i % 10 for i in ids_val]
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert set(sample_ids(c.val.x, c.mean, c.std)) != set(ids_val)


def test_val_size_bounds(tmp_path):
    folder = write_tiny_dataset(tmp_path / "tiny", n_train=20)
    empty = load_dataset("mnist", folder, val_size=0)
    assert len(empty.val) == 0 and tuple(empty.val.x.shape) == (0, 1, 28, 28)
    assert sample_ids(empty.train.x, empty.mean, empty.std) == list(range(20))
    for bad in (-1, 20, 25):
        with pytest.raises(ConfigError, match="val_size"):
            load_dataset("mnist", folder, val_size=bad)


def test_images_labels_count_mismatch_names_both_files(tmp_path):
    folder = write_tiny_dataset(tmp_path / "tiny", n_train=20)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", folder, val_size=2)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "train-labels-idx1-ubyte.gz" in message
    assert "20 images" in message and "19 labels" in message


def test_label_out_of_range(tmp_path):
    folder = write_tiny_dataset(tmp_path / "tiny", n_train=20)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([0] * 9 + [12], dtype=np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: label value 12"):
        load_dataset("mnist", folder, val_size=2)


def test_image_file_with_wrong_rank(tmp_path):
    folder = write_tiny_dataset(tmp_path / "tiny", n_train=20)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((20, 784), dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: expected a 3-D image file"):
        load_dataset("mnist", folder, val_size=2)


def test_decompressed_files_are_accepted(tmp_path):
    folder = write_tiny_dataset(tmp_path / "tiny", n_train=20)
    for name in FILE_NAMES:
        gz_path = folder / name
        gz_path.with_suffix("").write_bytes(gzip.decompress(gz_path.read_bytes()))
        gz_path.unlink()
    assert len(load_dataset("mnist", folder, val_size=2).train) == 18


def test_bad_device_is_config_error(tmp_path):
    folder = write_tiny_dataset(tmp_path / "tiny", n_train=20)
    with pytest.raises(ConfigError, match="device"):
        load_dataset("mnist", folder, val_size=2, device="not-a-device")


# ---------------------------------------------------------------------------------------------
# real MNIST (shared read-only copy)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"shared MNIST copy not found at {SHARED_MNIST}")
    return load_dataset("mnist", SHARED_DATASETS, seed=0)


@needs_shared_mnist
def test_real_mnist_splits(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (55000, 5000, 10000)
    assert tuple(mnist.train.x.shape[1:]) == (1, 28, 28) and mnist.input_shape == (1, 28, 28)
    for split in (mnist.train, mnist.val, mnist.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert 0 <= split.y.min().item() and split.y.max().item() == 9
    assert mnist.train.x.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert mnist.train.x.std().item() == pytest.approx(1.0, abs=1e-3)
    assert mnist.mean == pytest.approx(0.1307, abs=2e-3) and mnist.std == pytest.approx(0.3081, abs=2e-3)


@needs_shared_mnist
def test_real_mnist_test_set_is_the_official_t10k(mnist):
    raw_labels = read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert mnist.test.y.tolist() == raw_labels.long().tolist()
    raw_first = read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")[0].double() / 255
    assert torch.allclose(mnist.test.x[0, 0].double() * mnist.std + mnist.mean, raw_first, atol=1e-5)


@needs_shared_mnist
def test_real_mnist_found_through_env_var(monkeypatch):
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(SHARED_DATASETS))
    assert find_dataset_dir("mnist", download=False) == SHARED_MNIST


# ---------------------------------------------------------------------------------------------
# synthetic dataset
# ---------------------------------------------------------------------------------------------


def test_synthetic_shapes_and_determinism():
    a = load_dataset("synthetic", seed=5)
    b = load_dataset("synthetic", seed=5)
    c = load_dataset("synthetic", seed=6)
    assert (len(a.train), len(a.val), len(a.test)) == (3200, 800, 1000)  # val capped at 20%
    assert tuple(a.train.x.shape[1:]) == (1, 28, 28) and a.num_classes == 10
    assert sorted(set(a.test.y.tolist())) == list(range(10))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.test.x, c.test.x)
    assert len(load_dataset("synthetic", val_size=100).val) == 100


def test_synthetic_is_learnable_but_not_trivial():
    torch.manual_seed(0)
    splits = load_dataset("synthetic", seed=0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )

    def accuracy() -> float:
        with torch.no_grad():
            return (model(splits.test.x).argmax(1) == splits.test.y).float().mean().item()

    assert accuracy() < 0.35  # an untrained model is near chance
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = DeviceBatches(splits.train.x, splits.train.y, 64, seed=0)
    for epoch in range(2):
        for xb, yb in batches.epoch(epoch):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert accuracy() > 0.9
    # the noise makes classes overlap: even the nearest class mean is not perfect
    means = torch.stack([splits.train.x[splits.train.y == k].mean(0) for k in range(10)])
    distances = torch.cdist(splits.test.x.flatten(1), means.flatten(1))
    assert (distances.argmin(1) == splits.test.y).float().mean().item() < 0.999


# ---------------------------------------------------------------------------------------------
# find_dataset_dir
# ---------------------------------------------------------------------------------------------


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINKIT_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("TRAINKIT_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "trainkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "trainkit"


def test_explicit_dir_holding_files_or_subfolder(tmp_path):
    direct = write_tiny_dataset(tmp_path / "direct")
    assert find_dataset_dir("mnist", direct) == direct
    parent = tmp_path / "parent"
    write_tiny_dataset(parent / "fashion-mnist")
    assert find_dataset_dir("fashion-mnist", parent) == parent / "fashion-mnist"
    assert find_dataset_dir("fashion-mnist", str(parent)) == parent / "fashion-mnist"


def test_explicit_dir_wins_over_env_and_cache(tmp_path, monkeypatch):
    explicit = write_tiny_dataset(tmp_path / "explicit")
    write_tiny_dataset(tmp_path / "env" / "mnist")
    write_tiny_dataset(default_cache_dir() / "mnist")
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(tmp_path / "env"))
    assert find_dataset_dir("mnist", explicit) == explicit
    assert find_dataset_dir("mnist") == tmp_path / "env" / "mnist"


def test_explicit_missing_dir_is_an_error_not_a_download(tmp_path):
    missing = tmp_path / "typo"
    with pytest.raises(DataError, match="does not exist") as info:
        find_dataset_dir("mnist", missing)
    assert str(missing) in str(info.value)
    assert not (default_cache_dir() / "mnist").exists()


def test_explicit_dir_lacking_files_lists_them(tmp_path):
    folder = write_tiny_dataset(tmp_path / "partial")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        find_dataset_dir("mnist", folder)
    message = str(info.value)
    assert str(folder) in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "train-images-idx3-ubyte.gz" not in message.split("missing")[1].split("(")[0]


def test_env_var_without_dataset_falls_through_to_cache(tmp_path, monkeypatch):
    write_tiny_dataset(tmp_path / "env" / "mnist")
    cache_copy = write_tiny_dataset(default_cache_dir() / "fashion-mnist")
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(tmp_path / "env"))
    assert find_dataset_dir("fashion-mnist") == cache_copy
    monkeypatch.setenv("TRAINKIT_DATA_DIR", "")  # empty means unset
    assert find_dataset_dir("fashion-mnist") == cache_copy


def test_offline_cache_miss_names_cache_path_and_fix():
    with pytest.raises(DataError) as info:
        find_dataset_dir("mnist", download=False)
    message = str(info.value)
    assert str(default_cache_dir() / "mnist") in message
    assert "--data-dir" in message and "TRAINKIT_DATA_DIR" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_failed_download_lists_urls_and_where_to_put_files():
    with pytest.raises(DataError) as info:
        find_dataset_dir("fashion-mnist")
    message = str(info.value)
    assert images.IDX_DATASETS["fashion-mnist"].urls(images.IDX_DATASETS["fashion-mnist"].train_images)[0] in message
    assert str(default_cache_dir() / "fashion-mnist") in message
    assert not any((default_cache_dir() / "fashion-mnist").iterdir())


def test_download_into_cache_from_mirror(tmp_path, monkeypatch):
    mirror = write_tiny_dataset(tmp_path / "mirror", n_train=20)
    spec = images.IDX_DATASETS["mnist"]
    files = [dataclasses.replace(f, md5=md5_of(mirror / f.name)) for f in spec.files]
    patched = dataclasses.replace(
        spec,
        mirrors=((tmp_path / "down").as_uri(), mirror.as_uri() + "/"),
        train_images=files[0], train_labels=files[1], test_images=files[2], test_labels=files[3],
    )
    monkeypatch.setitem(images.IDX_DATASETS, "mnist", patched)
    splits = load_dataset("mnist", val_size=5)
    cache = default_cache_dir() / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILE_NAMES)
    assert len(splits.train) == 15 and len(splits.test) == 10
    assert find_dataset_dir("mnist", download=False) == cache


# ---------------------------------------------------------------------------------------------
# download_file
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def payload(tmp_path) -> Path:
    source = tmp_path / "server" / "good.bin"
    source.parent.mkdir()
    source.write_bytes(b"trainkit payload " * 1000)
    return source


def test_download_file_success(tmp_path, payload):
    dest = tmp_path / "out" / "file.bin"
    result = download_file([payload.as_uri()], dest, md5_of(payload), backoff=0)
    assert result == dest and dest.read_bytes() == payload.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]


def test_download_file_md5_mismatch_then_second_mirror(tmp_path, payload):
    bad = payload.with_name("bad.bin")
    bad.write_bytes(b"corrupted")
    dest = tmp_path / "out" / "file.bin"
    download_file([bad.as_uri(), payload.as_uri()], dest, md5_of(payload), retries=2, backoff=0)
    assert dest.read_bytes() == payload.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]


def test_download_file_all_fail_leaves_nothing(tmp_path, payload, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(idx.time, "sleep", sleeps.append)
    dest = tmp_path / "out" / "file.bin"
    missing = payload.with_name("missing.bin").as_uri()
    with pytest.raises(DataError) as info:
        download_file([payload.as_uri(), missing], dest, "0" * 32, retries=3, backoff=0.5)
    message = str(info.value)
    assert payload.as_uri() in message and "md5 mismatch" in message
    assert missing in message
    assert list(dest.parent.iterdir()) == []  # neither dest nor a temp file
    assert sleeps == [0.5, 1.0, 0.5, 1.0]  # backoff * attempt, between tries of each URL


def test_download_file_bad_arguments(tmp_path, payload):
    with pytest.raises(ConfigError):
        download_file([], tmp_path / "x", "0" * 32)
    with pytest.raises(ConfigError):
        download_file([payload.as_uri()], tmp_path / "x", "0" * 32, retries=0)


# ---------------------------------------------------------------------------------------------
# DeviceBatches
# ---------------------------------------------------------------------------------------------


def numbered(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return x, torch.arange(n)


def epoch_ids(batches: DeviceBatches, epoch: int, start_batch: int = 0) -> list[list[int]]:
    return [yb.tolist() for _, yb in batches.epoch(epoch, start_batch)]


def test_batches_cover_every_sample_once_and_keep_pairs():
    x, y = numbered(103)
    batches = DeviceBatches(x, y, 10, seed=4)
    assert len(batches) == 11 and batches.num_samples == 103
    seen = []
    for xb, yb in batches.epoch(0):
        assert torch.equal(xb[:, 0, 0, 0].long(), yb)
        seen += yb.tolist()
    assert sorted(seen) == list(range(103)) and seen != list(range(103))
    assert [len(b) for b in epoch_ids(batches, 0)] == [10] * 10 + [3]


def test_batch_order_depends_only_on_seed_and_epoch():
    x, y = numbered(50)
    a, b, c = (DeviceBatches(x, y, 8, seed=s) for s in (1, 1, 2))
    assert epoch_ids(a, 3) == epoch_ids(b, 3)  # b never ran epochs 0-2
    assert epoch_ids(a, 0) != epoch_ids(a, 1)
    assert epoch_ids(a, 0) != epoch_ids(c, 0)


@pytest.mark.parametrize("shift", [0, 2])
def test_start_batch_yields_the_tail_of_the_epoch(shift):
    x, y = numbered(45)
    batches = DeviceBatches(x, y, 6, seed=7, augment_shift=shift)
    full = list(batches.epoch(2))
    for k in (0, 3, len(full)):
        tail = list(batches.epoch(2, start_batch=k))
        assert len(tail) == len(full) - k
        for (xa, ya), (xb, yb) in zip(full[k:], tail):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_start_batch_and_batch_size_validation():
    x, y = numbered(10)
    with pytest.raises(ConfigError):
        DeviceBatches(x, y, 0)
    with pytest.raises(ConfigError):
        DeviceBatches(x, y[:5], 2)
    with pytest.raises(ConfigError):
        DeviceBatches(x, y, 4).epoch(0, start_batch=4)


def test_drop_last_and_sequential_order():
    x, y = numbered(23)
    dropped = DeviceBatches(x, y, 5, drop_last=True, seed=0)
    assert len(dropped) == 4
    assert [len(b) for b in epoch_ids(dropped, 0)] == [5, 5, 5, 5]
    sequential = DeviceBatches(x, y, 5, shuffle=False)
    assert sum(epoch_ids(sequential, 0), []) == list(range(23))
    assert epoch_ids(sequential, 0) == epoch_ids(sequential, 9)


def single_pixel_images(n: int, side: int = 9, background: float = 0.0) -> torch.Tensor:
    x = torch.full((n, 1, side, side), background)
    x[:, 0, side // 2, side // 2] = 5.0
    return x


def test_shift_augmentation_moves_content_within_bounds():
    s, n = 2, 200
    x = single_pixel_images(n)
    y = torch.arange(n) % 10
    batches = DeviceBatches(x, y, 32, shuffle=False, augment_shift=s, fill=0.0, seed=1)
    candidates = {
        (dy, dx): torch.roll(x[0], shifts=(dy, dx), dims=(-2, -1))
        for dy in range(-s, s + 1)
        for dx in range(-s, s + 1)
    }
    used = set()
    labels = []
    for xb, yb in batches.epoch(0):
        assert xb.shape == (len(yb), 1, 9, 9)
        labels += yb.tolist()
        for image in xb:
            match = [k for k, ref in candidates.items() if torch.equal(image, ref)]
            assert len(match) == 1
            used.add(match[0])
    assert labels == y.tolist()
    assert len(used) > 15  # many of the 25 possible shifts occur, including non-zero ones
    again = torch.cat([xb for xb, _ in batches.epoch(0)])
    assert torch.equal(again, torch.cat([xb for xb, _ in batches.epoch(0)]))
    assert not torch.equal(again, torch.cat([xb for xb, _ in batches.epoch(1)]))


def test_shift_zero_is_identity_and_default_fill_is_background():
    x = single_pixel_images(30, background=-0.4)
    y = torch.zeros(30, dtype=torch.long)
    plain = DeviceBatches(x, y, 8, seed=3)
    same = DeviceBatches(x, y, 8, seed=3, augment_shift=0)
    for (xa, _), (xb, _) in zip(plain.epoch(0), same.epoch(0)):
        assert torch.equal(xa, xb)
    shifted = DeviceBatches(x, y, 8, seed=3, augment_shift=6)  # big shifts expose padding
    values = torch.cat([xb for xb, _ in shifted.epoch(0)]).unique().tolist()
    assert values == pytest.approx([-0.4, 5.0])


def test_shift_images_direction_and_fill():
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 1, 1] = 1.0
    out = shift_images(image, torch.tensor([[1, 2]]), max_shift=2, fill=-1.0)
    expected = torch.zeros(5, 5)
    expected[2, 3] = 1.0
    expected[0, :] = -1.0  # rows exposed by shifting down
    expected[:, :2] = -1.0  # columns exposed by shifting right
    assert torch.equal(out[0, 0], expected)


def test_offline_env_var_forbids_downloading(monkeypatch):
    monkeypatch.setenv("TRAINKIT_OFFLINE", "1")
    with pytest.raises(DataError, match="downloading is disabled"):
        find_dataset_dir("mnist")

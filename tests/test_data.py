"""Tests for torchws.data: IDX reader, Fashion-MNIST discovery, CIFAR pickles, image folders, TensorLoader."""

from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import (
    FASHION_FILES,
    idx_bytes,
    write_cifar10_dir,
    write_cifar100_dir,
    write_fashion_dir,
    write_idx,
    write_image,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from torchws.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageFolderDataset,
    TensorLoader,
    TensorSplits,
    channel_stats,
    crop_flip,
    dataset_info,
    list_datasets,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_fashion_mnist,
    random_crop_flip,
    read_idx,
)
from torchws.data import fashion_mnist as fashion_module
from torchws.data.transforms import center_crop, random_resized_crop_params, resize_shorter_side

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def isolated_search(tmp_path, monkeypatch):
    """No env var, an empty cache and an empty 'Debian' dir, so only what a test writes can be found."""
    monkeypatch.delenv("TORCHWS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_module, "DEBIAN_DIR", tmp_path / "debian")
    return tmp_path


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_uint8_round_trip_exact(tmp_path, gz):
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / "x.idx", images, gz=gz), dtype_code=0x08, shape=(None, 28, 28))
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28)
    np.testing.assert_array_equal(out, images)


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_parse_idx_big_endian_all_dtypes(tmp_path_factory, dtype, shape, seed):
    array = (np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)
    path = tmp_path_factory.mktemp("idx") / "a.idx"
    path.write_bytes(idx_bytes(array))
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == tuple(shape)
    np.testing.assert_array_equal(out, array)


def test_read_idx_bad_magic_names_file(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00\x00\x00\x01" + b"\x05")
    with pytest.raises(DatasetFormatError, match=r"bad\.idx.*not an IDX file"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DatasetFormatError, match="unknown IDX dtype code 0x07"):
        read_idx(path)


def test_read_idx_truncated_payload_and_gzip(tmp_path):
    raw = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    (tmp_path / "short.idx").write_bytes(raw[:-10])
    with pytest.raises(DatasetFormatError, match=r"short\.idx.*truncated"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "hdr.idx").write_bytes(raw[:9])
    with pytest.raises(DatasetFormatError, match="truncated IDX header"):
        read_idx(tmp_path / "hdr.idx")
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(DatasetFormatError, match=r"short\.gz.*gzip"):
        read_idx(tmp_path / "short.gz")


def test_read_idx_wrong_dtype_or_shape(tmp_path):
    path = write_idx(tmp_path / "a.gz", np.zeros((2, 32, 32), dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match=r"shape is \(2, 32, 32\), expected \('N', 28, 28\)"):
        read_idx(path, shape=(None, 28, 28))
    path = write_idx(tmp_path / "b.gz", np.zeros((2,), dtype=np.int32))
    with pytest.raises(DatasetFormatError, match="dtype code is 0x0c, expected 0x08"):
        read_idx(path, dtype_code=0x08)


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist absent")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("TORCHWS_DATA_DIR", raising=False)
    splits = load_fashion_mnist(REAL_FASHION)
    assert splits.train_images.shape == (60000, 1, 28, 28) and splits.test_images.shape == (10000, 1, 28, 28)
    assert splits.train_images.dtype == torch.uint8 and splits.train_labels.dtype == torch.int64
    assert splits.train_labels.min() == 0 and splits.train_labels.max() == 9 and splits.test_labels.max() == 9
    assert torch.equal(torch.bincount(splits.train_labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(splits.test_labels), torch.full((10,), 1000))
    # published statistics of the train set: mean 0.2860, std 0.3530
    assert splits.mean[0] == pytest.approx(0.2860, abs=1e-4) and splits.std[0] == pytest.approx(0.3530, abs=1e-4)
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot"


def test_fashion_generated_exact(isolated_search):
    arrays = write_fashion_dir(isolated_search / "fm", n_train=12, n_test=5)
    splits = load_fashion_mnist(isolated_search / "fm")
    assert torch.equal(splits.train_images[:, 0], torch.from_numpy(arrays[FASHION_FILES[0]]))
    assert torch.equal(splits.train_labels, torch.from_numpy(arrays[FASHION_FILES[1]].astype(np.int64)))
    assert torch.equal(splits.test_images[:, 0], torch.from_numpy(arrays[FASHION_FILES[2]]))
    pixels = arrays[FASHION_FILES[0]].astype(np.float64) / 255
    assert splits.mean[0] == pytest.approx(pixels.mean(), rel=1e-12)
    assert splits.std[0] == pytest.approx(pixels.std(), rel=1e-12)


def test_fashion_uncompressed_files_accepted(isolated_search):
    arrays = write_fashion_dir(isolated_search / "plain", n_train=3, n_test=2, gz=False)
    splits = load_fashion_mnist(isolated_search / "plain")
    assert torch.equal(splits.test_labels, torch.from_numpy(arrays[FASHION_FILES[3]].astype(np.int64)))


def test_fashion_search_order(isolated_search, monkeypatch):
    tmp = isolated_search
    write_fashion_dir(tmp / "explicit", n_train=3, n_test=1)
    write_fashion_dir(tmp / "env" / "fashion-mnist", n_train=4, n_test=1)  # env var: subfolder accepted
    write_fashion_dir(tmp / "debian", n_train=5, n_test=1)
    write_fashion_dir(tmp / "cache" / "torchws" / "fashion-mnist", n_train=6, n_test=1)
    monkeypatch.setenv("TORCHWS_DATA_DIR", str(tmp / "env"))
    assert len(load_fashion_mnist(tmp / "explicit").train_labels) == 3
    assert len(load_fashion_mnist().train_labels) == 4
    # an explicit dir without the files falls through to the next place in the order
    assert len(load_fashion_mnist(tmp / "empty").train_labels) == 4
    monkeypatch.delenv("TORCHWS_DATA_DIR")
    assert len(load_fashion_mnist().train_labels) == 5
    monkeypatch.setattr(fashion_module, "DEBIAN_DIR", tmp / "nowhere")
    assert len(load_fashion_mnist().train_labels) == 6


def test_fashion_not_found_message(isolated_search):
    write_fashion_dir(isolated_search / "partial", n_train=2, n_test=1)
    (isolated_search / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="Fashion-MNIST") as info:
        load_fashion_mnist(isolated_search / "partial")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "zalandoresearch/fashion-mnist" in message
    assert str(isolated_search / "debian") in message and str(isolated_search / "cache") in message
    assert "lacks t10k-labels-idx1-ubyte" in message


def test_fashion_count_mismatch_and_bad_label(isolated_search):
    d = isolated_search / "fm"
    write_fashion_dir(d, n_train=4, n_test=2)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match="3 labels but train-images-idx3-ubyte.gz holds 4 images"):
        load_fashion_mnist(d)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.array([0, 1, 10, 2], dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match="label 10 outside 0..9"):
        load_fashion_mnist(d)
    write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((4, 32, 32), dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz: IDX shape"):
        load_fashion_mnist(d)


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("use_parent", [True, False])
def test_cifar10_round_trip(isolated_search, use_parent):
    folder = isolated_search / "data" / "cifar-10-batches-py"
    written = write_cifar10_dir(folder, per_batch=3)
    splits = load_cifar10(folder.parent if use_parent else folder)
    assert splits.train_images.shape == (15, 3, 32, 32) and splits.test_images.shape == (3, 3, 32, 32)
    # channel 0 is the R plane (first 1024 bytes of a row), 1 is G, 2 is B, each row-major 32x32
    assert torch.equal(splits.train_images, torch.from_numpy(written["train_planes"]))
    assert torch.equal(splits.test_images, torch.from_numpy(written["test_planes"]))
    assert splits.train_labels.tolist() == written["train_labels"]
    assert splits.test_labels.tolist() == written["test_labels"]
    assert splits.classes == [f"class{i}" for i in range(10)] and splits.num_classes == 10
    expected = written["train_planes"].astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    np.testing.assert_allclose(splits.mean, expected.mean(1), rtol=1e-12)
    np.testing.assert_allclose(splits.std, expected.std(1), rtol=1e-12)


def test_cifar100_round_trip(isolated_search):
    written = write_cifar100_dir(isolated_search / "cifar-100-python", n_train=6, n_test=2)
    splits = load_cifar100(isolated_search)
    assert torch.equal(splits.train_images, torch.from_numpy(written["train_planes"]))
    assert torch.equal(splits.test_images, torch.from_numpy(written["test_planes"]))
    assert splits.train_labels.tolist() == written["train_labels"]
    assert splits.num_classes == 100 and splits.classes[99] == "fine99" and splits.name == "cifar100"


def test_cifar_missing_and_malformed(isolated_search):
    folder = isolated_search / "cifar-10-batches-py"
    write_cifar10_dir(folder, per_batch=2)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"CIFAR-10 not found.*lacks data_batch_3.*cifar-10-python\.tar\.gz"):
        load_cifar10(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3000), dtype=np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DatasetFormatError, match=r"data_batch_3: b'data' must be uint8 \(N, 3072\)"):
        load_cifar10(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8)}, f, protocol=2)
    with pytest.raises(DatasetFormatError, match=r"data_batch_3: missing key b'labels'"):
        load_cifar10(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 10]}, f, protocol=2)
    with pytest.raises(DatasetFormatError, match=r"data_batch_3: labels span 0..10, expected 0..9"):
        load_cifar10(folder)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetFormatError, match="data_batch_3: not a readable CIFAR pickle"):
        load_cifar10(folder)


def test_cifar_pickle_cannot_run_code(isolated_search):
    folder = isolated_search / "cifar-10-batches-py"
    write_cifar10_dir(folder, per_batch=2)
    marker = isolated_search / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f, protocol=2)
    with pytest.raises(DatasetFormatError, match="is not allowed in a CIFAR batch"):
        load_cifar10(folder)
    assert not marker.exists()


# ---------------------------------------------------------------- image folders


def _make_folder(root: Path) -> None:
    write_image(root / "train" / "zebra" / "a.png", 40, 30, (255, 0, 0))
    write_image(root / "train" / "zebra" / "b.JPEG", 30, 40, (0, 255, 0))
    write_image(root / "train" / "ant" / "c.png", 24, 24, (0, 0, 255))
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    write_image(root / "val" / "ant" / "d.png", 50, 20, (10, 20, 30))
    write_image(root / "val" / "zebra" / "e.jpg", 20, 20, (200, 100, 50))


def test_image_folder_mapping_shapes_normalization(tmp_path):
    _make_folder(tmp_path)
    train = ImageFolderDataset(tmp_path, "train", image_size=16, generator=torch.Generator().manual_seed(0))
    assert train.classes == ["ant", "zebra"] and train.class_to_idx == {"ant": 0, "zebra": 1}
    assert len(train) == 3 and train.targets == [0, 1, 1] and train.train
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == train.targets[i]
    val = ImageFolderDataset(tmp_path, "val", image_size=16)
    assert not val.train and len(val) == 2
    image, label = val[0]  # solid (10, 20, 30) PNG, lossless: every pixel normalizes to the same value
    expected = (torch.tensor([10, 20, 30]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert image.shape == (3, 16, 16) and label == 0
    torch.testing.assert_close(image, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5, rtol=0)
    train_pixel = train[2][0]  # solid green JPEG: lossy, so close to pure green only
    green = (torch.tensor([0, 255, 0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(train_pixel.mean((1, 2)), green, atol=0.1, rtol=0)


def test_image_folder_seeded_items_depend_only_on_seed_epoch_and_index(tmp_path):
    """With a seed, item i of epoch e is the same whatever was drawn before (global RNG, other items, other workers),
    so a resumed run or another --workers sees the same crops; the epoch changes them."""
    _make_folder(tmp_path)

    def items(dataset: ImageFolderDataset, order: list[int]) -> dict[int, torch.Tensor]:
        return {i: dataset[i][0] for i in order}

    first = ImageFolderDataset(tmp_path, "train", image_size=8, seed=3)
    forward = items(first, [0, 1, 2])
    torch.manual_seed(123)
    again = ImageFolderDataset(tmp_path, "train", image_size=8, seed=3)
    backward = items(again, [2, 1, 0, 2])
    assert all(torch.equal(forward[i], backward[i]) for i in range(3))
    again.set_epoch(1)
    assert not torch.equal(again[0][0], forward[0])
    other_seed = ImageFolderDataset(tmp_path, "train", image_size=8, seed=4)
    assert not all(torch.equal(other_seed[i][0], forward[i]) for i in range(3))
    with pytest.raises(ValueError, match="seed .* or generator, not both"):
        ImageFolderDataset(tmp_path, "train", seed=0, generator=torch.Generator())


def test_image_folder_errors(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "train" / "empty_class").mkdir()
    with pytest.raises(DatasetFormatError, match=r"empty_class: class folder holds no images"):
        ImageFolderDataset(tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match=r"split .*test does not exist"):
        ImageFolderDataset(tmp_path, "test")
    (tmp_path / "bare" / "train").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=r"bare.train: no class subfolders"):
        ImageFolderDataset(tmp_path / "bare", "train")


def test_eval_transform_geometry():
    image = torch.arange(3 * 20 * 40, dtype=torch.float32).view(3, 20, 40)
    assert resize_shorter_side(image, 18).shape == (3, 18, 36)
    assert resize_shorter_side(image.transpose(1, 2), 18).shape == (3, 36, 18)
    assert torch.equal(center_crop(image, 16), image[:, 2:18, 12:28])
    with pytest.raises(ValueError, match="smaller than the crop"):
        center_crop(image, 21)


@settings(max_examples=50, deadline=None)
@given(height=st.integers(1, 300), width=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_random_resized_crop_params_in_bounds(height, width, seed):
    top, left, h, w = random_resized_crop_params(height, width, generator=torch.Generator().manual_seed(seed))
    assert 0 < h and 0 < w and 0 <= top <= height - h and 0 <= left <= width - w
    again = random_resized_crop_params(height, width, generator=torch.Generator().manual_seed(seed))
    assert again == (top, left, h, w)
    # away from rounding effects, a crop drawn in the loop keeps the area and aspect bounds
    if height >= 50 and width >= 50 and (h, w) != (height, width):
        assert 0.08 * height * width * 0.9 <= h * w <= height * width
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


# ---------------------------------------------------------------- crop/flip and TensorLoader


def test_crop_flip_identity_and_shift():
    images = torch.randint(0, 256, (3, 2, 5, 6), dtype=torch.uint8)
    same = crop_flip(images, torch.full((3, 2), 4), torch.zeros(3, dtype=torch.bool), pad=4)
    assert torch.equal(same, images)
    flipped = crop_flip(images, torch.full((3, 2), 4), torch.ones(3, dtype=torch.bool), pad=4)
    assert torch.equal(flipped, images.flip(-1))
    shifted = crop_flip(images[:1], torch.tensor([[0, 0]]), torch.tensor([False]), pad=4)
    assert torch.equal(shifted[0, :, 4:, 4:], images[0, :, :1, :2]) and shifted[0, :, :4].sum() == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), pad=st.integers(0, 4), b=st.integers(1, 5))
def test_crop_flip_matches_per_image_reference(seed, pad, b):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, 7, 5), dtype=torch.uint8, generator=g)
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=g)
    flips = torch.rand(b, generator=g) < 0.5
    out = crop_flip(images, offsets, flips, pad=pad)
    for i in range(b):
        padded = torch.zeros(3, 7 + 2 * pad, 5 + 2 * pad, dtype=torch.uint8)
        padded[:, pad : pad + 7, pad : pad + 5] = images[i]
        top, left = offsets[i].tolist()
        window = padded[:, top : top + 7, left : left + 5]
        assert torch.equal(out[i], window.flip(-1) if flips[i] else window)


def test_random_crop_flip_keeps_shape_and_varies():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, pad=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)


def _indexed_data(n: int, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels all equal their index (mod 256) and labels equal to the index."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, channels, 4, 4).contiguous()
    return images, torch.arange(n)


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_each_sample_once(shuffle):
    images, labels = _indexed_data(23)
    loader = TensorLoader(images, labels, 5, shuffle=shuffle, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 5 and [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(23))
    if not shuffle:
        assert seen.tolist() == list(range(23))
    first_images, first_labels = batches[0]
    torch.testing.assert_close(first_images[:, 0, 0, 0], first_labels.float() / 255)  # mean 0, std 1 by default


def test_loader_normalization_and_device():
    images, labels = _indexed_data(6, channels=2)
    loader = TensorLoader(images, labels, 6, shuffle=False, mean=(0.1, 0.2), std=(0.5, 0.25), device="cpu")
    batch, _ = next(iter(loader))
    expected = (images.float() / 255 - torch.tensor([0.1, 0.2]).view(1, 2, 1, 1)) / torch.tensor([0.5, 0.25]).view(
        1, 2, 1, 1
    )
    torch.testing.assert_close(batch, expected)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), world_size=st.integers(1, 4), batch_size=st.integers(1, 7), drop_last=st.booleans(),
       epoch=st.integers(0, 5))  # fmt: skip
def test_loader_sharding_like_distributed_sampler(n, world_size, batch_size, drop_last, epoch):
    if n < world_size:
        return
    images, labels = _indexed_data(n)
    shards = []
    for rank in range(world_size):
        loader = TensorLoader(images, labels, batch_size, shuffle=True, seed=7, rank=rank, world_size=world_size,
                              drop_last=drop_last)  # fmt: skip
        loader.set_epoch(epoch)
        shard = loader.indices().tolist()
        shards.append(shard)
        per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        assert len(shard) == per_rank == loader.num_samples
        got = [i for _, batch_labels in loader for i in batch_labels.tolist()]
        expected_len = per_rank // batch_size * batch_size if drop_last else per_rank
        assert got == shard[:expected_len] and len(loader) == math.ceil(expected_len / batch_size)
    # interleaving the shards rebuilds one (padded or cut) permutation shared by all ranks
    merged = [shards[r][i] for i in range(len(shards[0])) for r in range(world_size)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
    if drop_last:
        assert merged == perm[: len(merged)]
    else:
        assert merged[:n] == perm and merged[n:] == perm[: len(merged) - n]


def test_loader_two_ranks_disjoint_cover():
    images, labels = _indexed_data(20)
    shards = [set(TensorLoader(images, labels, 3, rank=r, world_size=2, seed=1).indices().tolist()) for r in (0, 1)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(20))


def test_loader_determinism_across_seeds_and_epochs():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32)

    def epoch_batches(seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = TensorLoader(images, labels, 8, shuffle=True, augment="crop_flip", seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    a, b, c, d = epoch_batches(0, 1), epoch_batches(0, 1), epoch_batches(0, 2), epoch_batches(5, 1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(torch.cat([x[1] for x in a]), torch.cat([x[1] for x in c]))
    assert not torch.equal(torch.cat([x[1] for x in a]), torch.cat([x[1] for x in d]))
    assert all(x[0].shape == (8, 3, 8, 8) for x in a)
    plain = TensorLoader(images, labels, 8, shuffle=True, seed=0)
    plain.set_epoch(1)
    # same order as the augmented loader, different pixels: the augmentation really changed the images
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, plain))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, plain))


def test_loader_rejects_bad_arguments():
    images, labels = _indexed_data(4)
    with pytest.raises(ValueError, match="uint8"):
        TensorLoader(images.float(), labels, 2)
    with pytest.raises(ValueError, match="labels must have shape"):
        TensorLoader(images, labels[:3], 2)
    with pytest.raises(ValueError, match="augment must be one of"):
        TensorLoader(images, labels, 2, augment="mixup")
    with pytest.raises(ValueError, match="rank < world_size"):
        TensorLoader(images, labels, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="mean and std need 1 values"):
        TensorLoader(images, labels, 2, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(images, labels, 0)


# ---------------------------------------------------------------- registry and splits


def test_registry_names_and_errors(tmp_path):
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder"]
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid names: cifar10, cifar100, digits"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="ImageFolderDataset"):
        load_dataset("imagefolder")
    assert dataset_info("cifar10") == (3, 32, 10) and dataset_info("cifar100") == (3, 32, 100)
    assert dataset_info("fashion_mnist") == (1, 28, 10) and dataset_info("fashion-mnist").num_classes == 10
    with pytest.raises(ValueError, match="needs data_dir"):
        dataset_info("imagefolder")
    _make_folder(tmp_path)
    assert dataset_info("imagefolder", tmp_path, image_size=64) == (3, 64, 2)


def test_registry_cifar10_through_data_dir(isolated_search):
    write_cifar10_dir(isolated_search / "cifar-10-batches-py", per_batch=1)
    splits = load_dataset("cifar10", isolated_search)
    assert (splits.train_images.shape[1], splits.train_images.shape[2], splits.num_classes) == dataset_info("cifar10")


def test_digits_split_deterministic_and_consistent():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_images.shape == (1438, 1, 8, 8) and a.test_images.shape == (359, 1, 8, 8)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert (a.image_shape[0], a.image_shape[1], a.num_classes) == dataset_info("digits")
    # the split is a partition of the original images, pixel values scaled 0..16 -> 0..255
    raw = torch.from_numpy(load_digits().images)
    ours = torch.round(torch.cat([a.train_images, a.test_images])[:, 0].double() * 16 / 255)
    assert torch.equal(ours.sum(0), raw.sum(0)) and torch.equal((ours**2).sum(0), (raw**2).sum(0))
    assert sorted(torch.cat([a.train_labels, a.test_labels]).tolist()) == sorted(load_digits().target.tolist())


def test_tensor_splits_validation_and_channel_stats():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    mean, std = channel_stats(images)
    assert mean == (0.5,) and std == (0.5,)
    with pytest.raises(ValueError, match="train_labels must be int64"):
        TensorSplits(images, torch.zeros(2, dtype=torch.int32), images, torch.zeros(2, dtype=torch.int64), 1, ["a"],
                     mean, std, "toy")  # fmt: skip

import gzip
import pickle

import pytest
import torch
from conftest import class_images, write_cifar

from toolchain.data.datasets import DATASETS, read_idx
from toolchain.data.loaders import build_data
from toolchain.errors import DataError
from toolchain.recipe import DataConfig


def test_fashion_mnist_from_idx_files(fmnist_root):
    bundle = build_data(DataConfig(root=str(fmnist_root), batch_size=32, val_fraction=0.2), seed=0)
    assert bundle.num_classes == 10 and bundle.class_names[0] == "T-shirt/top"
    assert bundle.train.num_samples == 240 and bundle.val.num_samples == 60 and bundle.test.num_samples == 100
    x, y = next(iter(bundle.train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1])  # grey repeated to 3 channels
    # zero padding 28 -> 32 becomes the normalised value of black
    assert torch.allclose(
        next(iter(bundle.val))[0][:, :, 0, :], torch.tensor(-bundle.mean[0] / bundle.std[0]), atol=1e-5
    )


def test_validation_split_is_seeded_and_disjoint(fmnist_root):
    def val_labels(seed):
        b = build_data(DataConfig(root=str(fmnist_root), val_fraction=0.2, augment=False), seed=seed)
        return torch.cat([y for _, y in b.val])

    assert torch.equal(val_labels(0), val_labels(0))
    assert not torch.equal(val_labels(0), val_labels(1))
    b = build_data(DataConfig(root=str(fmnist_root), val_fraction=0.2, batch_size=1000, augment=False), seed=0)
    train_imgs = next(iter(b.train))[0].flatten(1)
    val_imgs = next(iter(b.val))[0].flatten(1)
    assert torch.cdist(train_imgs, val_imgs).min() > 0  # no image in both splits


def test_subset_limits_train_and_test(fmnist_root):
    b = build_data(DataConfig(root=str(fmnist_root), subset=100, test_subset=20, val_fraction=0.1), seed=0)
    assert b.train.num_samples + b.val.num_samples == 100 and b.test.num_samples == 20


def test_idx_reader_rejects_corrupt_archive(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a valid idx file"):
        read_idx(bad)
    wrong_magic = tmp_path / "x.gz"
    with gzip.open(wrong_magic, "wb") as f:
        f.write(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(wrong_magic)


def test_missing_fashion_mnist_offline_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        DATASETS.get("fashion_mnist")(root=str(tmp_path))


@pytest.mark.parametrize("classes, name", [(10, "cifar10"), (100, "cifar100")])
def test_cifar_python_batches(tmp_path, classes, name):
    write_cifar(tmp_path, classes)
    raw = DATASETS.get(name)(root=str(tmp_path))
    n_train = 100 if classes == 10 else 20
    assert raw.train.images.shape == (n_train, 3, 32, 32) and raw.test.images.shape == (20, 3, 32, 32)
    assert len(raw.class_names) == classes and raw.class_names[1] == "class1"
    expected, _ = class_images(20, classes, (3, 32, 32), seed=0)
    assert torch.equal(raw.train.images[:20], torch.from_numpy(expected))


def test_cifar_offline_without_files_says_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        DATASETS.get("cifar10")(root=str(tmp_path))


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path, 10)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        DATASETS.get("cifar10")(root=str(tmp_path))


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("subset", 301, "data.subset is 301 but the fashion_mnist training split has only 300 images"),
        ("test_subset", 101, "data.test_subset is 101 but the fashion_mnist test split has only 100 images"),
    ],
)
def test_subset_larger_than_the_split_is_an_error(fmnist_root, key, value, expected):
    with pytest.raises(DataError, match=expected):
        build_data(DataConfig(root=str(fmnist_root), **{key: value}), seed=0)
    build_data(DataConfig(root=str(fmnist_root), **{key: value - 1}), seed=0)  # exactly the split size is fine

import struct

import numpy as np
import pytest

from pl_federated import FederatedDataModule
from pl_federated.data.datasets import load_dataset


def write_idx(path, array):
    magic = 2051 if array.ndim == 3 else 2049
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def fake_mnist(root, n=200):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def test_torchvision_mnist_from_local_files(tmp_path):
    fake_mnist(tmp_path)
    loaded = load_dataset("mnist", root=str(tmp_path))
    assert loaded.x.shape == (200, 1, 28, 28) and 0 <= loaded.x.min() <= loaded.x.max() <= 1
    assert loaded.y.tolist()[:3] == [0, 1, 2]
    dm = FederatedDataModule(
        "mnist", num_clients=4, dataset_options={"root": str(tmp_path), "split": "test"}
    )
    dm.setup("fit")
    assert int(dm.num_train.sum() + dm.num_test.sum()) == 200


def test_missing_files_offline_give_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"download: true") as err:
        load_dataset("cifar10", root=str(tmp_path / "nowhere"))
    assert "CIFAR10" in str(err.value) and "nowhere" in str(err.value)
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", root=str(tmp_path), split="val")

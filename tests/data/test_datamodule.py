"""FederatedDataModule refuses bad data values at setup, naming where they are."""

import numpy as np
import pytest

from pl_federated import FederatedDataModule
from pl_federated.data import IID


def _npz(tmp_path, images, labels):
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=labels)
    return str(path)


def _images(n=60):
    return np.random.default_rng(0).random((n, 4, 4)).astype(np.float32)


@pytest.mark.parametrize("normalize", ["none", "global"])
def test_nan_inputs_fail_at_setup_naming_client_split_and_sample(tmp_path, normalize):
    images, labels = _images(), np.arange(60) % 3
    images[17, 1, 2] = np.nan
    images[18, 0, 0] = np.inf
    images[40, 3, 3] = np.nan
    data = FederatedDataModule(
        "npz",
        path=_npz(tmp_path, images, labels),
        num_clients=3,
        partition=IID(),
        normalize=normalize,
    )
    with pytest.raises(
        ValueError,
        match=r"sample \d+ of client \d's (train|test) split has "
        r"NaN/Inf inputs \(\d such samples there\)",
    ):
        data.setup("fit")


def test_labels_must_be_non_negative_class_indices(tmp_path):
    labels = np.arange(60) % 3
    labels[7] = -1
    data = FederatedDataModule("npz", path=_npz(tmp_path, _images(), labels), num_clients=2)
    with pytest.raises(ValueError, match="sample 7 has label -1; labels must be class indices"):
        data.setup("fit")
    empty = FederatedDataModule("npz", path=_npz(tmp_path, _images(0), labels[:0]), num_clients=2)
    with pytest.raises(ValueError, match=r"non-empty 1-D array of class indices, got shape \(0,\)"):
        empty.setup("fit")


def test_fractional_labels_are_refused_not_truncated(tmp_path):
    labels = (np.arange(60) % 3).astype(np.float32)
    labels[5] = 1.5
    data = FederatedDataModule("npz", path=_npz(tmp_path, _images(), labels), num_clients=2)
    with pytest.raises(ValueError, match=r"must be integer class indices; sample 5 has label"):
        data.setup("fit")
    whole = FederatedDataModule(
        "npz", path=_npz(tmp_path, _images(), np.arange(60.0) % 3), num_clients=2
    )
    whole.setup("fit")  # float labels that are whole numbers are class indices
    assert whole.num_classes == 3

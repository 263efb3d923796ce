"""Feature-noise skew, stratified client splits, the held-out global test set, partition
reports and the `pl-federated partition` command."""

import numpy as np
import pytest
import torch
from helpers import federation

from pl_federated import FederatedDataModule
from pl_federated.cli import partition_main
from pl_federated.data import IID, Dirichlet, FeatureNoise, PartitionReport

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_feature_noise_scales_with_the_client_index():
    clean = FederatedDataModule("digits", num_clients=4, partition=IID())
    noisy = FederatedDataModule("digits", num_clients=4, partition=FeatureNoise(sigma=0.4))
    clean.setup()
    noisy.setup()
    for k in range(4):
        assert torch.equal(clean.train_y[k], noisy.train_y[k])  # same IID split and labels
        diff = noisy.train_x[k] - clean.train_x[k]
        assert diff.std().item() == pytest.approx(0.4 * k / 4, abs=0.01)
        assert (noisy.test_x[k] - clean.test_x[k]).std().item() == pytest.approx(
            0.4 * k / 4, abs=0.02
        )
    again = FederatedDataModule("digits", num_clients=4, partition=FeatureNoise(sigma=0.4))
    again.setup()
    assert torch.equal(again.train_x[3], noisy.train_x[3])  # seeded
    with pytest.raises(ValueError, match="sigma"):
        FeatureNoise(sigma=-1)


def test_stratified_split_keeps_class_proportions():
    dm = FederatedDataModule(
        "digits",
        num_clients=3,
        partition=Dirichlet(0.5, min_size=50),
        test_fraction=0.2,
        val_fraction=0.1,
        stratified=True,
    )
    dm.setup()
    for k in range(3):
        total = torch.bincount(torch.cat([dm.train_y[k], dm.val_y[k], dm.test_y[k]]), minlength=10)
        test = torch.bincount(dm.test_y[k], minlength=10)
        for c in range(10):
            n = int(total[c])
            expected = round(n * 0.2) if round(n * 0.2) + round(n * 0.1) < n else 0
            assert int(test[c]) == expected
    owned = sum(int(dm.num_train[k] + dm.num_val[k] + dm.num_test[k]) for k in range(3))
    assert owned == 1797


def test_global_test_set_is_held_out_and_measured(trainer_factory):
    dm = FederatedDataModule(
        "digits", num_clients=3, partition=IID(), global_test_fraction=0.1, public_fraction=0.1
    )
    dm.setup()
    assert len(dm.global_test_y) == 180 and len(dm.public_y) == 180
    owned = int(dm.num_train.sum() + dm.num_test.sum())
    assert owned + 360 == 1797
    fed = federation(local_steps=3)
    trainer_factory(rounds=1).fit(fed, dm)
    fed.load_state("model", fed.server_state)
    preds = fed.predict_classes(fed.shared_worker, dm.global_test_x).cpu()
    acc = (preds == dm.global_test_y).float().mean().item()
    assert fed.history[-1]["global/acc"] == pytest.approx(acc)
    with pytest.raises(ValueError, match="global_test_fraction"):
        FederatedDataModule(global_test_fraction=0.6, public_fraction=0.5)


def test_partition_report_by_hand():
    report = PartitionReport(np.array([[2, 2, 0], [0, 0, 4]]))
    assert report.sizes.tolist() == [4, 4]
    np.testing.assert_allclose(report.entropy, [1.0, 0.0])
    # global distribution [0.25, 0.25, 0.5]
    np.testing.assert_allclose(report.tv, [0.5, 0.5])
    # CDFs: client 0 [.5, 1, 1], client 1 [0, 0, 1], global [.25, .5, 1]
    np.testing.assert_allclose(report.emd, [0.75, 0.75])
    assert "mean TV 0.500" in report.table()
    with pytest.raises(ValueError, match="non-negative"):
        PartitionReport(np.array([1, 2]))


def test_partition_command_prints_and_writes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    report = partition_main(
        ["--config", "configs/quickstart.yaml", "--out", str(tmp_path), "--data.num_clients=5"]
    )
    out = capsys.readouterr().out
    assert "5 clients, 1797 samples" in out
    assert report.counts.shape == (5, 10)
    assert (tmp_path / "partition.png").stat().st_size > 1000
    lines = (tmp_path / "partition.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("client,size,entropy,tv,emd,c0")


def image_tree(root, domains=("amazon", "webcam"), classes=("bike", "cup", "pen"), n=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for d_i, d in enumerate(domains):
        for c in classes:
            (root / d / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.random((12, 10, 3)) * (0.5 + d_i) * 120  # domains differ in scale
                Image.fromarray(pixels.astype("uint8")).save(root / d / c / f"{i}.png")
    return root


def test_image_folder_domains_and_per_domain_normalization(tmp_path):
    from pl_federated.data import Domains

    root = image_tree(tmp_path / "office")
    dm = FederatedDataModule(
        "image_folder",
        num_clients=4,
        partition=Domains(clients_per_domain=2, min_size=2),
        dataset_options={"root": str(root), "size": 8},
        normalize="per_domain",
    )
    dm.setup()
    assert dm.domain_names == ("amazon", "webcam") and dm.num_classes == 3
    assert dm.train_x[0].shape[1:] == (3, 8, 8)
    for members in ((0, 1), (2, 3)):  # each domain standardized by its own training data
        train = torch.cat([dm.train_x[c] for c in members]).transpose(0, 1).flatten(1)
        torch.testing.assert_close(train.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(train.std(1), torch.ones(3), atol=1e-4, rtol=0)
    gray = FederatedDataModule(
        "image_folder",
        num_clients=2,
        partition=IID(min_size=2),
        dataset_options={"root": str(root), "size": 8, "grayscale": True, "domains": ["webcam"]},
    )
    gray.setup()
    assert gray.train_x[0].shape[1:] == (1, 8, 8) and gray.domain_names == ("webcam",)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        FederatedDataModule("image_folder", dataset_options={"root": str(tmp_path / "x")}).setup()
    with pytest.raises(ValueError, match="per_domain"):
        FederatedDataModule("digits", normalize="per_domain").setup()


class CountingFlip(torch.nn.Module):
    """Flips every training sample and counts the calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.flip(-1)


def test_train_transform_applies_to_training_samples_only(trainer_factory):
    flip = CountingFlip()
    dm = FederatedDataModule("digits", num_clients=3, partition=IID(), train_transform=flip)
    fed = federation(local_epochs=2)
    trainer_factory(rounds=1).fit(fed, dm)
    assert flip.calls == 2 * int(dm.num_train.sum())  # every training sample, every epoch

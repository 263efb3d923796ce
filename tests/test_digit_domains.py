import torch

from pl_federated import FederatedDataModule
from pl_federated.data import Domains
from pl_federated.data.datasets import load_digit_domains


def test_digit_domains_without_files_is_sklearn_digits_resized():
    loaded = load_digit_domains(size=16)
    assert loaded.x.shape == (1797, 1, 16, 16) and loaded.domain_names == ("digits",)
    assert loaded.x.min() >= 0 and loaded.x.max() <= 1


def test_digit_domains_with_shared_files(shared_data):
    dm = FederatedDataModule(
        "digit_domains",
        num_clients=6,
        partition=Domains(clients_per_domain=2),
        val_fraction=0.1,
        max_train_samples=150,
        dataset_options={
            "mnist_path": str(shared_data / "mnist_test10k.npz"),
            "usps_path": str(shared_data / "usps.npz"),
            "max_per_domain": 1000,
        },
    )
    dm.setup("fit")
    assert dm.domain_names == ("mnist", "usps", "digits")
    assert dm.input_shape == (1, 28, 28)
    assert all(n == 150 for n in dm.num_train.tolist())
    assert all(n > 0 for n in dm.num_val.tolist())
    # domains differ in appearance: mean intensity of client 0 (MNIST) vs client 4 (digits)
    assert abs(dm.train_x[0].mean() - dm.train_x[4].mean()) > 0.01
    assert all(len(torch.unique(y)) == 10 for y in dm.train_y)  # IID labels inside a domain

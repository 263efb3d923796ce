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


def test_global_test_set_keeps_each_samples_domain(shared_data):
    """``global_test_domains`` names the domain of every held-out global test sample, so a
    domain's clients can be scored on that domain's unpartitioned samples."""
    options = {
        "mnist_path": str(shared_data / "mnist_test10k.npz"),
        "usps_path": str(shared_data / "usps.npz"),
        "max_per_domain": 500,
    }
    dm = FederatedDataModule(
        "digit_domains",
        num_clients=3,
        partition=Domains(clients_per_domain=1),
        global_test_fraction=0.2,
        dataset_options=options,
    )
    dm.setup("fit")
    loaded = load_digit_domains(**options)
    domains = dm.global_test_domains
    assert domains is not None and len(domains) == len(dm.global_test_y) == 300
    assert set(domains.tolist()) == {0, 1, 2}
    for d in range(3):  # each held-out sample is a sample of its stated domain
        pool = loaded.x[loaded.domains == d].flatten(1)
        for sample in dm.global_test_x[domains == d][:5]:
            assert (pool == sample.flatten()).all(1).any()
    iid = FederatedDataModule("digits", num_clients=2, global_test_fraction=0.1)
    iid.setup("fit")
    assert iid.global_test_domains is None

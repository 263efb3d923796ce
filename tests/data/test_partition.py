import numpy as np
import pytest

from pl_federated.data.partition import IID, Dirichlet, FeatureNoise, Pathological, QuantitySkew


def labels(n=1000, c=10, seed=0):
    return np.random.default_rng(seed).integers(0, c, size=n)


ALL = [
    IID(min_size=5),
    Dirichlet(alpha=0.5, min_size=5),
    Pathological(classes_per_client=3, min_size=5),
    QuantitySkew(alpha=1.0, min_size=5),
    FeatureNoise(sigma=0.2, min_size=5),
]


@pytest.mark.parametrize("partitioner", ALL, ids=lambda p: type(p).__name__)
def test_disjoint_covering_counts(partitioner):
    y = labels()
    part = partitioner(y, num_clients=8, seed=3)
    allidx = np.concatenate(part.indices)
    assert len(allidx) == len(y) == len(np.unique(allidx))  # disjoint and covering
    assert part.counts.shape == (8, 10)
    for k, idx in enumerate(part.indices):
        assert np.array_equal(np.bincount(y[idx], minlength=10), part.counts[k])
        assert len(idx) >= 5


def test_iid_equal_sizes():
    part = IID(min_size=1)(labels(1003), num_clients=10, seed=0)
    assert set(part.sizes.tolist()) == {100, 101}


@pytest.mark.parametrize("partitioner", ALL, ids=lambda p: type(p).__name__)
def test_every_partitioner_is_seeded(partitioner):
    y = labels()
    a, b = partitioner(y, 8, seed=5), partitioner(y, 8, seed=5)
    assert all(np.array_equal(i, j) for i, j in zip(a.indices, b.indices, strict=True))


def test_seeded():
    y = labels()
    a = Dirichlet(0.3)(y, 10, seed=1)
    b = Dirichlet(0.3)(y, 10, seed=1)
    c = Dirichlet(0.3)(y, 10, seed=2)
    assert all(np.array_equal(i, j) for i, j in zip(a.indices, b.indices, strict=True))
    assert not all(np.array_equal(i, j) for i, j in zip(a.indices, c.indices, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = labels(5000)

    def mean_tv(alpha):
        p = Dirichlet(alpha, min_size=1)(y, 10, seed=0).counts.astype(float)
        p /= p.sum(1, keepdims=True)
        return 0.5 * np.abs(p - np.full(10, 0.1)).sum(1).mean()

    assert mean_tv(0.1) > mean_tv(1.0) > mean_tv(100.0)


def test_errors_name_the_field():
    y = labels(50)
    with pytest.raises(ValueError, match="num_clients"):
        IID(min_size=1)(y, num_clients=51)
    with pytest.raises(ValueError, match="min_size"):
        IID(min_size=10)(y, num_clients=6)
    with pytest.raises(ValueError, match="alpha"):
        Dirichlet(alpha=0)
    with pytest.raises(ValueError, match="larger alpha"):
        Dirichlet(alpha=0.01, min_size=8, max_tries=3)(labels(100, seed=1), num_clients=10)


def test_domains_partition_gives_each_domain_its_own_clients():
    from pl_federated.data.partition import Domains

    y = labels(900)
    domains = np.repeat([0, 1, 2], 300)
    part = Domains(clients_per_domain=2, min_size=5)(y, 6, seed=0, domains=domains)
    for k, idx in enumerate(part.indices):
        assert set(domains[idx]) == {k // 2}
    assert sum(len(i) for i in part.indices) == 900
    skewed = Domains(clients_per_domain=2, alpha=0.1, min_size=5)(y, 6, seed=0, domains=domains)
    assert skewed.counts.std() > part.counts.std()
    with pytest.raises(ValueError, match="num_domains"):
        Domains(clients_per_domain=2)(y, 5, domains=domains)
    with pytest.raises(ValueError, match="with domains"):
        Domains()(y, 3)


def test_pathological_gives_each_client_exactly_c_classes_and_uses_all():
    from pl_federated.data.partition import Pathological

    y = labels(2000)
    part = Pathological(classes_per_client=2, min_size=5)(y, num_clients=12, seed=1)
    assert all((row > 0).sum() == 2 for row in part.counts)
    assert (part.counts.sum(0) > 0).all()  # every class used
    allidx = np.concatenate(part.indices)
    assert len(allidx) == len(np.unique(allidx)) == 2000
    with pytest.raises(ValueError, match="cannot cover all 10 classes"):
        Pathological(classes_per_client=2)(y, num_clients=4)
    with pytest.raises(ValueError, match="more than the 10 classes"):
        Pathological(classes_per_client=11)(y, num_clients=4)


def test_quantity_skew_sizes_vary_labels_stay_iid():
    from pl_federated.data.partition import QuantitySkew

    y = labels(5000)
    part = QuantitySkew(alpha=0.5, min_size=20)(y, num_clients=10, seed=0)
    sizes = part.sizes
    assert sizes.min() >= 20 and sizes.max() > 2 * sizes.min()
    assert sum(len(i) for i in part.indices) == 5000
    big = int(np.argmax(sizes))
    dist = part.counts[big] / sizes[big]
    assert np.abs(dist - 0.1).max() < 0.05  # the largest client's labels look like the global mix
    with pytest.raises(ValueError, match="larger alpha"):
        QuantitySkew(alpha=0.01, min_size=400, max_tries=5)(y, num_clients=10)


def test_quantity_skew_size_variance_grows_as_alpha_falls():
    from pl_federated.data.partition import QuantitySkew

    y = labels(20000)

    def spread(alpha):  # coefficient of variation of client sizes, averaged over seeds
        return np.mean(
            [
                (p := QuantitySkew(alpha=alpha, min_size=5)(y, 20, seed=s)).sizes.std()
                / p.sizes.mean()
                for s in range(5)
            ]
        )

    assert spread(0.3) > spread(1.0) > spread(10.0)


def test_iid_label_mix_is_close_to_uniform():
    part = IID()(labels(20000), 10, seed=0)
    dist = part.counts / part.sizes[:, None]
    assert np.abs(dist - 0.1).max() < 0.03


def test_long_tail_keeps_an_exponential_class_profile():
    from pl_federated.data import Domains, LongTail

    y = labels(20000)
    part = LongTail(imbalance=10.0, min_size=5)(y, 5, seed=0)
    kept = part.counts.sum(0)
    fractions = kept / np.bincount(y, minlength=10)
    np.testing.assert_allclose(fractions, 10.0 ** (-np.arange(10) / 9), rtol=0.01)
    allidx = np.concatenate(part.indices)
    assert len(allidx) == len(np.unique(allidx)) == kept.sum()  # disjoint, the kept samples
    domains = np.repeat([0, 1], 10000)
    by_domain = LongTail(5.0, inner=Domains(clients_per_domain=2))(y, 4, seed=0, domains=domains)
    for k, idx in enumerate(by_domain.indices):
        assert set(domains[idx]) == {k // 2}
    with pytest.raises(ValueError, match="imbalance"):
        LongTail(imbalance=0.5)

"""The store's namespace registry and role registry refuse collisions."""

import pytest

from pl_federated.engine.workers import StoreNamespaces
from pl_federated.models import MLPClassifier
from pl_federated.module import FederatedModule


def test_namespaces_have_one_owner():
    names = StoreNamespaces()
    assert names.reserve("scaffold", "SCAFFOLD") == "scaffold"
    with pytest.raises(ValueError, match="reserved by SCAFFOLD"):
        names.reserve("scaffold", "Other")
    with pytest.raises(ValueError, match="reserved by engine"):
        names.reserve("server", "MyAggregator")
    with pytest.raises(ValueError, match="optimizer state"):
        names.reserve("optim/model", "Mine")


def test_roles_are_namespaces_and_reserved_names_are_refused():
    fed = FederatedModule(MLPClassifier())
    fed.add_role("personal")
    assert fed.store_namespaces.owner("personal") == "engine"
    with pytest.raises(ValueError, match="reserved by engine"):
        fed.store_namespaces.reserve("personal", "SomeCallback")
    for bad in ("local", "server", "optim/x"):
        with pytest.raises(ValueError, match="is reserved"):
            fed.add_role(bad)

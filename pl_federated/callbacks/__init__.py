"""Federated algorithms as Lightning callbacks."""

from pl_federated.callbacks.aggregator import Aggregator, WeightedSum
from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.callbacks.fedbn import FedBN
from pl_federated.callbacks.fedprox import FedProx
from pl_federated.callbacks.summary import FederatedSummary

__all__ = [
    "Aggregator",
    "FedAvg",
    "FedBN",
    "FedProx",
    "FederatedCallback",
    "FederatedSummary",
    "WeightedSum",
]

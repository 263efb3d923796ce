"""Federated algorithms as Lightning callbacks."""

from pl_federated.callbacks.aggregator import Aggregator, WeightedSum
from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.fedavg import FedAvg

__all__ = ["Aggregator", "FedAvg", "FederatedCallback", "WeightedSum"]

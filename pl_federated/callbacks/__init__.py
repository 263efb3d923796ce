"""Federated algorithms as Lightning callbacks."""

from pl_federated.callbacks.aggregator import Aggregator, WeightedSum
from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.deputy import DeputyEnhancedTransfer
from pl_federated.callbacks.ditto import Ditto
from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.callbacks.fedbn import FedBN
from pl_federated.callbacks.federated_distillation import FederatedDistillation
from pl_federated.callbacks.fedmd import FedMD
from pl_federated.callbacks.fedper import FedPer
from pl_federated.callbacks.fedproto import FedProto
from pl_federated.callbacks.fedprox import FedProx
from pl_federated.callbacks.fourier_aggregation import ProgressiveFourierAggregation
from pl_federated.callbacks.kd3a import KD3A
from pl_federated.callbacks.local_only import LocalOnly
from pl_federated.callbacks.mutual_learning import MutualLearning
from pl_federated.callbacks.prototype_alignment import ConjointPrototypeAlignment
from pl_federated.callbacks.retrogress import RetrogressMonitor
from pl_federated.callbacks.summary import FederatedSummary

__all__ = [
    "Aggregator",
    "ConjointPrototypeAlignment",
    "DeputyEnhancedTransfer",
    "Ditto",
    "FedAvg",
    "FedBN",
    "FedMD",
    "FedPer",
    "FedProto",
    "FedProx",
    "FederatedCallback",
    "FederatedDistillation",
    "FederatedSummary",
    "KD3A",
    "LocalOnly",
    "MutualLearning",
    "ProgressiveFourierAggregation",
    "RetrogressMonitor",
    "WeightedSum",
]

"""Federated algorithms as Lightning callbacks."""

from pl_federated.callbacks.aggregator import Aggregator, WeightedSum
from pl_federated.callbacks.attack import ModelPoisoning
from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.deputy import DeputyEnhancedTransfer
from pl_federated.callbacks.ditto import Ditto
from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.callbacks.fedbn import FedBN
from pl_federated.callbacks.federated_distillation import FederatedDistillation
from pl_federated.callbacks.fedmd import FedMD
from pl_federated.callbacks.fednova import FedNova
from pl_federated.callbacks.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from pl_federated.callbacks.fedper import FedPer
from pl_federated.callbacks.fedproto import FedProto
from pl_federated.callbacks.fedprox import FedProx
from pl_federated.callbacks.fedrep import FedRep
from pl_federated.callbacks.fourier_aggregation import ProgressiveFourierAggregation
from pl_federated.callbacks.kd3a import KD3A
from pl_federated.callbacks.local_only import LocalOnly
from pl_federated.callbacks.mutual_learning import MutualLearning
from pl_federated.callbacks.prototype_alignment import ConjointPrototypeAlignment
from pl_federated.callbacks.retrogress import RetrogressMonitor
from pl_federated.callbacks.robust import BufferedAggregator, Krum, Median, TrimmedMean
from pl_federated.callbacks.scaffold import SCAFFOLD
from pl_federated.callbacks.summary import FederatedSummary

__all__ = [
    "Aggregator",
    "BufferedAggregator",
    "ConjointPrototypeAlignment",
    "DeputyEnhancedTransfer",
    "Ditto",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBN",
    "FedMD",
    "FedNova",
    "FedPer",
    "FedProto",
    "FedProx",
    "FedRep",
    "FederatedCallback",
    "FederatedDistillation",
    "FedYogi",
    "FederatedSummary",
    "KD3A",
    "Krum",
    "LocalOnly",
    "Median",
    "ModelPoisoning",
    "MutualLearning",
    "ProgressiveFourierAggregation",
    "RetrogressMonitor",
    "SCAFFOLD",
    "ServerOptimizer",
    "TrimmedMean",
    "WeightedSum",
]

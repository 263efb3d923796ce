"""Federated algorithms as Lightning callbacks.

Each algorithm is imported when first used (``pl_federated.callbacks.FedAvg`` or ``from
pl_federated.callbacks import FedAvg``), so importing the engine, which needs only the base
classes, does not import every algorithm."""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "APFL": "pl_federated.callbacks.apfl",
    "Aggregator": "pl_federated.callbacks.aggregator",
    "BufferedAggregator": "pl_federated.callbacks.robust",
    "ClusteredSampling": "pl_federated.callbacks.clustered_sampling",
    "ConjointPrototypeAlignment": "pl_federated.callbacks.prototype_alignment",
    "DeputyEnhancedTransfer": "pl_federated.callbacks.deputy",
    "Ditto": "pl_federated.callbacks.ditto",
    "FedAdagrad": "pl_federated.callbacks.fedopt",
    "FedAdam": "pl_federated.callbacks.fedopt",
    "FedALA": "pl_federated.callbacks.fedala",
    "FedAMP": "pl_federated.callbacks.fedamp",
    "FedAvg": "pl_federated.callbacks.fedavg",
    "FedAvgM": "pl_federated.callbacks.fedopt",
    "FedBABU": "pl_federated.callbacks.fedbabu",
    "FedBN": "pl_federated.callbacks.fedbn",
    "FederatedCallback": "pl_federated.callbacks.base",
    "FederatedDistillation": "pl_federated.callbacks.federated_distillation",
    "FederatedSummary": "pl_federated.callbacks.summary",
    "FineTuneEvaluation": "pl_federated.callbacks.fine_tune",
    "DPFedAvg": "pl_federated.callbacks.dp_fedavg",
    "EnsembleDistillation": "pl_federated.callbacks.server_distillation",
    "FedBE": "pl_federated.callbacks.fedbe",
    "FedDF": "pl_federated.callbacks.feddf",
    "FedDyn": "pl_federated.callbacks.feddyn",
    "FedFomo": "pl_federated.callbacks.fedfomo",
    "FedHealth": "pl_federated.callbacks.fedhealth",
    "FedIR": "pl_federated.callbacks.fedir",
    "FedMD": "pl_federated.callbacks.fedmd",
    "FedMeta": "pl_federated.callbacks.fedmeta",
    "FedNova": "pl_federated.callbacks.fednova",
    "FedPAC": "pl_federated.callbacks.fedpac",
    "FedPer": "pl_federated.callbacks.fedper",
    "FedProto": "pl_federated.callbacks.fedproto",
    "FedProx": "pl_federated.callbacks.fedprox",
    "L2GD": "pl_federated.callbacks.l2gd",
    "LGFedAvg": "pl_federated.callbacks.lg_fedavg",
    "FedRep": "pl_federated.callbacks.fedrep",
    "FedRoD": "pl_federated.callbacks.fedrod",
    "FedYogi": "pl_federated.callbacks.fedopt",
    "KD3A": "pl_federated.callbacks.kd3a",
    "Krum": "pl_federated.callbacks.robust",
    "LocalOnly": "pl_federated.callbacks.local_only",
    "Median": "pl_federated.callbacks.robust",
    "MOON": "pl_federated.callbacks.moon",
    "ModelPoisoning": "pl_federated.callbacks.attack",
    "NoisyMedian": "pl_federated.callbacks.noisy_median",
    "MutualLearning": "pl_federated.callbacks.mutual_learning",
    "PFedHN": "pl_federated.callbacks.pfedhn",
    "PowerOfChoice": "pl_federated.callbacks.power_of_choice",
    "PFedMe": "pl_federated.callbacks.pfedme",
    "QSGD": "pl_federated.callbacks.qsgd",
    "TopK": "pl_federated.callbacks.topk",
    "SiloBN": "pl_federated.callbacks.silobn",
    "PerFedAvg": "pl_federated.callbacks.per_fedavg",
    "ProgressiveFourierAggregation": "pl_federated.callbacks.fourier_aggregation",
    "RetrogressMonitor": "pl_federated.callbacks.retrogress",
    "SCAFFOLD": "pl_federated.callbacks.scaffold",
    "ServerOptimizer": "pl_federated.callbacks.fedopt",
    "TrimmedMean": "pl_federated.callbacks.robust",
    "WeightedSum": "pl_federated.callbacks.aggregator",
}
"""Public name -> the module that defines it."""

__all__ = [
    "APFL",
    "Aggregator",
    "BufferedAggregator",
    "ClusteredSampling",
    "ConjointPrototypeAlignment",
    "DeputyEnhancedTransfer",
    "Ditto",
    "FedAdagrad",
    "FedAdam",
    "FedALA",
    "FedAMP",
    "FedAvg",
    "FedAvgM",
    "FedBABU",
    "FedBN",
    "DPFedAvg",
    "EnsembleDistillation",
    "FedBE",
    "FedDF",
    "FedDyn",
    "FedFomo",
    "FedHealth",
    "FedIR",
    "FedMD",
    "FedMeta",
    "FedNova",
    "FedPAC",
    "FedPer",
    "FedProto",
    "FedProx",
    "FedRep",
    "FedRoD",
    "FederatedCallback",
    "FederatedDistillation",
    "FedYogi",
    "FederatedSummary",
    "FineTuneEvaluation",
    "KD3A",
    "Krum",
    "L2GD",
    "LGFedAvg",
    "LocalOnly",
    "Median",
    "MOON",
    "ModelPoisoning",
    "MutualLearning",
    "NoisyMedian",
    "PFedHN",
    "PowerOfChoice",
    "PFedMe",
    "QSGD",
    "PerFedAvg",
    "ProgressiveFourierAggregation",
    "RetrogressMonitor",
    "SCAFFOLD",
    "SiloBN",
    "TopK",
    "ServerOptimizer",
    "TrimmedMean",
    "WeightedSum",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

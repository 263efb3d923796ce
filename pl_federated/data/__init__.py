"""Datasets, partitions and the FederatedDataModule."""

from pl_federated.data.datamodule import ClientSlots, FederatedDataModule
from pl_federated.data.datasets import DATASETS, load_dataset
from pl_federated.data.partition import (
    IID,
    Dirichlet,
    Domains,
    Partition,
    Partitioner,
    Pathological,
    QuantitySkew,
)

__all__ = [
    "DATASETS",
    "IID",
    "ClientSlots",
    "Dirichlet",
    "Domains",
    "FederatedDataModule",
    "Partition",
    "Partitioner",
    "Pathological",
    "QuantitySkew",
    "load_dataset",
]

"""Datasets, partitions and the FederatedDataModule."""

from pl_federated.data.client_data import ClientDataModule
from pl_federated.data.client_datasets import ClientDatasets
from pl_federated.data.datamodule import FederatedDataModule
from pl_federated.data.datasets import DATASETS, load_dataset
from pl_federated.data.partition import (
    IID,
    Dirichlet,
    Domains,
    FeatureNoise,
    LongTail,
    Partition,
    Partitioner,
    Pathological,
    QuantitySkew,
)
from pl_federated.data.report import PartitionReport

__all__ = [
    "DATASETS",
    "ClientDataModule",
    "ClientDatasets",
    "IID",
    "Dirichlet",
    "Domains",
    "FeatureNoise",
    "FederatedDataModule",
    "LongTail",
    "Partition",
    "PartitionReport",
    "Partitioner",
    "Pathological",
    "QuantitySkew",
    "load_dataset",
]

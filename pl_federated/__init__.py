"""pl_federated: federated learning simulation as one Lightning ``Trainer.fit``."""

from pl_federated.callbacks import Aggregator, FedAvg, FederatedCallback
from pl_federated.data import IID, ClientDatasets, Dirichlet, FederatedDataModule
from pl_federated.module import FederatedModule
from pl_federated.store import ClientStore

__all__ = [
    "IID",
    "Aggregator",
    "ClientDatasets",
    "ClientStore",
    "Dirichlet",
    "FedAvg",
    "FederatedCallback",
    "FederatedDataModule",
    "FederatedModule",
]
__version__ = "0.1.0"

"""The DataLoader path (ClientDatasets) vs the in-memory tensor fast path (FederatedDataModule)
in a whole federation: same clients, same model, same seeded batches, same numbers.

  .venv/bin/python benchmarks/dataloader_path.py --repeat 3

Workload: the MNIST test set (``../shared/data``; scikit-learn digits resized to 28x28 when
absent) split over 100 clients by Dirichlet(0.5), a 784-200-200-10 MLP, FedAvg over 20 clients
per round, 1 local epoch, batch 32, SGD, evaluation off. (a) ``FederatedDataModule``: batches
are index slices of each client's tensors. (b) ``ClientDatasets`` over one ``TensorDataset`` per
client (the same tensors): batches come from a ``DataLoader`` (per-sample ``__getitem__`` +
``default_collate``), ``num_workers=0``. Runs alternate a, b, a, b; the time is the fit's
training (``on_train_start`` to ``on_train_end``). The final server states must be equal
(the script checks it: the two paths draw the same samples per batch).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from fedavg_throughput import quiet_trainer  # this folder
from torch.utils.data import TensorDataset

from pl_federated import ClientDatasets, FedAvg, FederatedDataModule, FederatedModule
from pl_federated.data import Dirichlet
from pl_federated.models import MLPClassifier

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_test10k.npz"


class TrainTimer(pl.Callback):
    """Seconds from on_train_start to on_train_end (excludes setup)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def tensor_data(clients: int) -> tuple[FederatedDataModule, str]:
    if MNIST.is_file():
        dm = FederatedDataModule(
            "npz", path=str(MNIST), num_clients=clients, partition=Dirichlet(0.5, min_size=10)
        )
        source = "MNIST test set (../shared/data)"
    else:
        dm = FederatedDataModule(
            "digits", num_clients=clients, partition=Dirichlet(0.5, min_size=10)
        )
        source = "scikit-learn digits (8x8)"
    dm.setup("fit")
    return dm, source


def dataset_data(dm: FederatedDataModule) -> ClientDatasets:
    train = [TensorDataset(*dm.client_train(k)) for k in range(dm.num_clients)]
    test = [TensorDataset(*dm.client_test(k)) for k in range(dm.num_clients)]
    return ClientDatasets(train, test, batch_size=dm.batch_size)


def run(dm, rounds: int, input_size: int) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    client = MLPClassifier(input_size=input_size, hidden=(200, 200), lr=0.05)
    fed = FederatedModule(client, clients_per_round=20, local_epochs=1, eval_every_n_rounds=0)
    timer = TrainTimer()
    quiet_trainer(max_epochs=rounds, callbacks=[FedAvg(), timer]).fit(fed, dm)
    return timer.seconds, fed.server_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch._dynamo  # noqa: F401  (the first optimizer step imports it: not timed)

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    tensors, source = tensor_data(args.clients)
    datasets = dataset_data(tensors)
    input_size = int(torch.tensor(tensors.input_shape).prod())
    times: dict[str, list[float]] = {"tensor": [], "dataloader": []}
    states = {}
    for _ in range(args.repeat):
        for name, dm in (("tensor", tensors), ("dataloader", datasets)):
            seconds, states[name] = run(dm, args.rounds, input_size)
            times[name].append(seconds)
    same = all(torch.equal(states["tensor"][k], v) for k, v in states["dataloader"].items())
    updates = args.rounds * 20
    samples = int(tensors.num_train.sum())
    print(
        f"data: {source}, {args.clients} clients ({samples} training samples), 20 per round, "
        f"{args.rounds} rounds = {updates} client updates; {args.threads} thread(s); "
        f"{platform.machine()}, torch {torch.__version__}"
    )
    print(f"final server states equal: {same}")
    print("| path | seconds per run (a, b alternated) | median | client updates/min | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    base = sorted(times["tensor"])[len(times["tensor"]) // 2]
    for name, label in (("tensor", "tensor index slices (a)"), ("dataloader", "DataLoader (b)")):
        median = sorted(times[name])[len(times[name]) // 2]
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(
            f"| {label} | {runs} | {median:.2f} | {updates / median * 60:,.0f} | "
            f"{median / base:.2f} |"
        )
    if not same:
        raise SystemExit("the two paths ended in different server states")


if __name__ == "__main__":
    main()

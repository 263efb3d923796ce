"""Data-path speed: (1) one local epoch over every client of MNIST-10k split 100 ways, the
tensor index-slice path pl_federated uses vs a standard ``DataLoader(Subset(...))`` per
client; (2) Dirichlet(0.5) partition of 1,000,000 labels into 1,000 clients.

  .venv/bin/python benchmarks/data_speed.py --repeat 3

Only batch production is timed (both paths materialize every batch as new tensors: index
gathering vs collating; the samples are counted as a check); no model runs. MNIST comes from ../shared/data when present, else random tensors of the same
shape (the timing does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from pl_federated.data import Dirichlet
from pl_federated.data.datasets import load_npz

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_test10k.npz"


def mnist() -> tuple[torch.Tensor, torch.Tensor, str]:
    if DATA.is_file():
        loaded = load_npz(DATA)
        return loaded.x, loaded.y, "MNIST test set (../shared/data)"
    g = torch.Generator().manual_seed(0)
    return torch.rand(10_000, 1, 28, 28, generator=g), torch.randint(0, 10, (10_000,)), "random"


def tensor_epoch(xs, ys, batch_size: int) -> float:
    """pl_federated's path: a seeded permutation per client, batches are index slices."""
    start, count = time.perf_counter(), 0
    g = torch.Generator().manual_seed(0)
    for x, y in zip(xs, ys, strict=True):
        perm = torch.randperm(len(y), generator=g)
        for i in range(math.ceil(len(y) / batch_size)):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            batch = (x[idx], y[idx])  # what the FederatedModule feeds training_step
            count += len(batch[1])
    assert count == sum(len(y) for y in ys)
    return time.perf_counter() - start


def dataloader_epoch(dataset, indices, batch_size: int) -> float:
    """The common pattern: a DataLoader over a Subset of one TensorDataset per client."""
    start, count = time.perf_counter(), 0
    g = torch.Generator().manual_seed(0)
    for idx in indices:
        loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=True, generator=g)
        for _, yb in loader:
            count += len(yb)
    assert count == sum(len(i) for i in indices)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, source = mnist()
    part = Dirichlet(0.5, min_size=10)(y.numpy(), args.clients, seed=0)
    xs = [x[torch.from_numpy(i)].contiguous() for i in part.indices]
    ys = [y[torch.from_numpy(i)].contiguous() for i in part.indices]
    dataset = TensorDataset(x, y)
    indices = [i.tolist() for i in part.indices]
    tensor = min(tensor_epoch(xs, ys, args.batch_size) for _ in range(args.repeat))
    loader = min(dataloader_epoch(dataset, indices, args.batch_size) for _ in range(args.repeat))
    print(f"data: {source}; {args.clients} clients (Dirichlet 0.5), batch {args.batch_size}")
    print(f"| one epoch over all clients | seconds (best of {args.repeat}) | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| DataLoader(Subset) per client | {loader:.3f} | 1.0x |")
    print(f"| tensor index slices (pl_federated) | {tensor:.3f} | {loader / tensor:.1f}x faster |")
    labels = np.random.default_rng(0).integers(0, 10, 1_000_000)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        big = Dirichlet(0.5, min_size=10)(labels, 1000, seed=0)
        times.append(time.perf_counter() - start)
    print(
        f"Dirichlet(0.5): 1,000,000 labels into 1,000 clients in {min(times):.2f} s "
        f"(best of {args.repeat}; smallest client {int(big.sizes.min())})"
    )


if __name__ == "__main__":
    main()

"""A tiny federation, run as a script so Lightning's DDP launcher can start its ranks.

    python tests/helpers/ddp_run.py --algo fedavg --devices 2 --rounds 3 --out DIR [--resume CKPT]

Writes ``DIR/result.pt`` (server state, history, client metrics; global rank 0 only) and a
checkpoint per round under ``DIR/ckpt``. ``tests/test_ddp.py`` compares 2 processes with 1.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from pl_federated import ClientDatasets, FederatedDataModule, FederatedModule
from pl_federated.callbacks import (
    KD3A,
    MOCHA,
    SCAFFOLD,
    ClusteredSampling,
    ConjointPrototypeAlignment,
    DeputyEnhancedTransfer,
    DPFedAvg,
    FedAdam,
    FedAMP,
    FedAvg,
    FedBE,
    FedBN,
    FedDyn,
    FederatedCallback,
    FederatedDistillation,
    FedFomo,
    FedGen,
    FedGKT,
    FedMD,
    FedMeta,
    FedNova,
    FedPAC,
    FedProto,
    FedProx,
    FedWeIT,
    FetchSGD,
    Gossip,
    Krum,
    LocalOnly,
    Median,
    ModelPoisoning,
    MutualLearning,
    PFedHN,
    ProgressiveFourierAggregation,
    RetrogressMonitor,
    TaskSequence,
)
from pl_federated.data import IID, Dirichlet
from pl_federated.models import CNNClassifier, MLPClassifier


class Unverified(FederatedCallback):
    """Keeps server-side state without declaring how it merges across ranks."""

    def on_client_end(self, trainer, fed, client):
        self.last = client


def hypernetwork_embeddings(cb):
    hypernetwork = getattr(cb, "hypernetwork", None)
    return None if hypernetwork is None else hypernetwork.embeddings.weight.detach().clone()


def fedweit_kb(cb):
    if not isinstance(cb, FedWeIT) or not cb.kb:
        return None
    return torch.cat([t.flatten() for t in cb.kb.values()])


def dp_clip_norm(cb):
    return torch.tensor(cb.clip_norm) if isinstance(cb, DPFedAvg) else None


def feddyn_h(cb):
    h = getattr(cb, "h", None) if isinstance(cb, FedDyn) else None
    return None if h is None else torch.cat([t.flatten() for t in h.values()])


def fedgen_generator(cb):
    generator = getattr(cb, "generator", None) if isinstance(cb, FedGen) else None
    return None if generator is None else torch.cat([p.flatten() for p in generator.parameters()])


def fedgkt_server(cb):
    model = getattr(cb, "server_model", None) if isinstance(cb, FedGKT) else None
    return None if model is None else torch.cat([p.flatten() for p in model.parameters()])


def build(algo: str) -> tuple[pl.LightningModule, list, dict]:
    torch.manual_seed(0)
    if algo == "fedavg_prox":
        client = MLPClassifier(hidden=(32,), lr=0.05, momentum=0.9)
        return client, [FedAvg(), FedProx(mu=0.01)], dict(local_steps=3)
    if algo == "datasets":  # FedAvg on ClientDatasets (the DataLoader path), see run()
        return MLPClassifier(hidden=(32,), lr=0.05, momentum=0.9), [FedAvg()], dict(local_steps=3)
    if algo == "fedbn":
        client = CNNClassifier(image_size=8, channels=(4, 8), hidden=16, batch_norm=True, lr=0.05)
        return client, [FedBN()], dict(local_steps=3)
    if algo == "scaffold":
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedAvg(weighting="uniform"), SCAFFOLD()], dict(local_steps=3)
    if algo == "fd":
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [LocalOnly(), FederatedDistillation()], dict(local_steps=3)
    if algo == "mutual":
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedAvg(), MutualLearning()], dict(local_steps=3)
    if algo == "fedmd":  # the public set: scikit-learn's digits, 50 inputs a round
        client = MLPClassifier(hidden=(32,), lr=0.05)
        fedmd = FedMD(public_dataset="digits", public_samples=50, digest_batch_size=16)
        return client, [LocalOnly(), fedmd], dict(local_steps=3)
    if algo == "fedproto":
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [LocalOnly(), FedProto(lam=1.0)], dict(local_steps=3)
    if algo == "kd3a":  # targets 0 and 3 (one per rank) vote with both ranks' sources
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return (
            client,
            [KD3A(target_clients=[0, 3], gate_begin=0.1, gate_end=0.15)],
            dict(local_steps=3, clients_per_round=1.0),
        )
    if algo == "meta_sgd":  # FedMeta's learned rates: server state summed over ranks
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedAvg(), FedMeta("meta_sgd", inner_lr=0.05)], dict(local_steps=3)
    if algo == "fedamp":  # per-client cloud models from both ranks' uploads
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedAMP(alpha_k=1.0, sigma=25.0, lam=0.1)], dict(local_steps=3)
    if algo == "fedfomo":  # the pool and affinities: gathered uploads and benefits
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedFomo(models_per_round=2, split="train")], dict(local_steps=3)
    if algo == "fedpac":  # combined classifiers and centroids from both ranks' statistics
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedPAC()], dict(local_epochs=2)
    if algo == "dp_fedavg":  # clipped sums and counts over ranks, the same noise on each
        client = MLPClassifier(hidden=(32,), lr=0.05)
        dp = DPFedAvg(noise_multiplier=0.5, clip_norm=0.5, adaptive=True, clipped_count_stddev=2)
        return client, [dp], dict(local_steps=3)
    if algo == "pfedhn":  # the hypernetwork and its optimizer, stepped from gathered uploads
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [PFedHN(embedding_dim=8, hidden=16, server_lr=0.05)], dict(local_steps=3)
    if algo == "feddyn":  # h from the uploads' sums over ranks, g_k per client
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedDyn(alpha=0.05)], dict(local_steps=3)
    if algo == "clustered":  # the draws on every rank, the gradients gathered
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [ClusteredSampling(variant="similarity")], dict(local_steps=3)
    if algo == "fedbe":  # distilled on every rank from the gathered uploads, rank 0's kept
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedBE(num_samples=2, distill_steps=5)], dict(local_steps=3)
    if algo == "fedgen":  # the generator trained from gathered heads on every rank
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedGen(generator_steps=5, generator_batch=16)], dict(local_steps=3)
    if algo == "fedgkt":  # the server model trained on gathered features on every rank
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedGKT(server_hidden=[16], server_epochs=1)], dict(local_steps=3)
    if algo == "gossip":  # each client's mixture from both ranks' uploads
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [Gossip(topology="ring")], dict(local_steps=3, clients_per_round=1.0)
    if algo == "fetchsgd":  # the clients' sketches summed over ranks, sketch state identical
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FetchSGD(cols=300, topk_ratio=0.1)], dict(local_steps=3)
    if algo == "mocha":  # the task models gathered, Omega identical on every rank
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [MOCHA(lam=0.01)], dict(local_steps=3)
    if algo == "fedweit":  # the masked base sums over ranks, the gathered A's (knowledge base)
        client = MLPClassifier(hidden=(32,), lr=0.05)
        tasks = TaskSequence(tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], rounds_per_task=1)
        return client, [FedWeIT(lambda_l2=1.0), tasks], dict(local_steps=3)
    if algo == "poisoning":  # a scaled attacker on rank 1, robust aggregation on every rank
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [Median(), ModelPoisoning(clients=[1], attack="scale")], dict(local_steps=3)
    if algo == "unverified":  # a callback that does not declare fed_ddp support: refused
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedAvg(), Unverified()], dict(local_steps=3)
    if algo == "pfa_det":
        client = MLPClassifier(hidden=(32,), lr=0.05)
        callbacks = [
            ProgressiveFourierAggregation(),
            DeputyEnhancedTransfer(split="train"),
            RetrogressMonitor(split="train", per_epoch=True, plot=False),
        ]
        return client, callbacks, dict(local_epochs=3)
    if algo == "fednova":  # unequal clients: unequal local steps, normalized
        client = CNNClassifier(
            image_size=8, channels=(4, 8), hidden=16, batch_norm=True, lr=0.05, momentum=0.9
        )
        return client, [FedNova()], dict(local_epochs=1)
    if algo == "krum":
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [Krum(f=0, m=2)], dict(local_steps=3)  # 4 uploads a round
    if algo == "fedadam":
        client = MLPClassifier(hidden=(32,), lr=0.05)
        return client, [FedAdam(server_lr=0.01)], dict(local_steps=3)
    if algo == "pfa_det_cpa":
        client = MLPClassifier(hidden=(32,), lr=0.05)
        callbacks = [
            ProgressiveFourierAggregation(),
            DeputyEnhancedTransfer(split="train"),
            ConjointPrototypeAlignment(warmup_rounds=1),
        ]
        return client, callbacks, dict(local_epochs=3)
    raise ValueError(algo)


def run(
    algo: str,
    devices: int,
    rounds: int,
    out: Path,
    resume: str | None = None,
    strategy: str = "fed_ddp",
) -> FederatedModule:
    """Fit ``algo`` (1 device: the default single-device strategy; more: ``strategy``), on one
    torch thread in every process, so the processes compute the clients' updates bit for bit
    as one process does (Adam-trained server state turns last-bit differences into
    lr-sized steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(algo, devices, rounds, out, resume, strategy)
    finally:
        torch.set_num_threads(threads)


def _fit(
    algo: str, devices: int, rounds: int, out: Path, resume: str | None, strategy: str
) -> FederatedModule:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    client, callbacks, options = build(algo)
    fed = FederatedModule(client, **{"clients_per_round": 4, "seed": 0, **options})
    data = FederatedDataModule(
        "digits",
        num_clients=5,
        partition=IID() if algo == "fedweit" else Dirichlet(0.5, min_size=20),  # every task
        max_train_samples=40,
        public_fraction=0.1 if algo == "fedbe" else 0.0,  # the server's unlabeled data
    )
    if algo == "datasets":  # the same clients as per-client TensorDatasets
        data.setup("fit")
        data = ClientDatasets(
            [TensorDataset(*data.client_train(k)) for k in range(data.num_clients)],
            [TensorDataset(*data.client_test(k)) for k in range(data.num_clients)],
            batch_size=data.batch_size,
        )
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=rounds,
        accelerator="cpu",
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, ckpt],
    )
    trainer.fit(fed, data, ckpt_path=resume)
    if trainer.global_rank == 0:
        result = {
            "server_state": {k: v.cpu() for k, v in fed.server_state.items()},
            "history": [{k: v for k, v in h.items() if k != "round/seconds"} for h in fed.history],
            "client_metrics": fed.client_metrics,
            "global_step": trainer.global_step,
            "prototypes": [
                cb.bank.global_ for cb in callbacks if isinstance(cb, ConjointPrototypeAlignment)
            ],
            "scaffold_control": [cb.control for cb in callbacks if isinstance(cb, SCAFFOLD)],
            "retrogress": [
                (cb.history, cb.curve) for cb in callbacks if isinstance(cb, RetrogressMonitor)
            ],
            "server_knowledge": [  # what non-weight methods keep on the server
                t
                for cb in callbacks
                for t in (
                    getattr(cb, "table", None),  # FD's per-class logits
                    getattr(cb, "consensus", None),  # FedMD's consensus
                    getattr(getattr(cb, "bank", None), "global_", None),  # FedProto / CPA
                    getattr(cb, "weights", None),  # KD3A's smoothed aggregation weights
                    getattr(cb, "rates", None),  # FedMeta's Meta-SGD rates
                    getattr(cb, "affinity", None),  # FedFomo's affinities
                    getattr(cb, "centroids", None),  # FedPAC's class centroids
                    hypernetwork_embeddings(cb),  # pFedHN's client embeddings
                    dp_clip_norm(cb),  # DPFedAvg's adapted clip norm
                    feddyn_h(cb),  # FedDyn's server state h
                    getattr(cb, "gradients", None),  # ClusteredSampling's representative ones
                    fedgen_generator(cb),  # FedGen's generator
                    fedgkt_server(cb),  # FedGKT's server model
                    getattr(cb, "error_sketch", None),  # FetchSGD's error accumulation
                    getattr(cb, "omega", None),  # MOCHA's task relationships
                    fedweit_kb(cb),  # FedWeIT's knowledge base
                )
                if t is not None
            ],
        }
        torch.save(result, out / "result.pt")
    return fed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algo", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume")
    parser.add_argument("--strategy", default="fed_ddp")
    args = parser.parse_args()
    run(args.algo, args.devices, args.rounds, args.out, args.resume, args.strategy)


if __name__ == "__main__":
    main()

"""All baselines and the PRR-FL callbacks on one table: personalized and global metrics.

Settings (data from ../shared/data): ``digit_domains`` (MNIST, USPS, scikit-learn digits at
28x28, 2 clients per domain, at most 150 training images per client, BN CNN, 5 local epochs as
in PRR-FL) and ``mnist_dirichlet`` (MNIST-10k over 20 clients by Dirichlet(0.3), MLP
784-200-10, half the clients per round, 3 local epochs so DET can reach every stage;
``mnist_dirichlet_01`` the same with Dirichlet(0.1)). Every client keeps a 10% validation
split (DET's stage metric and FedFomo's benefits) in every setting, for every method alike.
Fine-tuning methods (FedAvg + FT, FedBABU, Per-FedAvg, FedMeta) report their ``finetuned/*``
numbers as the personalized ones. Retrogress (``RetrogressMonitor`` on every run): the mean
drop of a client's validation macro-F1 when it receives the server state, over the rounds.
Uploaded kB/round: the engine's ``comm/upload_bytes`` (all clients of a round), averaged
over the rounds and seeds.

  .venv/bin/python scripts/compare.py --settings digit_domains mnist_dirichlet --seeds 0 1 2
  .venv/bin/python scripts/compare.py --methods fedavg fedprox pfa_det --seeds 0   # a subset
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

from common import (
    cnn,
    digit_domains,
    experiment_args,
    fit,
    mnist_dirichlet,
    mnist_mlp,
    stat,
    write_table,
)

from pl_federated.callbacks import (
    APFL,
    L2GD,
    MOCHA,
    MOON,
    SCAFFOLD,
    ClusteredSampling,
    DeputyEnhancedTransfer,
    Ditto,
    FedAdam,
    FedALA,
    FedAMP,
    FedAvg,
    FedAvgM,
    FedBABU,
    FedBE,
    FedBN,
    FedDF,
    FedDyn,
    FederatedDistillation,
    FedFomo,
    FedGen,
    FedGKT,
    FedIR,
    FedMeta,
    FedNova,
    FedPAC,
    FedPer,
    FedProto,
    FedProx,
    FedRep,
    FedRoD,
    FineTuneEvaluation,
    LGFedAvg,
    LocalOnly,
    Median,
    MutualLearning,
    NoisyMedian,
    PerFedAvg,
    PFedHN,
    PFedMe,
    PowerOfChoice,
    ProgressiveFourierAggregation,
    RetrogressMonitor,
    SiloBN,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "local": ("Local-only", lambda: [LocalOnly()]),
    "fedavg": ("FedAvg", lambda: [FedAvg()]),
    "fedavg_ft": (
        "FedAvg + fine-tuning (1 epoch)",
        lambda: [FedAvg(), FineTuneEvaluation(epochs=1, at="last_round")],
    ),
    "fedavgm": ("FedAvgM", lambda: [FedAvgM()]),
    "fedadam": ("FedAdam (server lr 0.03)", lambda: [FedAdam(server_lr=0.03)]),
    "fedprox": ("FedProx (mu 0.01)", lambda: [FedAvg(), FedProx(mu=0.01)]),
    "scaffold": ("SCAFFOLD", lambda: [FedAvg(weighting="uniform"), SCAFFOLD()]),
    "scaffold_sgd": (
        "SCAFFOLD, clients without momentum",
        lambda: [FedAvg(weighting="uniform"), SCAFFOLD()],
    ),
    "fednova": ("FedNova", lambda: [FedNova()]),
    "fedbn": ("FedBN", lambda: [FedBN()]),
    "fedper": ("FedPer", lambda: [FedPer()]),
    "lg_fedavg": ("LG-FedAvg", lambda: [LGFedAvg()]),
    "fedrep": ("FedRep", lambda: [FedRep(head_epochs=1)]),
    "fedbabu": (
        "FedBABU (fine-tuned 2 epochs)",
        lambda: [FedBABU(), FineTuneEvaluation(epochs=2, at="last_round")],
    ),
    "ditto": ("Ditto (lambda 0.1)", lambda: [FedAvg(), Ditto(lam=0.1)]),
    "apfl": ("APFL (alpha 0.5, learned)", lambda: [FedAvg(), APFL()]),
    "fedala": ("FedALA", lambda: [FedAvg(), FedALA()]),
    "pfedme": ("pFedMe (lambda 15, K 5)", lambda: [PFedMe(personal_lr=0.05)]),
    "per_fedavg": (
        "Per-FedAvg (FO, one adaptation step)",
        lambda: [
            FedAvg(),
            PerFedAvg(alpha=0.01),
            FineTuneEvaluation(steps=1, lr=0.01, at="last_round"),
        ],
    ),
    "fedmeta": (
        "FedMeta (MAML, 5 adaptation steps)",
        lambda: [
            FedAvg(),
            FedMeta(inner_lr=0.01),
            FineTuneEvaluation(steps=5, lr=0.01, at="last_round"),
        ],
    ),
    "fedrod": ("FedRoD", lambda: [FedRoD(head_lr=0.05)]),
    "l2gd": ("L2GD (lambda 1, p 0.2)", lambda: [L2GD(lam=1.0, p=0.2)]),
    "fedamp": ("FedAMP", lambda: [FedAMP(alpha_k=1.0, sigma=25.0, lam=0.1)]),
    "fedfomo": ("FedFomo (M 5)", lambda: [FedFomo(models_per_round=5)]),
    "pfedhn": ("pFedHN (Adam 0.01)", lambda: [PFedHN(optimizer="adam")]),
    "fedpac": ("FedPAC", lambda: [FedPAC()]),
    "fml": ("FML", lambda: [FedAvg(), MutualLearning()]),
    "fd": ("FD", lambda: [LocalOnly(), FederatedDistillation()]),
    "fedproto": ("FedProto", lambda: [LocalOnly(), FedProto()]),
    "pfa": ("PFA", lambda: [ProgressiveFourierAggregation()]),
    "det_fedavg": ("DET + FedAvg", lambda: [FedAvg(), DeputyEnhancedTransfer()]),
    "pfa_det": ("PFA + DET", lambda: [ProgressiveFourierAggregation(), DeputyEnhancedTransfer()]),
    "feddyn": ("FedDyn (alpha 0.01)", lambda: [FedDyn(alpha=0.01)]),
    "moon": ("MOON (mu 1, tau 0.5)", lambda: [FedAvg(), MOON()]),
    "fedir": ("FedIR", lambda: [FedAvg(), FedIR()]),
    "feddf": ("FedDF (100 steps, 10% public split)", lambda: [FedDF()]),
    "fedbe": ("FedBE (Gaussian, 10 samples, 10% public split)", lambda: [FedBE()]),
    "fedbe_no_samples": (
        "FedBE without samples (clients + mean, SWA)",
        lambda: [FedBE(num_samples=0)],
    ),
    "fedbe_no_swa": (
        "FedBE without SWA (Gaussian, 10 samples)",
        lambda: [FedBE(swa=False)],
    ),
    "fedbe_dirichlet": (
        "FedBE (Dirichlet alpha 1, 10 samples)",
        lambda: [FedBE(distribution="dirichlet")],
    ),
    "clustered_samples": (
        "Clustered sampling (Alg. 1, data shares)",
        lambda: [ClusteredSampling(variant="samples")],
    ),
    "clustered_similarity": (
        "Clustered sampling (Alg. 2, arccos)",
        lambda: [ClusteredSampling(variant="similarity")],
    ),
    "power_of_choice": (
        "Power-of-choice (d 15)",
        lambda: [FedAvg(weighting="uniform"), PowerOfChoice(d=15)],
    ),
    "median": ("Median", lambda: [Median()]),
    "noisy_median": ("Noisy median (sigma 0.01)", lambda: [NoisyMedian(noise_std=0.01)]),
    "fedgen": ("FedGen (alpha 1, 20 generator steps)", lambda: [FedGen()]),
    "fedgkt": ("FedGKT (server MLP 256-256)", lambda: [FedGKT()]),
    "silobn": ("SiloBN", lambda: [SiloBN()]),
    "mocha": ("MOCHA-style MTL (lam 0.001)", lambda: [MOCHA()]),
}
# FedBN and SiloBN need BatchNorm (the MLP has none); the digit-domain CNN has no momentum anyway
NOT_APPLICABLE = {
    "mnist_dirichlet": {"fedbn", "silobn"},
    "mnist_dirichlet_01": {"fedbn", "silobn"},
    "digit_domains": {"scaffold_sgd"},
}
# SCAFFOLD's control-variate correction, pFedMe's, L2GD's and FedDyn's updates assume plain SGD
CLIENT_OPTIONS = {m: {"momentum": 0.0} for m in ("scaffold_sgd", "pfedme", "l2gd", "feddyn")}
# the server distillation methods hold out 10% of the data as the server's unlabeled split
DATA_OPTIONS = {
    m: {"public_fraction": 0.1}
    for m in ("feddf", "fedbe", "fedbe_no_samples", "fedbe_no_swa", "fedbe_dirichlet")
}
# L2GD averages every client's model at each averaging block
MODULE_OPTIONS = {"l2gd": {"clients_per_round": 1.0}}


SETTINGS = {
    "digit_domains": dict(
        data=lambda seed, **o: digit_domains(seed, max_train_samples=150, val_fraction=0.1, **o),
        client=cnn,
        module=dict(local_epochs=5, clients_per_round=1.0),
        rounds=10,
    ),
    "mnist_dirichlet": dict(
        data=lambda seed, **o: mnist_dirichlet(0.3, seed, val_fraction=0.1, **o),
        client=mnist_mlp,
        module=dict(local_epochs=3, clients_per_round=0.5),
        rounds=20,
    ),
    "mnist_dirichlet_01": dict(
        data=lambda seed, **o: mnist_dirichlet(0.1, seed, val_fraction=0.1, **o),
        client=mnist_mlp,
        module=dict(local_epochs=3, clients_per_round=0.5),
        rounds=20,
    ),
}


def run(setting: str, method: str, seed: int) -> dict[str, float]:
    spec = SETTINGS[setting]
    start = time.perf_counter()
    fed = fit(
        spec["data"](seed, **DATA_OPTIONS.get(method, {})),
        functools.partial(spec["client"], **CLIENT_OPTIONS.get(method, {})),
        [*METHODS[method][1](), RetrogressMonitor(plot=False)],  # measured for every method
        spec["rounds"],
        seed,
        **{**spec["module"], **MODULE_OPTIONS.get(method, {})},
    )
    last = fed.history[-1]
    # a fine-tuning method's personalized model is the fine-tuned one (FineTuneEvaluation)
    tuned = "finetuned/acc_mean" in last
    acc = fed.client_metrics["finetuned_acc" if tuned else "personal_acc"]
    return {
        "pf1": last["finetuned/f1_mean" if tuned else "personal/f1_mean"],
        "pacc": last["finetuned/acc_mean" if tuned else "personal/acc_mean"],
        "worst": float(acc[~acc.isnan()].min()),
        "gacc": last.get("global/acc", float("nan")),  # absent: no global model
        "round_seconds": statistics.mean(r["round/seconds"] for r in fed.history),
        "upload_kb": statistics.mean(r["comm/upload_bytes"] for r in fed.history) / 1e3,
        "retrogress": statistics.mean(
            r["retrogress/mean"] for r in fed.history if "retrogress/mean" in r
        ),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    args = experiment_args(__doc__, SETTINGS, "methods", METHODS, "compare")
    for setting in args.settings:
        lines = [
            "| method | personal macro-F1 | personal acc | worst client acc | global acc | "
            "retrogress | uploaded kB/round | seconds/round | seconds/run |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for method in args.methods:
            if method in NOT_APPLICABLE.get(setting, ()):
                continue
            rs = [run(setting, method, s) for s in args.seeds]
            lines.append(
                f"| {METHODS[method][0]} | {stat([r['pf1'] for r in rs])} | "
                f"{stat([r['pacc'] for r in rs])} | {stat([r['worst'] for r in rs])} | "
                f"{stat([r['gacc'] for r in rs])} | "
                f"{stat([r['retrogress'] for r in rs])} | "
                f"{statistics.mean(r['upload_kb'] for r in rs):.0f} | "
                f"{statistics.mean(r['round_seconds'] for r in rs):.2f} | "
                f"{statistics.mean(r['seconds'] for r in rs):.0f} |"
            )
            print(lines[-1], flush=True)
        write_table(args.out, setting, args.seeds, lines)


if __name__ == "__main__":
    main()

"""Compare the knowledge-distillation methods (and KD3A) on real data; writes Markdown tables.

Settings (data from ../shared/data, see docs/experiments.md):

* ``digit_domains``: MNIST, USPS and scikit-learn digits at 28x28, 2 clients per domain, at
  most 150 training images per client, small BN CNN.
* ``mnist_dirichlet``: the MNIST test set (10k) over 20 clients by Dirichlet(0.3) labels,
  MLP 784-200-10, half the clients per round.

Methods: Local-only, FedAvg, FML (MutualLearning + FedAvg), FD (FederatedDistillation), FedMD
and FedProto (all three with LocalOnly: no weights move). In both settings 10% of the data is
held out as FedMD's public set before partitioning, for every method alike. The ``kd3a``
setting: one client per domain, each domain in turn the unlabeled target; KD3A against
"FedAvg of the sources evaluated on the target" (``FedAvg(ignore_clients=[target])``).

  .venv/bin/python scripts/kd_comparison.py --settings digit_domains mnist_dirichlet kd3a
"""

from __future__ import annotations

import statistics
import time

from common import (  # noqa: E402  (this folder)
    cnn,
    digit_domains,
    experiment_parser,
    fit,
    mnist_dirichlet,
    mnist_mlp,
    parse_experiment_args,
    stat,
)

from pl_federated import FederatedModule
from pl_federated.callbacks import (
    KD3A,
    FedAvg,
    FederatedDistillation,
    FedMD,
    FedProto,
    LocalOnly,
    MutualLearning,
)

METHODS = {
    "local": ("Local-only", lambda: [LocalOnly()]),
    "fedavg": ("FedAvg", lambda: [FedAvg()]),
    "fml": ("FML (MutualLearning + FedAvg)", lambda: [FedAvg(), MutualLearning()]),
    "fd": ("FD (FederatedDistillation)", lambda: [LocalOnly(), FederatedDistillation()]),
    "fedmd": ("FedMD", lambda: [LocalOnly(), FedMD(public_samples=500)]),
    "fedproto": ("FedProto", lambda: [LocalOnly(), FedProto()]),
}
UPLOAD_KEYS = ("fd/upload_bytes", "fedmd/upload_bytes", "fedproto/upload_bytes")


SETTINGS = {
    "digit_domains": dict(
        data=lambda seed: digit_domains(seed, max_train_samples=150, public_fraction=0.1),
        client=cnn,
        module=dict(local_epochs=2, clients_per_round=1.0),
        rounds=10,
    ),
    "mnist_dirichlet": dict(
        data=lambda seed: mnist_dirichlet(0.3, seed, public_fraction=0.1),
        client=mnist_mlp,
        module=dict(local_epochs=2, clients_per_round=0.5),
        rounds=20,
    ),
}


def weights_bytes(fed: FederatedModule) -> int:
    return sum(t.numel() * t.element_size() for t in fed.server_state.values())


def run_method(setting: str, method: str, seed: int) -> dict[str, float]:
    spec = SETTINGS[setting]
    start = time.perf_counter()
    fed = fit(
        spec["data"](seed),
        spec["client"],
        METHODS[method][1](),
        spec["rounds"],
        seed,
        **spec["module"],
    )
    last = fed.history[-1]
    uploads = [h.get(k) for h in fed.history for k in UPLOAD_KEYS if k in h]
    if method in ("fedavg", "fml"):
        per_round = weights_bytes(fed) * fed.num_selected
    elif method == "local":
        per_round = 0.0
    else:
        per_round = statistics.mean(uploads)
    personal_acc = fed.client_metrics["personal_acc"]
    return {
        "f1": last["personal/f1_mean"],
        "acc": last["personal/acc_mean"],
        "worst": float(personal_acc[~personal_acc.isnan()].min()),
        "upload_kb": per_round / 1024,
        "seconds": time.perf_counter() - start,
    }


def run_kd3a(target_domain: int, method: str, seed: int) -> dict[str, float]:
    start = time.perf_counter()
    callbacks = (
        [KD3A(target_clients=[target_domain])]
        if method == "kd3a"
        else [FedAvg(ignore_clients=[target_domain])]
    )
    data = digit_domains(seed, clients_per_domain=1, max_train_samples=1000)
    fed = fit(data, cnn, callbacks, rounds=10, seed=seed, local_epochs=1, clients_per_round=1.0)
    acc = fed.client_metrics["global_acc"][target_domain].item()
    out = {"target_acc": acc, "seconds": time.perf_counter() - start}
    if method == "kd3a":
        out["pseudo"] = fed.history[-1].get("kd3a/pseudo_label_acc", float("nan"))
        out["coverage"] = fed.history[-1]["kd3a/coverage"]
    return out


def main() -> None:
    settings = [*SETTINGS, "kd3a"]
    parser = experiment_parser(__doc__, settings, "methods", METHODS, "kd_comparison")
    parser.add_argument(
        "--targets", nargs="+", type=int, default=[0, 1, 2], help="kd3a: target domains"
    )
    args = parse_experiment_args(parser)
    tables = []
    for setting in args.settings:
        if setting == "kd3a":
            lines = [
                "| target domain | FedAvg of sources: target acc | KD3A: target acc | "
                "KD3A pseudo-label acc | KD3A coverage |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            for target, name in enumerate(("MNIST", "USPS", "sklearn digits")):
                if target not in args.targets:
                    continue
                base = [run_kd3a(target, "fedavg", s) for s in args.seeds]
                kd = [run_kd3a(target, "kd3a", s) for s in args.seeds]
                lines.append(
                    f"| {name} | {stat([r['target_acc'] for r in base])} | "
                    f"{stat([r['target_acc'] for r in kd])} | {stat([r['pseudo'] for r in kd])} | "
                    f"{stat([r['coverage'] for r in kd])} |"
                )
                print(lines[-1], flush=True)
        else:
            lines = [
                "| method | personal macro-F1 | personal acc | worst client acc | "
                "upload KiB/round | seconds/run |",
                "| --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for method in args.methods:
                rs = [run_method(setting, method, s) for s in args.seeds]
                lines.append(
                    f"| {METHODS[method][0]} | {stat([r['f1'] for r in rs])} | "
                    f"{stat([r['acc'] for r in rs])} | {stat([r['worst'] for r in rs])} | "
                    f"{statistics.mean(r['upload_kb'] for r in rs):.0f} | "
                    f"{statistics.mean(r['seconds'] for r in rs):.0f} |"
                )
                print(lines[-1], flush=True)
        table = f"### {setting} (seeds {args.seeds})\n\n" + "\n".join(lines)
        tables.append(table)
        (args.out / f"{setting}.md").write_text(table + "\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()

"""Evaluation on clients that never trained (Wang et al., 2019; FedHealth's new users): FedAvg
trains on the other clients, then each held-out client adapts the final server model on its
own training split before its test split scores it. One table per setting, 3 seeds.

Settings (data from ../shared/data): ``mnist_dirichlet`` (MNIST-10k over 20 clients by
Dirichlet(0.3), 4 of them held out, a seeded draw; MLP 784-200-10, half the training clients
per round, 3 local epochs, 20 rounds) and ``new_domain`` (the digit domains, 2 clients per
domain; both USPS clients held out, so the new users come from a domain nobody trained on;
BN CNN, 5 local epochs, 10 rounds). Every setting keeps a 10% public split (the server's data,
FedHealth's CORAL source; labels unused). Training is the same for every row (the adaptation
is evaluation only, tested bit-identical), so the rows differ only in how a client adapts:

* as received: the server model (``unseen/*``);
* fine-tune all layers / the head only (``FineTuneEvaluation``, 1 epoch);
* FedHealth (frozen features, identity-initialized alignment layer + head, 1 epoch) without
  CORAL (``coral_weight`` 0) and with it (1.0).

  .venv/bin/python scripts/new_clients.py --settings mnist_dirichlet new_domain --seeds 0 1 2
"""

from __future__ import annotations

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

from pl_federated.callbacks import FedAvg, FedHealth, FineTuneEvaluation

VARIANTS = {
    "received": ("as received (server model)", lambda: [], "unseen"),
    "ft_all": ("fine-tune all layers", lambda: [FineTuneEvaluation(epochs=1)], "finetuned"),
    "ft_head": (
        "fine-tune the head only",
        lambda: [FineTuneEvaluation(epochs=1, frozen=["features"])],
        "finetuned",
    ),
    "fedhealth_0": (
        "FedHealth, alignment layer without CORAL",
        lambda: [FedHealth(epochs=1, coral_weight=0.0)],
        "fedhealth",
    ),
    "fedhealth": ("FedHealth (CORAL weight 1)", lambda: [FedHealth(epochs=1)], "fedhealth"),
}
SETTINGS = {
    "mnist_dirichlet": dict(
        data=lambda seed: mnist_dirichlet(0.3, seed, public_fraction=0.1, unseen_clients=4),
        client=mnist_mlp,
        module=dict(local_epochs=3, clients_per_round=0.5),
        rounds=20,
    ),
    "new_domain": dict(  # domains in order mnist, usps, digits: clients 2 and 3 are USPS
        data=lambda seed: digit_domains(
            seed, max_train_samples=150, public_fraction=0.1, unseen_clients=[2, 3]
        ),
        client=cnn,
        module=dict(local_epochs=5, clients_per_round=1.0),
        rounds=10,
    ),
}


def run(setting: str, variant: str, seed: int) -> dict[str, float]:
    spec = SETTINGS[setting]
    _, callbacks, prefix = VARIANTS[variant]
    eval_every = spec["rounds"]  # the last round only
    fed = fit(
        spec["data"](seed),
        spec["client"],
        [FedAvg(), *callbacks()],
        spec["rounds"],
        seed,
        eval_every_n_rounds=eval_every,
        **spec["module"],
    )
    last = fed.history[-1]
    received = prefix == "unseen"  # the training clients: the server model, or adapted
    new = "unseen" if received else f"{prefix}_unseen"
    return {
        "seen_acc": last["global/acc_client_mean" if received else f"{prefix}/acc_mean"],
        "acc": last[f"{new}/acc_mean"],
        "f1": last[f"{new}/f1_mean"],
        "worst": last[f"{new}/acc_min"],
    }


def main() -> None:
    args = experiment_args(__doc__, SETTINGS, "variants", VARIANTS, "new_clients")
    for setting in args.settings:
        lines = [
            "| adaptation | training clients acc | new clients acc | new clients macro-F1 | "
            "worst new client acc |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for variant in args.variants:
            rs = [run(setting, variant, s) for s in args.seeds]
            lines.append(
                f"| {VARIANTS[variant][0]} | {stat([r['seen_acc'] for r in rs])} | "
                f"{stat([r['acc'] for r in rs])} | {stat([r['f1'] for r in rs])} | "
                f"{stat([r['worst'] for r in rs])} |"
            )
            print(lines[-1], flush=True)
        write_table(args.out, setting, args.seeds, lines)


if __name__ == "__main__":
    main()

"""A task sequence (federated continual learning): MNIST-10k over 20 IID clients, its classes in
5 tasks of 2 (0-1, 2-3, ...), 4 rounds each (MLP 784-200-10, SGD lr 0.05 momentum 0.9, half the
clients per round, 2 local epochs), 3 seeds; FedAvg, FedProx (mu 0.1) and FedWeIT. After each
task: the average accuracy over the tasks seen so far and the forgetting, class-incremental
(argmax over all classes) and task-incremental (argmax within the task's classes), of the global
model (FedAvg, FedProx) or of each client's model of the task (FedWeIT, pooled over clients).

  .venv/bin/python scripts/continual.py --seeds 0 1 2
"""

from __future__ import annotations

from common import experiment_args, fit, mnist_dirichlet, mnist_mlp, stat_row, write_table

from pl_federated.callbacks import FedAvg, FedProx, FedWeIT, TaskSequence

TASKS, ROUNDS_PER_TASK = 5, 4
VARIANTS = {
    "fedavg": ("FedAvg", lambda: [FedAvg()]),
    "fedprox": ("FedProx (mu 0.1)", lambda: [FedAvg(), FedProx(mu=0.1)]),
    "fedweit": ("FedWeIT (lambda_l2 10)", lambda: [FedWeIT()]),
    "fedweit_l2_100": ("FedWeIT (lambda_l2 100, the paper's)", lambda: [FedWeIT(lambda_l2=100.0)]),
}
SETTINGS = {
    "split_mnist": dict(
        data=lambda seed: mnist_dirichlet(1000.0, seed, num_clients=20),  # ~IID: every class
        client=mnist_mlp,
        module=dict(local_epochs=2, clients_per_round=0.5),
        rounds=TASKS * ROUNDS_PER_TASK,
    )
}
KEYS = ("avg_acc", "forgetting", "task_il_avg_acc", "task_il_forgetting")


def run(setting: str, variant: str, seed: int) -> list[dict[str, float]]:
    spec = SETTINGS[setting]
    callbacks = [*VARIANTS[variant][1](), TaskSequence(TASKS, ROUNDS_PER_TASK)]
    fed = fit(spec["data"](seed), spec["client"], callbacks, spec["rounds"], seed, **spec["module"])
    ends = [(t + 1) * ROUNDS_PER_TASK - 1 for t in range(TASKS)]  # the last round of each task
    return [{k: fed.history[r][f"continual/{k}"] for k in KEYS} for r in ends]


def main() -> None:
    args = experiment_args(__doc__, SETTINGS, "variants", VARIANTS, "continual")
    for setting in args.settings:
        lines = [
            "| method | after task | avg acc (class-IL) | forgetting (class-IL) | "
            "avg acc (task-IL) | forgetting (task-IL) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for variant in args.variants:
            runs = [run(setting, variant, s) for s in args.seeds]
            for t in range(TASKS):
                label = f"{VARIANTS[variant][0]} | {t + 1}"
                lines.append(stat_row(label, [r[t] for r in runs], KEYS))
                print(lines[-1], flush=True)
        write_table(args.out, setting, args.seeds, lines)


if __name__ == "__main__":
    main()

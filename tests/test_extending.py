"""The worked examples of docs/extending.md run and do what the page says."""

import re
from pathlib import Path

import lightning.pytorch as pl

from pl_federated import FederatedDataModule, FederatedModule
from pl_federated.callbacks import FedAvg, ModelPoisoning
from pl_federated.data import IID
from pl_federated.models import MLPClassifier

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_example_is_under_50_lines():
    assert len(blocks()[0].strip().splitlines()) < 50


def test_norm_bounded_fedavg_example_resists_a_boosted_client(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "extending_example"}
    for code in blocks()[:2]:
        exec(compile(code, str(DOC), "exec"), namespace)
    acc, clipped = capsys.readouterr().out.split()[-2:]
    assert float(acc) > 0.8 and int(clipped) >= 1

    pl.seed_everything(0)  # the same federation with plain FedAvg collapses
    fed = FederatedModule(MLPClassifier(lr=0.05, momentum=0.9), local_epochs=2)
    trainer = pl.Trainer(
        max_epochs=5,
        callbacks=[FedAvg(), ModelPoisoning(clients=[0], attack="scale", scale=50.0)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(fed, FederatedDataModule("digits", num_clients=10, partition=IID()))
    assert fed.history[-1]["global/acc"] < float(acc) - 0.3


def test_loss_term_example(trainer_factory):
    namespace: dict = {}
    exec(compile(blocks()[2], str(DOC), "exec"), namespace)
    from helpers import digits, federation

    fed = federation(local_steps=3)
    trainer_factory(rounds=1, callbacks=[namespace["ConfidencePenalty"](0.1)]).fit(fed, digits(3))
    assert fed.history[-1]["train/loss"] > 0


def test_the_api_reference_is_the_one_the_docstrings_generate():
    from scripts.api_reference import BEGIN, END, render

    text = DOC.read_text()
    section = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert section == render(), "run `.venv/bin/python scripts/api_reference.py --write`"
    # what a callback author reaches for most is in it
    for member in (
        "fed.add_role(",
        "fed.rng(",
        "fed.log_round(",
        "fed.store.put(",
        "`server_state`",
    ):
        assert member in section, member

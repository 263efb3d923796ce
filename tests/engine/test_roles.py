"""A local role added by a callback: trained, persisted per client, never uploaded."""

import pytest
import torch
from helpers import TrainedStateSpy as Spy
from helpers import digits, federation

from pl_federated.callbacks import FederatedCallback


class PersonalRole(FederatedCallback):
    def setup(self, trainer, pl_module, stage):
        pl_module.add_role("personal")


def test_local_role_is_trained_persisted_and_never_uploaded(trainer_factory):
    fed = federation(local_steps=2, clients_per_round=2)
    spy = Spy()
    trainer = trainer_factory(rounds=3, callbacks=[PersonalRole(), spy])
    trainer.fit(fed, digits(num_clients=4))
    assert fed.personal_role == "personal" and fed.role_registry.trained_roles == [
        "model",
        "personal",
    ]
    personal = fed.store.stacked("personal")
    trained = sorted({c for r in range(3) for c in fed.select_clients(r)})
    for k in range(4):
        if k in trained:  # trained clients hold their own personal model
            assert not torch.equal(
                personal["head.weight"][k], fed.role_registry.initial_state["head.weight"]
            )
        else:
            assert not fed.store.has("personal", k)
    assert "train/loss_personal" in trainer.callback_metrics
    assert trainer.global_step == 3 * 2 * 2 * 2  # rounds x clients x steps x roles
    with pytest.raises(ValueError, match="reserved"):
        fed.add_role("server")

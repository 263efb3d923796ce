"""FedRep's head-then-body phases."""

import torch
from helpers import digits, federation

from pl_federated.callbacks import (
    FederatedCallback,
    FedRep,
)


class PhaseSpy(FederatedCallback):
    def __init__(self):
        self.states = []

    def on_client_start(self, trainer, fed, client):
        self.states = [{k: v.clone() for k, v in fed.shared_worker.state_dict().items()}]

    def on_local_epoch_start(self, trainer, fed, client, epoch):
        if epoch > 0:
            self.states.append({k: v.clone() for k, v in fed.shared_worker.state_dict().items()})

    def on_client_end(self, trainer, fed, client):
        self.states.append({k: v.clone() for k, v in fed.shared_worker.state_dict().items()})


def test_fedrep_trains_head_then_body(trainer_factory):
    spy = PhaseSpy()
    fed = federation(local_epochs=3)
    trainer_factory(rounds=1, callbacks=[FedRep(head_epochs=2), spy]).fit(fed, digits(2))
    start, after_head1, after_head2, end = spy.states
    for name in start:
        head = name.startswith("head")
        assert torch.equal(start[name], after_head2[name]) != head, name  # phase 1: head only
        assert torch.equal(after_head2[name], end[name]) == head, name  # phase 2: body only
    assert not torch.equal(start["head.weight"], after_head1["head.weight"])
    assert all(p.requires_grad for p in fed.shared_worker.parameters())  # restored
    assert "head.weight" in fed.local_keys  # the head is personal (FedPer's split)

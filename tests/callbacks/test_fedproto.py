"""FedProto and the PrototypeBank: per-class aggregation, regularizer, nearest prototype."""

import pytest
import torch
from helpers import digits, federation

from pl_federated.callbacks import (
    FedProto,
    LocalOnly,
)
from pl_federated.callbacks.fedproto import nearest_prototype
from pl_federated.losses import prototype_regularizer
from pl_federated.prototypes import PrototypeBank


def test_prototype_bank_aggregates_per_class_by_clients_or_samples():
    bank = PrototypeBank(num_clients=2, num_classes=3)
    bank.start_client()
    bank.accumulate(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0, 1]))
    bank.finish_client(0)
    bank.start_client()
    bank.accumulate(torch.tensor([[5.0, 5.0]]), torch.tensor([0]))
    bank.finish_client(1)
    torch.testing.assert_close(bank.local[0], torch.tensor([[2.0, 0.0], [0.0, 2.0], [0, 0]]))
    assert bank.local_present.tolist() == [[True, True, False], [True, False, False]]
    bank.aggregate("samples")
    torch.testing.assert_close(bank.global_[0], torch.tensor([3.0, 5 / 3]))  # (2*[2,0]+[5,5])/3
    torch.testing.assert_close(bank.global_[1], torch.tensor([0.0, 2.0]))
    assert bank.global_present.tolist() == [True, True, False]
    assert torch.isfinite(bank.global_).all()
    bank.aggregate("clients")
    torch.testing.assert_close(bank.global_[0], torch.tensor([3.5, 2.5]))
    bank.aggregate("clients", clients=[1])  # class 1 not uploaded: keeps its last value
    torch.testing.assert_close(bank.global_[1], torch.tensor([0.0, 2.0]))
    restored = PrototypeBank.from_state(bank.state_dict())
    assert torch.equal(restored.global_, bank.global_)


def test_fedproto_regularizer_and_nearest_prototype():
    protos = torch.tensor([[0.0, 0.0], [4.0, 4.0], [9.0, 9.0]])
    present = torch.tensor([True, True, False])
    feats = torch.tensor([[1.0, 0.0], [4.0, 2.0], [7.0, 7.0]], requires_grad=True)
    y = torch.tensor([0, 1, 2])
    reg = prototype_regularizer(feats, y, protos, present)
    torch.testing.assert_close(reg, torch.tensor((1.0 + 4.0) / 6))  # class 2 has no prototype
    reg.backward()
    torch.testing.assert_close(feats.grad, torch.tensor([[2.0, 0.0], [0.0, -4.0], [0, 0]]) / 6)
    # nearest present prototype (class 2 is absent, so [7, 7] goes to class 1)
    assert nearest_prototype(feats.detach(), protos, present).tolist() == [0, 1, 1]


def test_fedproto_end_to_end(trainer_factory):
    proto = FedProto(lam=1.0)
    fed = federation(local_epochs=2)
    trainer_factory(rounds=3, callbacks=[LocalOnly(), proto]).fit(fed, digits(4))
    assert proto.bank.global_.shape == (10, 128) and proto.bank.global_present.all()
    last = fed.history[-1]
    assert last["fedproto/proto_acc_mean"] > 0.7 and last["personal/acc_mean"] > 0.7


def test_fedproto_needs_forward_features(trainer_factory):
    from helpers import LoggingClient

    class NoFeatures(LoggingClient):
        forward_features = None

    fed = federation(client=NoFeatures())
    with pytest.raises(ValueError, match="forward_features"):
        trainer_factory(rounds=1, callbacks=[LocalOnly(), FedProto()]).fit(fed, digits(3))

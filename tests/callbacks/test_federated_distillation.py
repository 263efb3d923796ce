"""FederatedDistillation: the class-logit table, the weighted KD + CE loss, end to end."""

import pytest
import torch
from helpers import digits, federation
from torch.nn import functional as F

from pl_federated.callbacks import (
    FederatedDistillation,
    LocalOnly,
)
from pl_federated.callbacks.federated_distillation import average_class_logits, class_logit_table
from pl_federated.losses import kl_div


def test_fd_class_logit_table_matches_hand_computation():
    logits = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]])
    sums, n = class_logit_table(logits, torch.tensor([0, 0, 1]), 3)
    assert torch.equal(sums.float(), torch.tensor([[4.0, 2.0], [0.0, 5.0], [0.0, 0.0]]))
    assert n.tolist() == [2, 1, 0]
    # client A: class 0 mean [2, 1] from 2 samples; client B: class 0 mean [8, 4] from 1 sample,
    # class 1 mean [0, 6] from 3 samples; class 2 held by nobody
    means = torch.tensor([[[2.0, 1.0], [0.0, 0.0], [0, 0]], [[8.0, 4.0], [0.0, 6.0], [0, 0]]])
    counts = torch.tensor([[2.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    table, present = average_class_logits(means, counts)
    torch.testing.assert_close(table[0], torch.tensor([4.0, 2.0]))  # (2*[2,1] + [8,4]) / 3
    torch.testing.assert_close(table[1], torch.tensor([0.0, 6.0]))
    assert present.tolist() == [True, True, False] and torch.equal(table[2], torch.zeros(2))


def test_fd_local_loss_is_weighted_kd_plus_ce():
    fd = FederatedDistillation(kd_weight=None, temperature=2.0)
    assert fd.weight_at(0) == 0.5 and fd.weight_at(2) == 0.25
    fd._a, fd._num_classes = 0.25, 3
    fd._table = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    fd._present = torch.tensor([True, True, False])
    fd._sums, fd._n = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    outputs = {"model": {"loss": F.cross_entropy(logits, y), "logits": logits}}
    total = fd.supervised_weight(None, 0, "model") * outputs["model"]["loss"] + fd.client_loss(
        None, 0, "model", (None, y), outputs
    )
    known = torch.tensor([0, 1, 3])  # the sample of class 2 has no soft label: KD term 0
    kd_sum = kl_div(logits[known], fd._table[y[known]], 2.0) * len(known)
    torch.testing.assert_close(total, 0.25 * kd_sum / 4 + 0.75 * F.cross_entropy(logits, y))
    assert fd._n.tolist() == [2, 1, 1]  # the batch's logits were summed for the upload


def test_fd_end_to_end_shares_logits_not_weights(trainer_factory):
    fd = FederatedDistillation()
    fed = federation(local_epochs=2)
    trainer_factory(rounds=3, callbacks=[LocalOnly(), fd]).fit(fed, digits(4))
    assert fd.table.shape == (10, 10) and fd.present.all()
    # the table's row c is biased toward class c (the clients' models learned the labels)
    assert (fd.table.argmax(1) == torch.arange(10)).float().mean() >= 0.9
    last = fed.history[-1]
    assert last["fd/upload_bytes"] == 4 * 10 * 10 * 4
    assert last["fd/upload_bytes"] * 50 < last["fd/weights_bytes"]
    assert last["fd/kd_weight"] == pytest.approx(1 / 4)
    assert last["personal/acc_mean"] > 0.8

"""Compressed uploads: top-k with error feedback and QSGD, against hand-computed updates,
residuals and byte counts."""

import math

import pytest
import torch
from helpers import (
    TrainedStateSpy,
    UploadSpy,
    assert_resume_equal,
    checkpointed_trainer,
    federation,
)

from pl_federated import FederatedDataModule
from pl_federated.callbacks import QSGD, FedAvg, FedPer, TopK
from pl_federated.callbacks.compression import qsgd, qsgd_bytes, top_k
from pl_federated.data import IID
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(4,), lr=0.5)


def _data():
    return FederatedDataModule(
        "digits", num_clients=2, partition=IID(), batch_size=4096, max_train_samples=30
    )


NUMEL = 64 * 4 + 4 + 4 * 10 + 10  # the 64-4-10 MLP's parameters (all float, all travel)


def test_top_k_keeps_the_largest_magnitudes():
    v = torch.tensor([[0.1, -5.0], [3.0, -0.2]])
    assert torch.equal(top_k(v, 2), torch.tensor([[0.0, -5.0], [3.0, 0.0]]))
    assert torch.equal(top_k(v, 0), torch.zeros(2, 2)) and torch.equal(top_k(v, 9), v)


def test_qsgd_is_unbiased_and_on_the_grid():
    v = torch.tensor([0.3, -1.2, 0.05, 2.0])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([qsgd(v, 2, g) for _ in range(20000)])
    norm = float(v.norm())
    levels = draws.abs() / norm * 2
    assert torch.allclose(levels, levels.round(), atol=1e-5)  # multiples of ||v|| / s
    assert torch.allclose(draws.mean(0), v, atol=0.03)  # unbiased
    assert (draws.sign() * v.sign() >= 0).all()  # never flips a sign
    assert qsgd_bytes(10, 4) == 4 + math.ceil(10 * 4 / 8)


def test_top_k_uploads_by_hand_with_error_feedback(trainer_factory):
    """Two rounds, one client per round each: the upload is received + top-k(update +
    residual), the residual what was dropped, and 8 bytes per kept entry are counted."""
    spy, uploads = TrainedStateSpy(), UploadSpy()
    fed = federation(_client(), local_steps=1, clients_per_round=1.0)
    trainer_factory(rounds=1, callbacks=[uploads, TopK(ratio=0.1), spy]).fit(fed, _data())
    k = math.ceil(0.1 * NUMEL)
    start = _client().state_dict()
    for client in range(2):
        names = list(start)
        delta = torch.cat([(spy.after[client][n] - start[n]).flatten() for n in names])
        kept = top_k(delta, k)
        sent = torch.cat([(uploads.seen[client][n] - start[n]).flatten() for n in names])
        torch.testing.assert_close(sent, kept, rtol=0, atol=1e-6)
        residual = fed.store.get("topk_residual", client)
        torch.testing.assert_close(
            torch.cat([residual[n].flatten() for n in names]), delta - kept, rtol=0, atol=1e-6
        )
    assert fed.history[0]["comm/upload_bytes"] == 2 * k * 8


def test_the_residual_joins_the_next_update(trainer_factory):
    spy, uploads, tops = TrainedStateSpy(), UploadSpy(), TopK(ratio=0.05)
    fed = federation(_client(), local_steps=1, clients_per_round=1.0)
    residuals = {}

    class Snapshot(TrainedStateSpy):
        def on_round_end(self, trainer, fed, server_round):
            if server_round == 0:
                for c in range(2):  # copies: the store's rows are overwritten next round
                    residuals[c] = {
                        k: v.clone() for k, v in fed.store.get("topk_residual", c).items()
                    }
                self.received = {
                    c: {k: v.clone() for k, v in fed.received_state(c).items()} for c in range(2)
                }

    snap = Snapshot()
    trainer_factory(rounds=2, callbacks=[uploads, tops, spy, snap]).fit(fed, _data())
    k = math.ceil(0.05 * NUMEL)
    names = list(fed.server_state)
    for client in range(2):
        received = {n: snap.received[client][n] for n in names}
        update = torch.cat(
            [(spy.after[client][n] - received[n] + residuals[client][n]).flatten() for n in names]
        )
        sent = torch.cat([(uploads.seen[client][n] - received[n]).flatten() for n in names])
        torch.testing.assert_close(sent, top_k(update, k), rtol=0, atol=1e-6)


def test_client_local_entries_are_neither_compressed_nor_counted(trainer_factory):
    fed = federation(_client(), local_steps=1, clients_per_round=1.0)
    trainer_factory(rounds=1, callbacks=[FedPer(), TopK(ratio=0.5)]).fit(fed, _data())
    body = 64 * 4 + 4
    assert fed.history[0]["comm/upload_bytes"] == 2 * math.ceil(0.5 * body) * 8
    assert set(fed.store.get("topk_residual", 0)) == {"features.1.weight", "features.1.bias"}


def test_qsgd_counts_its_encoding_and_is_seeded(trainer_factory):
    def run():
        fed = federation(_client(), local_steps=1, clients_per_round=1.0)
        trainer_factory(rounds=2, callbacks=[FedAvg(), QSGD(levels=4)]).fit(fed, _data())
        return fed

    a, b = run(), run()
    sizes = [64 * 4, 4, 4 * 10, 10]
    assert a.history[0]["comm/upload_bytes"] == 2 * sum(qsgd_bytes(n, 4) for n in sizes)
    for name, value in a.server_state.items():
        assert torch.equal(value, b.server_state[name])
    assert not a.store.has("qsgd_residual", 0)  # no error feedback by default


@pytest.mark.parametrize("compressor", [lambda: TopK(ratio=0.1), lambda: QSGD(levels=2)])
def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path, compressor):
    def fit(rounds, root, ckpt_path=None):
        fed = federation(_client(), local_steps=2, clients_per_round=0.5)
        callbacks = [FedAvg(), compressor()]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _data(), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="TopK.ratio"):
        TopK(ratio=0.0)
    with pytest.raises(ConfigError, match="QSGD.levels"):
        QSGD(levels=0)

"""Vectorized client training (torch.vmap) equals sequential training."""

import pytest
import torch
from helpers import digits, federation

from pl_federated import FederatedDataModule
from pl_federated.callbacks import DeputyEnhancedTransfer, FedAvg, FedBN, FedProx
from pl_federated.data import IID
from pl_federated.loops.vectorized import group_by_samples
from pl_federated.models import CNNClassifier, MLPClassifier


def _fit(trainer_factory, client_fn, data_fn, callbacks_fn, vectorize, rounds=2, **module):
    torch.manual_seed(0)
    fed = federation(client=client_fn(), vectorize_clients=vectorize, **module)
    trainer = trainer_factory(rounds=rounds, callbacks=callbacks_fn())
    trainer.fit(fed, data_fn())
    return fed, trainer


def _assert_same(a, b, atol=1e-5):
    fa, ta = a
    fb, tb = b
    for k in fa.server_state:
        torch.testing.assert_close(fa.server_state[k], fb.server_state[k], atol=atol, rtol=1e-4)
    assert ta.global_step == tb.global_step
    for ha, hb in zip(fa.history, fb.history, strict=True):
        for key in ("global/acc", "personal/acc_mean", "train/loss"):
            assert ha[key] == pytest.approx(hb[key], abs=1e-4), key


def _equal_clients():
    # 60 training samples each, batch 16: the last batch of every epoch is partial (12)
    return FederatedDataModule(
        "digits", num_clients=4, partition=IID(), batch_size=16, max_train_samples=60
    )


def test_vectorized_mlp_sgd_momentum_equals_sequential(trainer_factory):
    def client():
        return MLPClassifier(lr=0.05, momentum=0.9, weight_decay=1e-3)

    runs = [
        _fit(
            trainer_factory,
            client,
            _equal_clients,
            lambda: [FedAvg()],
            v,
            local_epochs=2,
            clients_per_step=4,
        )
        for v in (False, True)
    ]
    _assert_same(*runs)


def test_vectorized_batchnorm_cnn_with_fedbn_equals_sequential(trainer_factory):
    def client():
        return CNNClassifier(
            image_size=8, channels=(4, 8), hidden=16, batch_norm=True, lr=0.05, momentum=0.5
        )

    runs = [
        _fit(trainer_factory, client, _equal_clients, lambda: [FedBN()], v, clients_per_step=4)
        for v in (False, True)
    ]
    _assert_same(*runs)
    seq, vec = runs[0][0].store.stacked("local"), runs[1][0].store.stacked("local")
    assert any("running_mean" in k for k in seq)
    for k in seq:  # every client's own BatchNorm state, running statistics included
        torch.testing.assert_close(seq[k], vec[k], atol=1e-5, rtol=1e-4)


def test_vectorized_adam_and_unequal_clients_equal_sequential(trainer_factory):
    def client():
        return MLPClassifier(lr=0.01, optimizer="adam")

    runs = [
        _fit(
            trainer_factory,
            client,
            lambda: digits(num_clients=5),
            lambda: [FedAvg()],
            v,
            clients_per_step=5,
        )
        for v in (False, True)
    ]
    _assert_same(*runs)
    fed = runs[1][0]
    groups = group_by_samples(fed, list(range(5)))
    sizes = [{int(fed.client_num_samples[c]) for c in g} for g in groups]
    assert all(len(s) == 1 for s in sizes) and sum(map(len, groups)) == 5


def test_vectorized_clients_refuse_what_they_cannot_do(trainer_factory):
    def fit(callbacks, client=None, **module):
        fed = federation(client=client, vectorize_clients=True, **module)
        trainer_factory(rounds=1, callbacks=callbacks).fit(fed, digits(num_clients=3))

    with pytest.raises(ValueError, match="roles"):
        fit([FedAvg(), DeputyEnhancedTransfer(split="train")], local_epochs=3)
    with pytest.raises(ValueError, match="FedProx overrides"):
        fit([FedAvg(), FedProx(mu=0.1)])
    with pytest.raises(ValueError, match="persist_optimizer"):
        fit([FedAvg()], persist_optimizer=True)

    class LBFGSClient(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(ValueError, match="element-wise"):
        fit([FedAvg()], client=LBFGSClient())


def test_vectorized_bf16_mixed_matches_sequential_bf16(trainer_factory):
    runs = []
    for vectorize in (False, True):
        torch.manual_seed(0)
        fed = federation(vectorize_clients=vectorize, clients_per_step=4, local_epochs=4)
        trainer_factory(rounds=2, precision="bf16-mixed").fit(fed, _equal_clients())
        runs.append(fed.history[-1])
    seq, vec = runs
    assert vec["train/loss"] < 2.2  # it learns
    assert vec["train/loss"] == pytest.approx(seq["train/loss"], abs=0.02)
    assert vec["global/acc"] == pytest.approx(seq["global/acc"], abs=0.05)


class _NaNClientData(FederatedDataModule):
    """Client 1's training inputs are NaN, so its update is non-finite."""

    def client_train(self, client):
        x, y = super().client_train(client)
        return (torch.full_like(x, float("nan")), y) if client == 1 else (x, y)


@pytest.mark.parametrize("eval_every", [0, 1])  # rows uploaded directly / through the worker
def test_vectorized_excludes_a_non_finite_client(trainer_factory, eval_every):
    data = _NaNClientData(
        "digits", num_clients=4, partition=IID(), batch_size=16, max_train_samples=60
    )
    torch.manual_seed(0)
    fed = federation(vectorize_clients=True, clients_per_step=4, eval_every_n_rounds=eval_every)
    with pytest.warns(UserWarning, match="client 1's update has NaN"):
        trainer_factory(rounds=1).fit(fed, data)
    assert fed.excluded == [1] and fed.history[-1]["round/excluded_clients"] == 1.0
    assert all(torch.isfinite(v).all() for v in fed.server_state.values())
    assert torch.isfinite(torch.tensor(fed.history[-1]["train/loss"]))  # without client 1


class _RawMatrixClassifier(MLPClassifier):
    """Uses a raw parameter matrix as ``x @ W`` (not ``F.linear``) and ``W.sum()`` in its loss,
    so the transposed storage of matrices inside a vectorized group is checked beyond
    linear layers."""

    def __init__(self) -> None:
        super().__init__(hidden=(16,), lr=0.05, momentum=0.9)
        self.mix = torch.nn.Parameter(torch.randn(10, 10) * 0.1)

    def forward(self, x):
        return super().forward(x) @ self.mix

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        return loss + 1e-3 * self.mix.sum() ** 2


def test_vectorized_raw_parameter_matrix_equals_sequential(trainer_factory):
    runs = [
        _fit(
            trainer_factory,
            _RawMatrixClassifier,
            _equal_clients,
            lambda: [FedAvg()],
            v,
            clients_per_step=4,
        )
        for v in (False, True)
    ]
    _assert_same(*runs)
    torch.manual_seed(0)
    initial = _RawMatrixClassifier().mix.detach()  # what _fit built: the matrix was trained
    assert (runs[1][0].server_state["mix"] - initial).abs().max() > 1e-4

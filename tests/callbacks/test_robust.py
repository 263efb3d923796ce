"""Median, TrimmedMean and Krum on scripted uploads; model poisoning (callbacks/attack.py)."""

import pytest
import torch
from helpers import UploadSpy, digits, federation, perturbed, server_round, tiny_fed

from pl_federated.callbacks import (
    FedAvg,
    FederatedCallback,
    Krum,
    Median,
    ModelPoisoning,
    TrimmedMean,
)
from pl_federated.callbacks.robust import coordinate_median, krum_select, trimmed_mean


def test_robust_rules_on_scripted_updates():
    x = torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [100.0, -50.0]])
    torch.testing.assert_close(coordinate_median(x), torch.tensor([2.5, 5.5]))
    torch.testing.assert_close(coordinate_median(x[:3]), torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(trimmed_mean(x, 0.25), torch.tensor([2.5, 5.5]))
    torch.testing.assert_close(trimmed_mean(x, 0.0), x.mean(0))
    with pytest.raises(ValueError, match="trims all"):
        trimmed_mean(x[:2], 0.49 + 0.01)
    honest = torch.tensor([[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.2], [1.2, 1.0]])
    attacked = torch.cat([honest, torch.tensor([[-40.0, 40.0]])])
    chosen = krum_select(attacked, f=1)
    assert chosen.tolist() == [0]  # the honest update closest to the others
    assert 5 not in krum_select(attacked, f=1, m=3).tolist()
    with pytest.raises(ValueError, match="more than 4"):
        krum_select(attacked[:4], f=1)


@pytest.mark.parametrize("agg", [Median(), TrimmedMean(0.2), Krum(f=1, m=2)], ids=repr)
def test_robust_aggregators_ignore_a_malicious_upload(agg):
    fed = tiny_fed()
    x = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    uploads = [perturbed(x, i, 0.01) for i in range(5)]
    uploads.append({k: v - 100.0 for k, v in x.items()})
    robust = server_round(agg, fed, x, uploads)
    plain = server_round(FedAvg(weighting="uniform"), fed, x, uploads)
    for k in x:
        assert (robust[k] - x[k]).abs().max() < 0.05
        assert (plain[k] - x[k]).abs().max() > 10


def test_model_poisoning_flips_and_scales_the_update(trainer_factory):
    def uploads(callbacks):
        spy = UploadSpy()
        fed = federation(local_steps=2)
        trainer_factory(rounds=1, callbacks=[spy, *callbacks]).fit(fed, digits(3))
        return spy.seen, fed.role_registry.initial_state

    clean, x0 = uploads([])
    flipped, _ = uploads([ModelPoisoning(clients=[1], attack="sign_flip", scale=4.0)])
    for k, w in clean[1].items():
        torch.testing.assert_close(flipped[1][k] - x0[k], -4.0 * (w - x0[k]), rtol=1e-4, atol=1e-6)
        assert torch.equal(flipped[0][k], clean[0][k])  # honest clients untouched
    chosen = ModelPoisoning(fraction=0.5)
    trainer_factory(rounds=1, callbacks=[chosen]).fit(federation(local_steps=1), digits(4))
    assert len(chosen.malicious) == 2


def test_krum_with_too_few_uploads_falls_back_to_the_median(trainer_factory):
    class FailClients(FederatedCallback):  # clients 1 and 3 fail: 4 of 6 upload
        def client_loss(self, fed, client, role, batch, outputs):
            return torch.tensor(float("nan")) if client in (1, 3) else None

    class SpyKrum(Krum):
        def update(self, fed, upload):
            self.seen[upload.client] = {k: v.clone() for k, v in upload.state.items()}
            super().update(fed, upload)

    krum = SpyKrum(f=1)
    krum.seen = {}
    fed = federation(local_steps=2)
    with pytest.warns(UserWarning, match=r"Krum\(f=1\) needs more than 4 uploads, got 4"):
        trainer_factory(rounds=1, callbacks=[krum, FailClients()]).fit(fed, digits(6))
    assert sorted(krum.seen) == [0, 2, 4, 5] and sorted(krum.selected) == [0, 2, 4, 5]
    assert fed.history[-1]["krum/median_fallback"] == 1.0
    for k, v in fed.server_state.items():
        if v.is_floating_point():
            expected = coordinate_median(torch.stack([krum.seen[c][k] for c in (0, 2, 4, 5)]))
            torch.testing.assert_close(v, expected, rtol=0, atol=0)

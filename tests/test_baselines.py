"""Issue-6 baselines: server optimizers against hand-computed steps, robust aggregation with
scripted malicious updates, model poisoning, SCAFFOLD's control variates, FedNova's
normalization, FedRep's phases."""

import pytest
import torch
from helpers import digits, federation

from pl_federated.callbacks import (
    SCAFFOLD,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FederatedCallback,
    FedNova,
    FedRep,
    FedYogi,
    Krum,
    Median,
    ModelPoisoning,
    TrimmedMean,
)
from pl_federated.callbacks.aggregator import Upload
from pl_federated.callbacks.fednova import effective_steps
from pl_federated.callbacks.robust import coordinate_median, krum_select, trimmed_mean
from pl_federated.models import MLPClassifier


def tiny_fed(**kwargs):
    torch.manual_seed(0)
    return federation(client=MLPClassifier(input_size=3, hidden=(2,), num_classes=2, **kwargs))


def perturbed(state, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def server_round(agg, fed, x, uploads):
    agg.reset(fed)
    for k, u in enumerate(uploads):
        agg.update(fed, Upload(k, u, 1, 1))
    return agg.aggregate(fed, x)


# --------------------------------------------------------------------------- server optimizers
@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad", "avgm"])
def test_server_optimizers_match_hand_computed_steps(name):
    fed = tiny_fed()
    x = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    eta, b1, b2, tau, beta = 0.05, 0.9, 0.99, 1e-3, 0.8
    agg = {
        "adam": FedAdam(eta, b1, b2, tau, weighting="uniform"),
        "yogi": FedYogi(eta, b1, b2, tau, weighting="uniform"),
        "adagrad": FedAdagrad(eta, b1, b2, tau, weighting="uniform"),
        "avgm": FedAvgM(eta, momentum=beta, weighting="uniform"),
    }[name]
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v = {k: torch.full_like(t, tau**2) for k, t in x.items()}
    for r in range(3):
        uploads = [perturbed(x, 10 * r + i) for i in range(2)]
        new = server_round(agg, fed, x, uploads)
        for k in x:
            d = (uploads[0][k] + uploads[1][k]) / 2 - x[k]
            if name == "avgm":
                m[k] = beta * m[k] + d
                expected = x[k] + eta * m[k]
            else:
                m[k] = b1 * m[k] + (1 - b1) * d
                if name == "adam":
                    v[k] = b2 * v[k] + (1 - b2) * d**2
                elif name == "yogi":
                    v[k] = v[k] - (1 - b2) * d**2 * torch.sign(v[k] - d**2)
                else:
                    v[k] = v[k] + d**2
                expected = x[k] + eta * m[k] / (v[k].sqrt() + tau)
            torch.testing.assert_close(new[k], expected, rtol=1e-5, atol=1e-6)
        x = new


def test_fedavgm_without_momentum_is_fedavg_and_runs_end_to_end(trainer_factory):
    fed = tiny_fed()
    x = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    uploads = [perturbed(x, i) for i in range(3)]
    a = server_round(FedAvgM(1.0, momentum=0.0, weighting="uniform"), fed, x, uploads)
    b = server_round(FedAvg(weighting="uniform"), fed, x, uploads)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    fed = federation(local_epochs=1)
    trainer_factory(rounds=3, callbacks=[FedAdam(server_lr=0.1)]).fit(fed, digits(4))
    assert fed.history[-1]["global/acc"] > 0.5
    with pytest.raises(ValueError, match="FedAdam.beta1"):
        FedAdam(beta1=1.0)


# --------------------------------------------------------------------------- robust aggregation
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


class UploadSpy(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = {}

    def update(self, fed, upload):
        self.seen[upload.client] = {k: v.clone() for k, v in upload.state.items()}
        super().update(fed, upload)


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


# --------------------------------------------------------------------------- SCAFFOLD
def test_scaffold_correction_gradient_and_control_update(trainer_factory):
    torch.manual_seed(0)
    client = MLPClassifier(lr=0.1, momentum=0.0)
    fed = federation(client=client, local_steps=3)
    spy, scaffold = UploadSpy(weighting="uniform"), SCAFFOLD()
    trainer_factory(rounds=1, callbacks=[spy, scaffold]).fit(fed, digits(3))
    names = [n for n, _ in fed.shared_worker.named_parameters()]
    x0 = fed.role_registry.initial_state
    expected_c = {n: torch.zeros_like(x0[n]) for n in names}
    for k in range(3):
        ci = fed.store.get("scaffold", k)
        for n in names:  # c = c_i = 0 in round 0: c_i+ = (x - y_i) / (K * lr)
            want = (x0[n] - spy.seen[k][n]) / (3 * 0.1)
            torch.testing.assert_close(ci[n], want, rtol=1e-4, atol=1e-5)
            expected_c[n] += want / 3
    for n in names:
        torch.testing.assert_close(scaffold.control[n], expected_c[n], rtol=1e-4, atol=1e-5)
    # the loss term's gradient is exactly c - c_i
    scaffold.on_round_start(None, fed, 1)
    scaffold.on_client_start(None, fed, 0)
    for p in fed.shared_worker.parameters():
        p.grad = None
    scaffold.client_loss(fed, 0, "model", None, {}).backward()
    ci = fed.store.get("scaffold", 0)
    for n, p in fed.shared_worker.named_parameters():
        torch.testing.assert_close(p.grad, scaffold.control[n] - ci[n])


def test_scaffold_round_zero_equals_fedavg_and_learns(trainer_factory):
    def run(callbacks, rounds):
        torch.manual_seed(0)
        fed = federation(client=MLPClassifier(lr=0.1, momentum=0.0), local_epochs=1)
        trainer_factory(rounds=rounds, callbacks=callbacks).fit(fed, digits(4, alpha=0.3))
        return fed

    a = run([FedAvg(weighting="uniform")], 1)
    b = run([FedAvg(weighting="uniform"), SCAFFOLD()], 1)
    assert all(torch.allclose(a.server_state[k], b.server_state[k]) for k in a.server_state)
    fed = run([FedAvg(weighting="uniform"), SCAFFOLD()], 4)
    assert fed.history[-1]["global/acc"] > 0.7


# --------------------------------------------------------------------------- FedNova
def test_fednova_normalizes_unequal_local_steps():
    assert effective_steps(5) == 5.0
    rho = 0.9
    assert effective_steps(3, rho) == pytest.approx(1 + (1 + rho) + (1 + rho + rho**2))
    fed = tiny_fed(lr=0.1, momentum=0.0)
    fed.configure_optimizers()
    x = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    fed.server_state = x
    y = [perturbed(x, 1), perturbed(x, 2)]
    nova = FedNova()
    logged = {}

    def aggregate(steps, samples):
        nova.reset(fed)
        for k in range(2):
            nova.update(fed, Upload(k, y[k], samples[k], steps[k]))
        out, metrics = nova.aggregate(fed, x)
        logged.update(metrics)
        return out

    # equal steps: FedAvg
    out = aggregate([4, 4], [1, 3])
    for k in x:
        torch.testing.assert_close(out[k], (y[0][k] + 3 * y[1][k]) / 4)
    # client 1 took 4x the steps: its update is divided by 4 before averaging
    out = aggregate([2, 8], [1, 1])
    tau_eff = (2 + 8) / 2
    for k in x:
        d = 0.5 * (x[k] - y[0][k]) / 2 + 0.5 * (x[k] - y[1][k]) / 8
        torch.testing.assert_close(out[k], x[k] - tau_eff * d)
    assert logged["fednova/tau_eff"] == 5.0


def test_fednova_end_to_end(trainer_factory):
    fed = federation(local_epochs=1)
    trainer_factory(rounds=3, callbacks=[FedNova()]).fit(fed, digits(4, alpha=0.3))
    assert fed.history[-1]["global/acc"] > 0.6
    assert fed.history[-1]["fednova/tau_eff"] > 1


# --------------------------------------------------------------------------- FedRep
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

import pytest
import torch
from helpers import federation
from lightning.pytorch.callbacks import ModelCheckpoint

from pl_federated import Dirichlet, FederatedDataModule
from pl_federated.callbacks import (
    DeputyEnhancedTransfer,
    FedAvg,
    ProgressiveFourierAggregation,
    RetrogressMonitor,
)
from pl_federated.callbacks.deputy import Stage, det_loss_term, next_stage
from pl_federated.models import CNNClassifier

R, E, S = Stage.RECOVER, Stage.EXCHANGE, Stage.SUBLIMATE


def run_stages(ratios, l1=0.7, l2=0.9):
    """Stages over one round's local epochs for scripted phi(D)/phi(P) ratios."""
    stages, prev = [], None
    for epoch, ratio in enumerate(ratios):
        prev = next_stage(prev if epoch else None, ratio, 1.0, l1, l2)
        stages.append(prev)
    return stages


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], [R, E, S, S]),  # first epoch always Recover, then climbs
        ([1.0, 0.5, 0.8, 0.8, 0.95], [R, R, E, E, S]),  # stays Recover below l1, Exchange below l2
        ([1.0, 0.8, 0.95, 0.8, 0.5, 0.8], [R, E, S, S, R, E]),  # Sublimate holds above l1 only
        ([1.0, 0.69, 0.7], [R, R, E]),  # thresholds are inclusive on the upper side
    ],
)
def test_det_stage_machine_transitions(ratios, expected):
    assert run_stages(ratios) == expected


def test_det_stage_resets_every_round():
    assert run_stages([1.0, 1.0, 1.0]) == [R, E, S]
    assert run_stages([1.0, 1.0, 1.0])[0] == R  # a new round starts in Recover again


def test_det_loss_composition_per_stage_with_detached_teachers():
    torch.manual_seed(0)
    d = torch.randn(4, 3, requires_grad=True)
    p = torch.randn(4, 3, requires_grad=True)
    outputs = {"model": {"logits": d}, "personal": {"logits": p}}
    expect = {  # which role gets a KL term in which stage
        R: {"model": True, "personal": False},
        E: {"model": True, "personal": True},
        S: {"model": False, "personal": True},
    }
    for stage, roles in expect.items():
        for role, has_term in roles.items():
            term = det_loss_term(stage, role, outputs, temperature=2.0, weight=0.5)
            assert (term is not None) == has_term, (stage, role)
            if term is None:
                continue
            d.grad = p.grad = None
            term.backward()
            student, teacher = (d, p) if role == "model" else (p, d)
            assert student.grad is not None and student.grad.abs().sum() > 0
            assert teacher.grad is None  # the teacher is detached
            t = 2.0
            ref = torch.nn.functional.kl_div(
                torch.log_softmax(student.detach() / t, -1),
                torch.softmax(teacher.detach() / t, -1),
                reduction="batchmean",
            )
            assert term.item() == pytest.approx(0.5 * t * t * ref.item(), rel=1e-5)
    assert det_loss_term(None, "model", outputs) is None


class FakeFed:
    """Scripted predictions per client: before receipt vs after receipt."""

    def __init__(self, labels, before, after):
        self.labels, self.before, self.after = labels, before, after
        self.received = set()
        self.excluded = []
        self.logged = {}
        self.current_round = 0
        self.world_size = 1
        self.personal_role = "model"

    def score(self, role, client, split, metric):
        preds = self.after[client] if client in self.received else self.before[client]
        hits = [p == t for p, t in zip(preds, self.labels[client], strict=True)]
        return sum(hits) / len(hits)

    def load_received_state(self, client):
        self.received.add(client)

    def log_round(self, metrics):
        self.logged.update({k: float(v) for k, v in metrics.items()})


def test_retrogress_monitor_on_a_scripted_two_client_case():
    fed = FakeFed(
        labels={0: [0, 0, 1, 1], 1: [2, 2, 2, 2]},
        before={0: [0, 0, 1, 1], 1: [2, 2, 2, 0]},  # acc 1.00 and 0.75 after local training
        after={0: [0, 1, 1, 1], 1: [2, 2, 2, 2]},  # acc 0.75 and 1.00 after receipt
    )
    monitor = RetrogressMonitor(metric="acc")
    monitor.on_round_start(None, fed, 0)
    for k in (0, 1):
        monitor.on_client_end(None, fed, k)
    monitor.on_round_end(None, fed, 0)
    assert fed.logged["retrogress/client_0"] == pytest.approx(0.25)
    assert fed.logged["retrogress/client_1"] == pytest.approx(-0.25)
    assert fed.logged["retrogress/mean"] == pytest.approx(0.0)
    assert fed.logged["retrogress/max"] == pytest.approx(0.25)
    assert monitor.history == [(0, 0, 1.0, 0.75), (0, 1, 0.75, 1.0)]


def bn_cnn():
    torch.manual_seed(0)
    return CNNClassifier(in_channels=1, image_size=8, batch_norm=True, lr=0.05, momentum=0.9)


def dm(**kwargs):
    kwargs.setdefault("val_fraction", 0.15)
    return FederatedDataModule(
        "digits", num_clients=3, partition=Dirichlet(0.5, min_size=30), **kwargs
    )


def test_pfa_det_end_to_end(trainer_factory, tmp_path):
    fed = federation(client=bn_cnn(), local_epochs=3)
    det = DeputyEnhancedTransfer()
    monitor = RetrogressMonitor(per_epoch=True)
    trainer = trainer_factory(
        rounds=2,
        callbacks=[ProgressiveFourierAggregation(), det, monitor],
        default_root_dir=tmp_path,
    )
    trainer.fit(fed, dm())
    last = fed.history[-1]
    # stage counts add up to clients x epochs; each client's round starts in Recover
    assert last["det/recover"] + last["det/exchange"] + last["det/sublimate"] == 3 * 3
    assert len(det.stage_log) == 2 * 3 * 3
    assert all(stage == 1 for _, _, epoch, stage in det.stage_log if epoch == 0)
    assert {stage for *_, stage in det.stage_log} >= {1, 2}
    # one server model per client, written to the store, and they differ
    server = fed.store.stacked("server")
    assert server["head.weight"].shape[0] == 3
    assert not torch.equal(server["head.weight"][0], server["head.weight"][1])
    assert last["pfa/ratio"] == pytest.approx(0.7 + 0.5 * 0.25)
    # personal models persist and are evaluated; retrogress logged; curve written
    assert fed.personal_role == "personal" and fed.store.has("personal", 2)
    assert "retrogress/mean" in last and "personal/acc_mean" in last
    assert (tmp_path / "retrogress.png").stat().st_size > 0
    assert len(monitor.curve) == 2 * 3 * 4  # rounds x clients x (receipt + 3 epochs)


def test_det_requires_validation_split_and_warns_on_few_epochs(trainer_factory):
    with pytest.raises(ValueError, match="val_fraction"):
        trainer_factory(callbacks=[FedAvg(), DeputyEnhancedTransfer()]).fit(
            federation(client=bn_cnn()), dm(val_fraction=0.0)
        )
    with pytest.warns(UserWarning, match="Sublimate is never reached"):
        trainer_factory(rounds=1, callbacks=[FedAvg(), DeputyEnhancedTransfer(split="train")]).fit(
            federation(client=bn_cnn(), local_epochs=2), dm(val_fraction=0.0)
        )
    with pytest.raises(ValueError, match="val_fraction"):
        trainer_factory(callbacks=[FedAvg(), RetrogressMonitor()]).fit(
            federation(client=bn_cnn()), dm(val_fraction=0.0)
        )
    with pytest.raises(ValueError, match="l1"):
        DeputyEnhancedTransfer(l1=0.9, l2=0.7)
    with pytest.raises(ValueError, match="variant"):
        ProgressiveFourierAggregation(variant="phase")


def test_pfa_det_resume_is_exact(trainer_factory, tmp_path):
    def fit(rounds, path, ckpt=None):
        fed = federation(client=bn_cnn(), local_epochs=3, clients_per_round=2)
        det, mon = DeputyEnhancedTransfer(), RetrogressMonitor()
        cb = ModelCheckpoint(dirpath=path, save_top_k=-1)
        trainer = trainer_factory(
            rounds=rounds,
            callbacks=[ProgressiveFourierAggregation(), det, mon, cb],
            enable_checkpointing=True,
        )
        trainer.fit(fed, dm(), ckpt_path=ckpt)
        return fed, det

    straight, det_a = fit(3, tmp_path / "a")
    fit(1, tmp_path / "b")
    resumed, det_b = fit(3, tmp_path / "c", ckpt=next((tmp_path / "b").glob("*.ckpt")))
    strip = lambda h: [{k: v for k, v in r.items() if k != "round/seconds"} for r in h]  # noqa: E731
    for a, b in zip(strip(resumed.history), strip(straight.history), strict=True):
        assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    for role in ("server", "personal", "local"):
        for key, t in straight.store.stacked(role).items():
            assert torch.equal(resumed.store.stacked(role)[key], t), (role, key)
    assert det_b.stage_log == det_a.stage_log

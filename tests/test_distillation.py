"""Knowledge distillation callbacks: the shared KD helper, MutualLearning, FederatedDistillation,
FedProto, FedMD (defining math against hand computations, end to end, exact resume)."""

import pytest
import torch
from helpers import digits, federation
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional as F

from pl_federated import FederatedDataModule
from pl_federated.callbacks import (
    KD3A,
    FederatedDistillation,
    FedMD,
    FedProto,
    LocalOnly,
    MutualLearning,
)
from pl_federated.callbacks.federated_distillation import average_class_logits, class_logit_table
from pl_federated.callbacks.fedproto import nearest_prototype
from pl_federated.data import IID
from pl_federated.losses import kl_div, prototype_regularizer
from pl_federated.models import MLPClassifier
from pl_federated.prototypes import PrototypeBank


# ----------------------------------------------------------------------------- KD helper
def test_kl_div_matches_formula_both_directions_and_detaches_teacher():
    torch.manual_seed(0)
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    T = 2.0
    p, q = F.softmax(s / T, -1), F.softmax(t / T, -1)
    forward = (q * (q.log() - p.log())).sum(-1).mean() * T**2
    reverse = (p * (p.log() - q.log())).sum(-1).mean() * T**2
    torch.testing.assert_close(kl_div(s, t, T), forward)
    torch.testing.assert_close(kl_div(s, t, T, direction="reverse"), reverse)
    torch.testing.assert_close(kl_div(s, t, T, scale_by_t2=False), forward / T**2)
    kl_div(s, t, T).backward()
    assert t.grad is None and s.grad is not None  # the teacher gets no gradient
    assert kl_div(s, s, 1.0).abs() < 1e-6
    with pytest.raises(ValueError, match="direction"):
        kl_div(s, t, direction="both")
    with pytest.raises(ValueError, match="temperature"):
        kl_div(s, t, 0.0)


# ----------------------------------------------------------------------------- FML
def test_mutual_learning_losses_are_the_fml_formulas():
    torch.manual_seed(0)
    ml = MutualLearning(alpha=0.3, beta=0.6, temperature=1.0)
    y = torch.tensor([0, 1, 2])
    z_p, z_m = torch.randn(3, 3), torch.randn(3, 3)
    outputs = {
        "personal": {"loss": F.cross_entropy(z_p, y), "logits": z_p},
        "model": {"loss": F.cross_entropy(z_m, y), "logits": z_m},
    }

    def total(role):
        w = ml.supervised_weight(None, 0, role)
        return w * outputs[role]["loss"] + ml.client_loss(None, 0, role, (None, y), outputs)

    def kl(teacher, student):  # KL(teacher || student) by hand
        q, p = F.softmax(teacher, -1), F.softmax(student, -1)
        return (q * (q.log() - p.log())).sum(-1).mean()

    ce_p, ce_m = F.cross_entropy(z_p, y), F.cross_entropy(z_m, y)
    torch.testing.assert_close(total("personal"), 0.3 * ce_p + 0.7 * kl(z_m, z_p))
    torch.testing.assert_close(total("model"), 0.6 * ce_m + 0.4 * kl(z_p, z_m))
    with pytest.raises(ValueError, match="alpha"):
        MutualLearning(alpha=1.5)


def test_mutual_learning_end_to_end_with_a_different_personal_architecture(trainer_factory):
    torch.manual_seed(1)
    personal = MLPClassifier(hidden=(16,), lr=0.05, momentum=0.9)
    fed = federation(local_epochs=2)
    trainer_factory(rounds=3, callbacks=[MutualLearning(personal=personal)]).fit(fed, digits(4))
    last = fed.history[-1]
    assert last["personal/acc_mean"] > 0.7 and last["mutual/meme_acc_mean"] > 0.7
    assert last["global/acc"] > 0.5
    assert "train/loss_personal" in last
    stored = fed.store.stacked("personal")
    assert stored["features.1.weight"].shape == (4, 16, 64)  # the personal architecture
    # every client's personal model is its own, and it is not the server model
    assert not torch.equal(stored["features.1.weight"][0], stored["features.1.weight"][1])


# ----------------------------------------------------------------------------- FD
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


# ----------------------------------------------------------------------------- FedProto
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


# ----------------------------------------------------------------------------- FedMD
def public_digits(num_clients=4):
    return FederatedDataModule(
        "digits", num_clients=num_clients, partition=IID(), public_fraction=0.2
    )


def test_public_split_is_held_out_before_partitioning():
    dm = public_digits()
    dm.setup()
    assert len(dm.public_y) == round(1797 * 0.2)
    owned = int(dm.num_train.sum() + dm.num_test.sum())
    assert owned + len(dm.public_y) == 1797
    plain = FederatedDataModule("digits", num_clients=4, partition=IID())
    plain.setup()
    assert len(plain.public_y) == 0


def test_fedmd_digest_moves_the_client_toward_the_consensus(trainer_factory):
    md = FedMD(public_samples=200, digest_epochs=2)
    fed = federation(local_epochs=2)
    trainer_factory(rounds=3, callbacks=[LocalOnly(), md]).fit(fed, public_digits())
    assert md.consensus.shape == (200, 10) and md.consensus_idx.shape == (200,)
    last = fed.history[-1]
    assert last["fedmd/upload_bytes"] == 4 * 200 * 10 * 4
    assert last["personal/acc_mean"] > 0.7
    # a digest from a fresh model lowers its L1 distance to the consensus
    x, goal = md.public_x[md.consensus_idx], md.consensus
    fed.load_state("model", fed.role_registry.initial_state)
    before = F.l1_loss(fed.forward_batched(fed.shared_worker, x), goal)
    fed.trainer.fit_loop.epoch_progress.current.completed = 0
    md._digest_losses = []
    fed.optimizer("model").state.clear()
    md.on_client_start(fed.trainer, fed, client=0)
    after = F.l1_loss(fed.forward_batched(fed.shared_worker, x), goal)
    assert after < 0.95 * before


def test_fedmd_heterogeneous_architectures_train_and_exchange_only_scores(trainer_factory):
    torch.manual_seed(1)
    other = MLPClassifier(hidden=(64, 32), lr=0.05, momentum=0.9)  # another architecture
    md = FedMD(public_samples=200, models=[other])
    fed = federation(local_epochs=2)
    trainer_factory(rounds=5, callbacks=[LocalOnly(), md]).fit(fed, public_digits())
    assert md.architectures == [0, 1, 0, 1]
    assert fed.client_roles(1) == ["arch1"] and fed.client_roles(2) == ["model"]
    # only clients 1 and 3 hold (and trained) the second architecture
    assert [fed.store.has("arch1", k) for k in range(4)] == [False, True, False, True]
    init = fed.role_registry.role_initial_state["arch1"]
    row = fed.store.get("arch1", 1)
    assert any(not torch.equal(row[k], init[k]) for k in init)
    # every client is evaluated with its own architecture, and learned
    assert (fed.client_metrics["personal_acc"] > 0.7).all()
    assert "train/loss_arch1" in fed.history[-1] and fed.history[-1]["train/loss_arch1"] < 1.0
    # the digest of an arch1 client fits its own model to the consensus
    x, goal = md.public_x[md.consensus_idx], md.consensus
    fed.load_state("arch1", init)
    before = F.l1_loss(fed.forward_batched(fed.workers["arch1"], x), goal)
    fed.optimizer("arch1").state.clear()
    md.digest_epochs = 5
    md.on_client_start(fed.trainer, fed, client=3)
    after = F.l1_loss(fed.forward_batched(fed.workers["arch1"], x), goal)
    assert after < 0.95 * before


def test_fedmd_architectures_are_validated(trainer_factory):
    md = FedMD(public_samples=50, models=[MLPClassifier(hidden=(8,))], architectures=[0, 1, 2, 0])
    with pytest.raises(ValueError, match="architectures"):
        trainer_factory(rounds=1, callbacks=[LocalOnly(), md]).fit(federation(), public_digits())
    with pytest.raises(ValueError, match="models"):
        FedMD(models=[torch.nn.Linear(2, 2)])


def test_fedmd_needs_public_data(trainer_factory):
    with pytest.raises(ValueError, match="public_fraction"):
        trainer_factory(rounds=1, callbacks=[LocalOnly(), FedMD()]).fit(federation(), digits(3))


def test_fedmd_public_dataset_by_name_is_resized(shared_data, trainer_factory):
    """Clients hold MNIST (28x28), the public set is USPS (16x16), resized to 28x28."""
    dm = FederatedDataModule(
        "npz", num_clients=3, partition=IID(), path=str(shared_data / "mnist_test10k.npz")
    )
    md = FedMD(public_dataset="npz", public_path=str(shared_data / "usps.npz"), public_samples=100)
    torch.manual_seed(0)
    fed = federation(client=MLPClassifier(input_size=784), local_steps=5)
    trainer_factory(rounds=2, callbacks=[LocalOnly(), md]).fit(fed, dm)
    assert md.public_x.shape[1:] == (1, 28, 28) and md.consensus.shape == (100, 10)


# ----------------------------------------------------------------------------- resume
def strip(history):
    return [{k: v for k, v in h.items() if k != "round/seconds"} for h in history]


@pytest.mark.parametrize(
    "make_callbacks, data",
    [
        (lambda: [MutualLearning(personal=_small_personal())], digits),
        (lambda: [LocalOnly(), FederatedDistillation()], digits),
        (lambda: [LocalOnly(), FedProto()], digits),
        (lambda: [LocalOnly(), FedMD(public_samples=100)], public_digits),
        (
            lambda: [LocalOnly(), FedMD(public_samples=100, models=[_small_personal()])],
            public_digits,
        ),
        # a constant gate: the interrupted run has another max_epochs, so another schedule
        (lambda: [KD3A(target_clients=[2], gate_begin=0.5, gate_end=0.5)], digits),
    ],
    ids=["fml", "fd", "fedproto", "fedmd", "fedmd_heterogeneous", "kd3a"],
)
def test_resume_equals_uninterrupted_run(make_callbacks, data, trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path=None):
        fed = federation(local_steps=3)
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        trainer = trainer_factory(
            rounds=rounds, callbacks=[*make_callbacks(), ckpt], enable_checkpointing=True
        )
        trainer.fit(fed, data(num_clients=3), ckpt_path=ckpt_path)
        return fed

    straight = fit(3, tmp_path / "a")
    fit(2, tmp_path / "b")
    resumed = fit(3, tmp_path / "c", ckpt_path=next((tmp_path / "b").glob("epoch=1-*.ckpt")))
    assert strip(resumed.history) == strip(straight.history)
    for role in ("model", *straight.local_roles, "local"):
        if straight.store.has(role, 0):
            for name, t in straight.store.stacked(role).items():
                assert torch.equal(resumed.store.stacked(role)[name], t), (role, name)


def _small_personal():
    torch.manual_seed(2)
    return MLPClassifier(hidden=(16,), lr=0.05)

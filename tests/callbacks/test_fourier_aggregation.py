"""ProgressiveFourierAggregation as an aggregator, and PFA + DET end to end."""

import pytest
import torch
from helpers import bn_cnn, dm, federation
from lightning.pytorch.callbacks import ModelCheckpoint

from pl_federated.callbacks import (
    DeputyEnhancedTransfer,
    ProgressiveFourierAggregation,
    RetrogressMonitor,
)
from pl_federated.fourier import fourier_mix


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


def test_pfa_classwise_option_end_to_end(trainer_factory):
    from helpers import digits, federation

    from pl_federated.callbacks import ProgressiveFourierAggregation

    pfa = ProgressiveFourierAggregation(classwise_classifier=True)
    fed = federation(local_steps=3)
    trainer_factory(rounds=2, callbacks=[pfa]).fit(fed, digits(3))
    assert pfa.classifier_key == "head.weight"
    assert fed.store.has("server", 0) and fed.history[-1]["global/acc"] > 0.2
    with pytest.raises(ValueError, match="classifier_key"):
        trainer_factory(
            rounds=1,
            callbacks=[
                ProgressiveFourierAggregation(classwise_classifier=True, classifier_key="x")
            ],
        ).fit(federation(local_steps=1), digits(3))


def test_pfa_aggregator_mixes_the_uploads_in_client_order_and_skips_missing_clients():
    """The aggregator's preallocated upload rows give, per client, exactly ``fourier_mix`` of
    the uploads sorted by client; BN stays local, biases are averaged, a selected client
    that did not upload (excluded for NaN) gets no row; the global state is the mean."""
    import functools
    from types import SimpleNamespace

    from pl_federated.callbacks import ProgressiveFourierAggregation
    from pl_federated.callbacks.aggregator import Upload
    from pl_federated.engine.transport import put_server_rows
    from pl_federated.store import ClientStore

    gen = torch.Generator().manual_seed(2)
    uploads = {
        c: {
            "conv.weight": torch.randn(4, 2, 3, 3, generator=gen),
            "fc.weight": torch.randn(6, 8, generator=gen),
            "fc.bias": torch.randn(6, generator=gen),
            "bn.running_mean": torch.randn(4, generator=gen),
        }
        for c in range(5)
    }
    like = {k: torch.zeros_like(v) for k, v in uploads[0].items()}
    store = ClientStore(5)
    fed = SimpleNamespace(
        selected_clients=[3, 0, 2, 1],
        world_size=1,
        client_num_samples=torch.tensor([10, 20, 30, 40, 50]),
        store=store,
        put_client_server_states=functools.partial(put_server_rows, store),
        local_keys={"bn.running_mean"},
        current_round=0,
        trainer=SimpleNamespace(max_epochs=4),
    )
    pfa = ProgressiveFourierAggregation(weighting="samples")
    pfa.reset(fed)
    for c in (3, 0, 1):  # client 2 was excluded
        pfa.update(fed, Upload(c, uploads[c], int(fed.client_num_samples[c]), 1))
    with pytest.raises(RuntimeError, match="not selected"):
        pfa.update(fed, Upload(4, uploads[4], 50, 1))
    average, logged = pfa.aggregate(fed, like)
    clients = [0, 1, 3]
    weights = fed.client_num_samples[clients].double()
    server = fed.store.stacked("server")
    for key in ("conv.weight", "fc.weight"):
        stacked = torch.stack([uploads[c][key] for c in clients])
        torch.testing.assert_close(server[key][clients], fourier_mix(stacked, weights, 0.7))
    w = (weights / weights.sum()).float()
    for key in like:
        mean = sum(wi * uploads[c][key] for wi, c in zip(w, clients, strict=True))
        torch.testing.assert_close(average[key], mean)
    torch.testing.assert_close(server["fc.bias"][clients], average["fc.bias"].expand(3, 6))
    for c in clients:
        torch.testing.assert_close(server["bn.running_mean"][c], uploads[c]["bn.running_mean"])
    assert not fed.store.has("server", 2) and fed.store.has("server", 3)
    assert logged == {"pfa/ratio": pytest.approx(0.7)}

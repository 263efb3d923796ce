"""The client module's own Lightning hooks and gradient clipping inside its local update:
called in Lightning's order, with Lightning's meaning, on both step paths."""

import copy

import pytest
import torch
from helpers import federation
from torch.nn import functional as F

from pl_federated import FederatedDataModule, FederatedModule
from pl_federated.callbacks import FedAvg, FederatedCallback
from pl_federated.data import IID
from pl_federated.loops.client_hooks import CLIENT_HOOKS
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


class Recording(MLPClassifier):
    """Appends (hook, client, arguments worth checking) for every hook the engine calls."""

    def __init__(self, stop_at_batch: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.stop_at_batch = [], stop_at_batch

    def _record(self, hook, *details):
        client = self.trainer.lightning_module.current_client
        self.calls.append((hook, client, *details))

    def on_train_epoch_start(self):
        self._record("on_train_epoch_start")

    def on_train_batch_start(self, batch, batch_idx):
        self._record("on_train_batch_start", batch_idx)
        return -1 if batch_idx == self.stop_at_batch else None

    def on_before_backward(self, loss):
        self._record("on_before_backward", loss.requires_grad)

    def on_after_backward(self):
        self._record("on_after_backward", self.head.weight.grad is not None)

    def on_before_optimizer_step(self, optimizer):
        self._record("on_before_optimizer_step", optimizer is self.trainer.optimizers[0])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
        self._record("configure_gradient_clipping", gradient_clip_val, gradient_clip_algorithm)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._record("on_train_batch_end", sorted(outputs), batch_idx)

    def on_train_epoch_end(self):
        self._record("on_train_epoch_end")


class ForcesLightningPath(FederatedCallback):
    """Overrides a step hook, so the engine steps through Lightning's manual_backward/step."""

    def on_after_backward(self, trainer, pl_module):
        pass


def _data(num_clients, batch_size=32, samples=64):
    return FederatedDataModule(
        "digits",
        num_clients=num_clients,
        partition=IID(),
        batch_size=batch_size,
        max_train_samples=samples,
    )


def _expected_update(client, epochs=2, batches=2, clip=(None, "norm")):
    calls = []
    for _ in range(epochs):
        calls.append(("on_train_epoch_start", client))
        for i in range(batches):
            calls += [
                ("on_train_batch_start", client, i),
                ("on_before_backward", client, True),
                ("on_after_backward", client, True),
                ("on_before_optimizer_step", client, True),
                ("configure_gradient_clipping", client, *clip),
                ("on_train_batch_end", client, ["features", "logits", "loss"], i),
            ]
        calls.append(("on_train_epoch_end", client))
    return calls


def test_the_hook_list_is_lightnings_order():
    assert CLIENT_HOOKS[0] == "on_train_epoch_start"
    assert CLIENT_HOOKS[-1] == "on_train_epoch_end"
    assert CLIENT_HOOKS.index("on_before_backward") < CLIENT_HOOKS.index("on_after_backward")


@pytest.mark.parametrize("path", ["direct", "lightning"])
def test_hooks_run_in_lightnings_order_once_per_local_epoch_and_batch(trainer_factory, path):
    torch.manual_seed(0)
    fed = federation(Recording(), local_epochs=2, gradient_clip_val=0.5)
    callbacks = [FedAvg()] + ([ForcesLightningPath()] if path == "lightning" else [])
    trainer_factory(rounds=2, callbacks=callbacks).fit(fed, _data(2))
    assert fed.stepper.direct is (path == "direct")
    expected = []
    for _ in range(2):  # rounds
        for client in (0, 1):
            expected += _expected_update(client, clip=(0.5, "norm"))
    assert fed.workers["model"].calls == expected


def test_on_train_batch_start_returning_minus_one_ends_the_local_epoch(trainer_factory):
    torch.manual_seed(0)
    fed = federation(Recording(stop_at_batch=1), local_epochs=2)
    trainer = trainer_factory(rounds=1, callbacks=[FedAvg()])
    trainer.fit(fed, _data(2))
    calls = fed.workers["model"].calls
    starts = [c for c in calls if c[0] == "on_train_batch_start"]
    steps = [c for c in calls if c[0] == "on_before_backward"]
    assert [c[2] for c in starts] == [0, 1] * 4  # 2 clients x 2 local epochs, batch 1 refused
    assert len(steps) == 4
    assert trainer.global_step == 4  # steps taken, not steps planned
    assert [c[0] for c in calls].count("on_train_epoch_end") == 4


class ClipAtHalf(MLPClassifier):
    """Clips by its own rule (value 0.01), whatever the federation's settings."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
        self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="value")


def _reference_after_clipped_steps(module, x, y, steps, clip):
    """Plain torch: ``steps`` full-batch SGD steps, clipping as ``clip`` = (value, algorithm)."""
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    value, algorithm = clip
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(module.parameters(), value)
        else:
            torch.nn.utils.clip_grad_value_(module.parameters(), value)
        opt.step()
    return module.state_dict()


@pytest.mark.parametrize(
    ("algorithm", "path", "client_class"),
    [
        ("norm", "direct", MLPClassifier),
        ("value", "direct", MLPClassifier),
        ("norm", "lightning", MLPClassifier),
        ("own rule", "direct", ClipAtHalf),
    ],
)
def test_clipped_steps_equal_a_hand_written_loop(trainer_factory, algorithm, path, client_class):
    """One client, full batch, 3 local steps at lr 0.5: the server model equals plain torch
    clipping the same way, and clipping changed it (the clip is active)."""
    torch.manual_seed(0)
    client = client_class(lr=0.5, hidden=(8,))
    reference, unclipped = copy.deepcopy(client), copy.deepcopy(client)
    settings = {"gradient_clip_val": 0.05}
    if algorithm != "own rule":
        settings["gradient_clip_algorithm"] = algorithm
    fed = federation(client, local_steps=3, **settings)
    dm = _data(1, batch_size=4096)
    callbacks = [FedAvg()] + ([ForcesLightningPath()] if path == "lightning" else [])
    trainer_factory(rounds=1, callbacks=callbacks).fit(fed, dm)
    x, y = dm.client_train(0)
    clip = (0.01, "value") if algorithm == "own rule" else (0.05, algorithm)
    expected = _reference_after_clipped_steps(reference, x, y, 3, clip)
    free = _reference_after_clipped_steps(unclipped, x, y, 3, (1e9, "norm"))
    for name, value in expected.items():
        torch.testing.assert_close(fed.server_state[name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(expected[n], free[n]) for n in expected)


def test_without_clipping_or_hooks_the_default_is_untouched(trainer_factory):
    """No clipping set and no hook overridden: nothing is called (the hot path stays bare)."""
    fed = federation(local_steps=1)
    trainer_factory(rounds=1, callbacks=[FedAvg()]).fit(fed, _data(2))
    assert fed.stepper.hooks.any_overridden("model") == []
    assert fed.stepper.hooks.clip_val is None


def test_vectorized_clients_refuse_hooks_and_clipping(trainer_factory):
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="does not call the client's own hooks"):
        fed = federation(Recording(), vectorize_clients=True, clients_per_step=2)
        trainer_factory(rounds=1).fit(fed, _data(2))
    with pytest.raises(ConfigError, match="cannot clip per client"):
        fed = federation(vectorize_clients=True, clients_per_step=2, gradient_clip_val=1.0)
        trainer_factory(rounds=1).fit(fed, _data(2))


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("gradient_clip_val", -1.0, "> 0"),
        ("gradient_clip_algorithm", "l1", "norm"),
        ("accumulate_grad_batches", 0, ">= 1"),
    ],
)
def test_bad_step_settings_are_named_before_training(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field}.*{allowed}.*got .?{value}") as info:
        FederatedModule(MLPClassifier(), **{field: value})
    assert f"FederatedModule.{field}" in str(info.value)


class Stateful(MLPClassifier):
    """Keeps a running tensor in a plain attribute (like an RNN's hidden state)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.running = torch.zeros(())

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.running = self.running + out["loss"].detach()
        return out


class Resetting(Stateful):
    """The same, reset for every client by the engine's per-client hook."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.started = []

    def on_client_start(self, client):
        self.started.append(client)
        self.running = torch.zeros(())


def test_state_outside_the_state_dict_is_named_not_carried_silently(trainer_factory):
    torch.manual_seed(0)
    fed = federation(Stateful(), local_steps=2)
    with pytest.warns(UserWarning, match=r"keeps tensors outside its state_dict \(\['running'\]\)"):
        trainer_factory(rounds=1, callbacks=[FedAvg()]).fit(fed, _data(2))


def test_on_client_start_resets_it_before_every_client(trainer_factory, recwarn):
    torch.manual_seed(0)
    fed = federation(Resetting(), local_steps=2)
    trainer_factory(rounds=2, callbacks=[FedAvg()]).fit(fed, _data(3))
    worker = fed.workers["model"]
    assert worker.started == [0, 1, 2] * 2
    assert not [w for w in recwarn if "outside its state_dict" in str(w.message)]
    # the last client's two steps only: reset before it, not summed over all clients
    assert 0 < float(worker.running) < 2 * 3.0  # two cross-entropies of a 10-class MLP


def test_a_plain_client_raises_no_such_warning(trainer_factory, recwarn):
    trainer_factory(rounds=1, callbacks=[FedAvg()]).fit(federation(local_steps=1), _data(2))
    assert not [w for w in recwarn if "outside its state_dict" in str(w.message)]


def test_vectorized_clients_refuse_the_reset_hook_and_accumulation(trainer_factory):
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=r"own hooks \['on_client_start'\]"):
        fed = federation(Resetting(), vectorize_clients=True, clients_per_step=2)
        trainer_factory(rounds=1).fit(fed, _data(2))
    with pytest.raises(ConfigError, match="does not accumulate gradients"):
        fed = federation(vectorize_clients=True, clients_per_step=2, accumulate_grad_batches=2)
        trainer_factory(rounds=1).fit(fed, _data(2))

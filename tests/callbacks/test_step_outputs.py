"""The one interface callbacks read a client's step output through, and its one error."""

import pytest
import torch
from helpers import digits, federation

from pl_federated.callbacks import FedAvg, FederatedDistillation, FedProto
from pl_federated.callbacks.step_outputs import STEP_OUTPUT_KEYS, batch_labels, step_output
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def test_labels_come_from_the_output_else_from_an_input_label_pair():
    x, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    assert torch.equal(batch_labels((x, y), {"loss": 0}, "X"), y)
    given = torch.tensor([1, 1, 1, 1])
    assert torch.equal(batch_labels({"ids": x}, {"labels": given}, "X"), given)
    with pytest.raises(ConfigError, match="X needs class labels: .* got a dict batch"):
        batch_labels({"ids": x, "label": y}, {"loss": 0}, "X")
    with pytest.raises(ConfigError, match="got a tuple batch"):
        batch_labels((x, torch.randn(4)), {"loss": 0}, "X")  # float targets are not classes


def test_a_missing_entry_names_the_callback_the_key_and_what_was_returned():
    with pytest.raises(ConfigError) as info:
        step_output({"loss": 1, "logits": 2}, "features", "FedProto")
    assert str(info.value) == (
        "FedProto needs the client's `training_step` to return a dict with 'features' "
        f"({STEP_OUTPUT_KEYS['features']}); it returned ['logits', 'loss']."
    )


class LossOnly(MLPClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


@pytest.mark.parametrize(
    ("callback", "key"), [(FederatedDistillation(), "logits"), (FedProto(lam=1.0), "features")]
)
def test_callbacks_fail_at_the_first_batch_naming_what_is_missing(trainer_factory, callback, key):
    torch.manual_seed(0)
    fed = federation(LossOnly())
    with pytest.raises(ConfigError, match=rf"needs .* return a dict with '{key}'"):
        trainer_factory(rounds=2, callbacks=[FedAvg(), callback]).fit(fed, digits(2))

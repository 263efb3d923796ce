"""Every documented argument is validated once, before training, with a named error.

The property-based test draws bad values for every rule of every public class (values a rule
lists as refused, and numbers just outside its bounds) and asserts one ``ConfigError`` that names
``Class.argument`` and the value. The coverage test makes sure no int/float/bool/choice argument
of those classes is left without a rule.
"""

import inspect
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import digits, federation
from hypothesis import given, settings
from hypothesis import strategies as st

from pl_federated import FederatedDataModule, FederatedModule
from pl_federated import callbacks as cb
from pl_federated.data import (
    IID,
    Dirichlet,
    Domains,
    FeatureNoise,
    LongTail,
    Pathological,
    QuantitySkew,
)
from pl_federated.engine.config import FEDERATION_RULES
from pl_federated.models import CNNClassifier, MLPClassifier
from pl_federated.validation import (
    AnyOf,
    ClientIds,
    ConfigError,
    Int,
    Real,
    Rule,
    argument_rules,
)

CLASSES = [
    cb.FedAvg, cb.FedAvgM, cb.FedAdam, cb.FedAdagrad, cb.FedYogi, cb.FedBN, cb.FedPer,
    cb.FedRep, cb.FedProx, cb.Ditto, cb.DeputyEnhancedTransfer, cb.ConjointPrototypeAlignment,
    cb.FederatedDistillation, cb.MutualLearning, cb.KD3A, cb.ModelPoisoning,
    cb.ProgressiveFourierAggregation, cb.FedProto, cb.RetrogressMonitor, cb.FedMD, cb.Krum,
    cb.TrimmedMean, cb.FederatedSummary, cb.NoisyMedian, cb.FedDyn, cb.FedIR, cb.SiloBN, cb.MOON, cb.PowerOfChoice, cb.ClusteredSampling, cb.FedDF, cb.FedBE, cb.FedAwS, cb.FedGen,
    cb.FedGKT, cb.Gossip, cb.FetchSGD, cb.MOCHA, cb.DPSGD, cb.FedWeIT,
    cb.TaskSequence,
    FederatedDataModule, IID, Dirichlet,
    Domains, FeatureNoise, LongTail, Pathological, QuantitySkew, MLPClassifier, CNNClassifier,
]  # fmt: skip
FREE_FORM = {"path", "public_path", "public_dataset", "store_path", "classifier_key"}
"""String arguments that name files or keys (checked where they are used, at setup)."""


def rules_of(cls) -> dict[str, Rule]:
    return dict(FEDERATION_RULES) if cls is FederatedModule else argument_rules(cls)


def build(cls, **kwargs):
    if cls is FederatedModule:
        return FederatedModule(MLPClassifier(), **kwargs)
    return cls(**kwargs)


CASES = [(cls, name) for cls in [FederatedModule, *CLASSES] for name in rules_of(cls)]


def outside(rule: Rule) -> st.SearchStrategy:
    """Values ``rule`` must refuse: the ones it lists, and numbers beyond its bounds."""
    strategies = [st.sampled_from(rule.refused())]
    if isinstance(rule, AnyOf):
        return st.one_of(*strategies)
    if isinstance(rule, Int):
        if rule.ge is not None:
            strategies.append(st.integers(max_value=rule.ge - 1))
        if rule.le is not None:
            strategies.append(st.integers(min_value=rule.le + 1))
    if isinstance(rule, Real):
        finite = {"allow_nan": False, "allow_infinity": False}
        if rule.ge is not None:
            strategies.append(st.floats(max_value=rule.ge, exclude_max=True, **finite))
        if rule.gt is not None:
            strategies.append(st.floats(max_value=rule.gt, **finite))
        if rule.le is not None:
            strategies.append(st.floats(min_value=rule.le, exclude_min=True, **finite))
        if rule.lt is not None:
            strategies.append(st.floats(min_value=rule.lt, **finite))
    return st.one_of(*strategies)


@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_a_bad_value_gets_one_named_error(cls, name, data):
    rule = rules_of(cls)[name]
    value = data.draw(outside(rule), label=name)
    with pytest.raises(ConfigError) as error:
        build(cls, **{name: value})
    message = str(error.value)
    assert f"`{cls.__name__}.{name}` must be" in message and f"got {value!r}" in message


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_documented_argument_has_a_rule(cls):
    rules = rules_of(cls)
    for name, p in inspect.signature(cls.__init__).parameters.items():
        plain = str(p.annotation).replace(" | None", "")
        documented = ("int", "float", "bool", "str", "int | float", "Sequence[int]")
        if name in FREE_FORM or plain not in (*documented, "Sequence[str]", "list[int]"):
            continue
        assert name in rules, f"{cls.__name__}.{name} ({p.annotation}) has no rule"
    build(cls)  # the defaults are allowed


def test_the_federation_rules_cover_every_setting():
    params = inspect.signature(FederatedModule.__init__).parameters
    assert set(FEDERATION_RULES) == set(params) - {"self", "client", "store_path"}


def test_bools_are_not_ints_and_nan_is_not_a_number():
    with pytest.raises(ConfigError, match=r"`FederatedModule.local_epochs` must be an int >= 1"):
        federation(local_epochs=True)
    with pytest.raises(ConfigError, match="`FederatedModule.clients_per_round` must be"):
        federation(clients_per_round=math.nan)
    with pytest.raises(ConfigError, match=r"`FedAdam.server_lr` must be a finite number > 0"):
        cb.FedAdam(server_lr=math.inf)
    with pytest.raises(ConfigError, match=r"`DeputyEnhancedTransfer.l2` must be .* <= 1"):
        cb.DeputyEnhancedTransfer(l2=1.5)
    with pytest.raises(
        ConfigError, match=r"`FedAvg.ignore_clients` must be None or a list of distinct"
    ):
        cb.FedAvg(ignore_clients=[1.7])
    assert ClientIds().allows([0, 3]) and not ClientIds().allows([True])


def test_client_ids_that_do_not_exist_fail_before_training(trainer_factory):
    for callback in (cb.FedAvg(ignore_clients=[7]), cb.ModelPoisoning(clients=[1, 9])):
        with pytest.raises(ConfigError, match=r"names clients \[\d\], but the federation has"):
            trainer_factory(callbacks=[callback]).fit(federation(), digits(num_clients=4))


def test_a_model_data_mismatch_fails_at_setup_naming_module_and_shapes(trainer_factory):
    wrong_input = federation(client=MLPClassifier(input_size=10))
    with pytest.raises(ConfigError, match=r"MLPClassifier \(role 'model'\) cannot take the data: "):
        trainer_factory().fit(wrong_input, digits(num_clients=3))
    too_few_classes = federation(client=MLPClassifier(num_classes=4))
    with pytest.raises(ConfigError, match="outputs 4 values per sample, but the data has 10"):
        trainer_factory().fit(too_few_classes, digits(num_clients=3))


def test_long_tail_keeps_its_own_min_size():
    labels = torch.arange(10).repeat_interleave(30).numpy()  # 10 classes x 30
    with pytest.raises(ValueError, match=r"fewer than `min_size`=20 samples"):
        LongTail(imbalance=100.0, min_size=20)(labels, num_clients=4)


def test_no_test_data_is_said_not_silent(trainer_factory):
    with pytest.warns(UserWarning, match="No client has test data"):
        trainer_factory(rounds=1).fit(federation(local_steps=1), digits(3, test_fraction=0.0))


def test_the_console_script_reports_a_bad_setting_in_one_line():
    exe = Path(sys.executable).parent / "pl-federated"
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    out = subprocess.run(
        [str(exe), "fit", "--config", str(config), "--model.eval_batch_size=0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith(
        "pl-federated: error: `FederatedModule.eval_batch_size` must be an int >= 1, got 0."
    )


@pytest.mark.slow  # two console-script processes; the one-line report is tested fast
def test_a_setup_check_is_one_line_and_the_debug_variable_shows_the_traceback(tmp_path):
    import os

    exe = Path(sys.executable).parent / "pl-federated"
    config = Path(__file__).resolve().parents[1] / "configs" / "pfa_det.yaml"
    cmd = [str(exe), "fit", "--config", str(config), "--data.val_fraction=0.0"]
    cmd += ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pl-federated: error: DeputyEnhancedTransfer(split='val') needs a validation" in (
        out.stderr
    )
    env = {**os.environ, "PL_FEDERATED_DEBUG": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 1 and "Traceback" in out.stderr and "ConfigError" in out.stderr

"""A configuration error is one message naming the field, the value and what is allowed:
no usage dump, no traceback (``PL_FEDERATED_DEBUG=1`` brings the traceback back)."""

from pathlib import Path

import pytest
from jsonargparse import ArgumentError

from pl_federated.cli import cli_main
from pl_federated.cli_parser import condense, config_error_in
from pl_federated.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
# `run=False` builds without a subcommand (the message then names the program alone)
FIT = ["--config", QUICKSTART, "--trainer.logger=false", "--trainer.max_epochs=1"]


def _parse_error(capsys, *args: str) -> list[str]:
    with pytest.raises(SystemExit) as exit_:
        cli_main([*FIT, *args], run=False)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("arg", "says"),
    [
        (
            "--model.local_epochs=abc",
            "pl-federated: error: `model.local_epochs`: Expected a int",
        ),
        ("--model.bogus=1", "pl-federated: error: unrecognized arguments: --model.bogus=1"),
        ("--config=missing.yaml", "pl-federated: error: `config`: File does not exist"),
    ],
)
def test_a_parse_error_is_the_message_and_a_pointer_to_help(capsys, arg, says):
    lines = _parse_error(capsys, arg)
    assert lines[0].startswith(says), lines
    assert lines[1:] == ["(`pl-federated --help` lists the options)"]
    if arg == "--model.local_epochs=abc":
        assert lines[0].endswith("Got value: abc")


def test_a_class_refusing_its_argument_in_a_callback_list_says_so_itself(tmp_path):
    prox = (ROOT / "configs" / "algorithms" / "fedprox.yaml").read_text()
    (tmp_path / "prox.yaml").write_text(prox.replace("mu: 0.01", "mu: null"))
    configs = ["--config", str(ROOT / "configs" / "federations" / "digits20.yaml")]
    configs += ["--config", str(tmp_path / "prox.yaml")]
    # jsonargparse wraps it in "Does not validate against any of the Union subtypes ..."
    with pytest.raises(ConfigError, match=r"^`FedProx.mu` must be a finite number >= 0, got None"):
        cli_main([*configs, "--trainer.logger=false"], run=False)


def test_the_debug_variable_raises_with_the_traceback(monkeypatch):
    monkeypatch.setenv("PL_FEDERATED_DEBUG", "1")
    with pytest.raises(ArgumentError, match="model.local_epochs"):
        cli_main([*FIT, "--model.local_epochs=abc"], run=False)


def test_condense_and_the_config_error_behind_a_chain():
    message = "Parser key \"model.seed\":\n  Expected a <class 'int'>. Got value: x"
    assert condense(message) == "`model.seed`: Expected a int. Got value: x"
    refusal = ConfigError("`A.b` must be > 0, got 0.")
    try:
        try:
            raise ValueError("tried a subclass") from refusal
        except ValueError:
            raise ValueError("Does not validate against any of the Union subtypes")  # noqa: B904
    except ValueError as wrapped:
        assert config_error_in(wrapped) is refusal  # through __context__, then __cause__
    assert config_error_in(ValueError("plain")) is None

"""W&B sweep files: every parameter is a valid override of the base config (checked by the CLI
parser, no training), and one sampled combination trains one round."""

import random
import re
from pathlib import Path

import pytest
import yaml

from pl_federated.cli import cli_main, patch_callback_args

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--summary.print_tables=false",
    "--model.local_epochs=1",
    "--data.max_train_samples=32",
]


def sweep_args(sweep: dict, choose) -> list[str]:
    """The command W&B would run, with ``${args}`` filled by ``choose(values)`` per parameter
    (the logger stays off in tests)."""
    args = [f"--{name}={choose(spec['values'])}" for name, spec in sweep["parameters"].items()]
    command = [c for c in sweep["command"] if c not in ("${env}", "pl-federated")]
    command = [c for c in command if not c.startswith("--trainer.logger")]
    i = command.index("${args}")
    return command[:i] + args + command[i + 1 :]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_value_parses(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["name"]
    assert "${args}" in sweep["command"] and sweep["program"] == "pl-federated"
    root = f"--trainer.default_root_dir={tmp_path}"
    first = sweep_args(sweep, lambda v: v[0])
    cli = cli_main([*first[1:], root], run=False)  # the whole CLI, Trainer included, once
    assert cli.trainer is not None
    for name, spec in sweep["parameters"].items():
        for value in spec["values"]:  # each value of each parameter, the others at their first
            args = sweep_args({**sweep, "parameters": {name: {"values": [value]}}}, lambda v: v[0])
            # the CLI's own parser: type checks, then the model, data and callbacks are built
            # (their argument rules run); ~5x cheaper than a new CLI per value
            config = cli.parser.parse_args(patch_callback_args([*args[1:], root]))
            built = cli.parser.instantiate_classes(config)
            assert built.model is not None and built.trainer.callbacks


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_a_sampled_combination_runs_one_round(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    sweep = yaml.safe_load(path.read_text())
    args = sweep_args(sweep, random.Random(0).choice)
    cli = cli_main(
        [*args, *TINY, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    )
    assert len(cli.model.history) == 1


def test_callback_override_by_class_name(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        "trainer:\n  callbacks:\n    - class_path: a.FedAvg\n    - class_path: b.FedProx\n"
        "      init_args: {mu: 0.01}\n"
    )
    out = patch_callback_args(["fit", "--config", str(base), "--trainer.callbacks.FedProx.mu=0.5"])
    patched = yaml.safe_load(Path(out[2]).read_text())
    assert patched["trainer"]["callbacks"][1]["init_args"] == {"mu": 0.5}
    assert len(out) == 3 and re.search("base.yaml$", out[2])
    with pytest.raises(ValueError, match="need exactly one"):
        patch_callback_args(["fit", "--config", str(base), "--trainer.callbacks.Krum.f=1"])

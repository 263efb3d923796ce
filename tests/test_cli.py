import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pl_federated.cli import cli_main
from scripts.common import FEDERATION, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
RUNS = shipped_configs(experiments=True)


def _config_args(name: str) -> list[str]:
    return [arg for path in RUNS[name] for arg in ("--config", str(path))]


def test_quickstart_config_reaches_target_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", QUICKSTART, "--trainer.enable_progress_bar=false"])
    history = cli.model.history
    assert len(history) == 30 and cli.model.num_clients == 10
    assert history[-1]["global/acc"] >= 0.85
    out = capsys.readouterr().out
    assert "rounds" in out and "pers_acc_worst" in out and "clients" in out
    ckpts = list((tmp_path / "outputs").rglob("*.ckpt"))
    assert len(ckpts) == 1

    # `test` rebuilds everything from the config + checkpoint and evaluates the server model
    test = cli_main(
        ["test", "--config", QUICKSTART, f"--ckpt_path={ckpts[0]}", "--trainer.logger=false"]
    )
    metrics = test.trainer.callback_metrics
    assert metrics["test/acc"].item() == pytest.approx(history[-1]["global/acc"], abs=1e-6)
    assert metrics["test/f1"].item() == pytest.approx(history[-1]["global/f1"], abs=1e-6)
    with pytest.warns(UserWarning, match="no validation split .* `val/\\*` are test numbers"):
        val = cli_main(
            ["validate", "--config", QUICKSTART, f"--ckpt_path={ckpts[0]}"]
            + ["--trainer.logger=false"]
        )
    assert val.trainer.callback_metrics["val/acc"].item() == pytest.approx(
        metrics["test/acc"].item()
    )


def test_checkpoint_rebuilds_clients_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", QUICKSTART, "--trainer.max_epochs=1"])
    ckpt = next((tmp_path / "outputs").rglob("*.ckpt"))
    from pl_federated import FederatedModule

    restored = FederatedModule.load_from_checkpoint(ckpt)
    assert type(restored.shared_worker).__name__ == "MLPClassifier"
    saved = torch.load(ckpt, weights_only=True)["federated"]["server_state"]
    assert all(torch.equal(restored.server_state[k], v) for k, v in saved.items())


def test_console_script_print_config_and_links():
    exe = Path(sys.executable).parent / "pl-federated"
    out = subprocess.run(
        [str(exe), "fit", "--config", QUICKSTART, "--print_config"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "num_clients: 10" in out and "class_path: pl_federated.models.MLPClassifier" in out


def test_cli_rejects_bad_config_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="clients_per_round"):
        cli_main(["fit", "--config", QUICKSTART, "--model.clients_per_round=11"])


def test_the_shipped_runs_are_every_config_with_algorithm_parts_on_the_shared_federation():
    configs = ROOT / "configs"
    files = {p for p in configs.rglob("*.yaml") if "sweeps" not in p.parts}
    assert {p for paths in RUNS.values() for p in paths} == files  # every file is run
    parts = [name for name in RUNS if name.startswith("algorithms/")]
    assert "algorithms/fedavg" in parts and len(parts) == 56
    assert all(RUNS[name] == [FEDERATION, configs / f"{name}.yaml"] for name in parts)


FLAGSHIP = "experiments/prr_digit_domains/pfa_det_cpa"


@pytest.mark.parametrize(
    "name",
    [
        # the experiment grid's other runs (~3 s each) run in make test-all; make test keeps
        # the flagship and every algorithm part
        pytest.param(n, marks=pytest.mark.slow)
        if n.startswith("experiments/") and n != FLAGSHIP
        else n
        for n in sorted(RUNS)
    ],
)
def test_every_shipped_config_runs_one_round(name, monkeypatch, tmp_path):
    texts = "".join(path.read_text() for path in RUNS[name])
    if "../shared/data" in texts and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("config reads ../shared/data, which is not present")
    monkeypatch.chdir(ROOT)  # configs use paths relative to the repository root
    cli = cli_main(
        [
            "fit",
            *_config_args(name),
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",  # where the CLI saves its config.yaml
            "--summary.print_tables=false",
            "--model.local_epochs=1",  # keep the smoke test fast
            "--data.max_train_samples=64",
        ]
    )
    assert len(cli.model.history) == 1
    row = cli.model.history[0]
    has_global = cli.model.aggregator.has_global_model  # LocalOnly-based: personal only
    assert 0.0 <= row["global/acc" if has_global else "personal/acc_mean"] <= 1.0
    assert has_global == ("global/acc" in row)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_shipped_config_prints(name, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", *_config_args(name), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "class_path: pl_federated" in capsys.readouterr().out


def _rows(csv_path: Path) -> list[dict[str, str]]:
    import csv

    with open(csv_path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "round/seconds"} for r in csv.DictReader(f)]


def test_ckpt_path_last_resumes_the_shipped_config_from_the_newest_loadable_checkpoint(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    quick = ["--config", QUICKSTART, "--trainer.enable_progress_bar=false"]
    quick += ["--summary.print_tables=false", "--data.max_train_samples=40"]
    straight = cli_main(["fit", *quick, "--trainer.max_epochs=4", "--trainer.logger.save_dir=a"])
    cli_main(["fit", *quick, "--trainer.max_epochs=2", "--trainer.logger.save_dir=b"])
    run0 = tmp_path / "b" / "quickstart" / "version_0" / "checkpoints"
    (run0 / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")  # the newest file: corrupt
    with pytest.warns(UserWarning, match=r"skipped checkpoints that do not load: .*last\.ckpt"):
        resumed = cli_main(
            ["fit", *quick, "--trainer.max_epochs=4", "--trainer.logger.save_dir=b"]
            + ["--ckpt_path=last"]
        )
    assert Path(resumed.trainer.ckpt_path).resolve() == next(run0.glob("epoch=1-*.ckpt"))
    assert len(resumed.model.history) == 4
    for k, v in straight.model.server_state.items():
        assert torch.equal(resumed.model.server_state[k], v), k
    # the resumed run's metrics.csv (a new version) holds every round, as an uninterrupted run's
    expected = _rows(tmp_path / "a" / "quickstart" / "version_0" / "metrics.csv")
    got = _rows(tmp_path / "b" / "quickstart" / "version_1" / "metrics.csv")
    assert [r["round"] for r in expected] == ["0.0", "1.0", "2.0", "3.0"]
    assert got == expected


def test_ckpt_path_last_without_checkpoints_says_it_starts_over(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(
        UserWarning, match="no checkpoint that loads in .*training starts at round 0"
    ):
        cli_main(
            ["fit", "--config", QUICKSTART, "--trainer.max_epochs=1", "--ckpt_path=last"]
            + ["--trainer.enable_progress_bar=false", "--summary.print_tables=false"]
        )


def test_every_shipped_config_checkpoints_every_round_into_its_own_folder():
    import yaml

    folders = {}
    for name, paths in RUNS.items():
        trainer = {}
        for path in paths:  # what matters here merges key by key (logger init_args)
            for key, value in yaml.safe_load(path.read_text()).get("trainer", {}).items():
                if key == "logger":
                    logger = trainer.setdefault("logger", {"init_args": {}})
                    logger["init_args"].update(value.get("init_args", {}))
                else:
                    trainer[key] = value
        assert trainer.get("enable_checkpointing", True), name  # so `--ckpt_path last` works
        args = trainer["logger"]["init_args"]
        folder = (args["save_dir"], args.get("name", paths[-1].stem))  # the CLI's default name
        folders.setdefault(folder, []).append(name)
    assert all(len(names) == 1 for names in folders.values()), folders  # `last` finds its own


def test_a_composed_run_logs_under_the_algorithm_name_and_says_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [*_config_args("algorithms/fedprox"), "--trainer.max_epochs=1"]
    args += ["--trainer.enable_progress_bar=false", "--summary.print_tables=false"]
    args += ["--data.max_train_samples=32", "--model.local_epochs=1"]
    args += [f"--trainer.logger.save_dir={tmp_path}"]
    cli = cli_main(["fit", *args])
    run = tmp_path / "fedprox" / "version_0"
    assert Path(cli.trainer.log_dir) == run
    assert {"config.yaml", "metrics.csv", "rounds.csv", "clients.csv", "checkpoints"} <= {
        p.name for p in run.iterdir()
    }
    out = capsys.readouterr().out
    assert f"outputs: {run}/ (" in out and "rounds.csv" in out
    named = cli_main([*args, "--trainer.logger.name=mine"], run=False)
    assert named.trainer.logger.name == "mine"  # a name chosen anywhere is kept


def test_a_checkpoint_cannot_choose_paths_or_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = ["--config", QUICKSTART, "--trainer.logger=false", "--data.max_train_samples=40"]
    cli_main(["fit", *quick, "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    saved["hyper_parameters"]["store_path"] = str(tmp_path / "chosen_by_the_checkpoint")
    saved["hyper_parameters"]["client"]["class_path"] = "helpers.LoggingClient"
    saved["hyper_parameters"]["local_epochs"] = 3  # numbers may come from the checkpoint
    torch.save(saved, ckpt)
    with pytest.warns(UserWarning, match="checkpoint's hyperparameters set `model.store_path`"):
        test = cli_main(["test", *quick, f"--ckpt_path={ckpt}"])
    assert (
        test.model.store_path is None and type(test.model.shared_worker).__name__ == "MLPClassifier"
    )
    assert test.model.local_epochs == 3
    assert not (tmp_path / "chosen_by_the_checkpoint").exists()


def test_test_scores_the_personal_models_held_in_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ditto = [*_config_args("algorithms/ditto"), "--trainer.logger=false"]
    ditto += ["--data.max_train_samples=40", "--model.clients_per_round=1.0"]
    fit = cli_main(["fit", *ditto, "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    metrics = cli_main(["test", *ditto, f"--ckpt_path={ckpt}"]).trainer.callback_metrics
    # every client trained in the round, so its fit-time score is of the model it keeps
    personal = fit.model.history[-1]["personal/acc_mean"]
    assert metrics["test/personal_acc_client_mean"].item() == pytest.approx(personal, abs=1e-6)
    assert metrics["test/acc"].item() == pytest.approx(fit.model.history[-1]["global/acc"])
    local = [*_config_args("algorithms/fd"), "--trainer.logger=false"]
    local += ["--data.max_train_samples=40", "--trainer.enable_progress_bar=false"]
    cli_main(["fit", *local, "--trainer.max_epochs=1", "--trainer.default_root_dir=fd"])
    ckpt = next((tmp_path / "fd").rglob("*.ckpt"))
    metrics = cli_main(["test", *local, f"--ckpt_path={ckpt}"]).trainer.callback_metrics
    assert "test/personal_acc" in metrics and "test/acc" not in metrics  # no global model


def test_a_quickstart_run_prints_no_warning_and_writes_only_its_run_folder(tmp_path):
    exe = Path(sys.executable).parent / "pl-federated"
    out = subprocess.run(
        [str(exe), "fit", "--config", QUICKSTART, "--trainer.max_epochs=2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    warned = [line for line in out.stderr.splitlines() if "Warning" in line or ".py:" in line]
    assert not warned, warned
    assert "Tip" not in out.stderr + out.stdout  # Lightning's cloud advertising, dropped
    assert f"outputs: {Path('outputs', 'quickstart', 'version_0')}/ (" in out.stdout
    # nothing written next to the command: every file is in the run's folder
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]
    run = tmp_path / "outputs" / "quickstart" / "version_0"
    expected = {"config.yaml", "metrics.csv", "rounds.csv", "clients.csv", "partition.csv"}
    expected |= {
        f"{fig}.{ext}" for fig in ("partition", "client_accuracy") for ext in ("png", "pdf")
    }
    assert expected <= {p.name for p in run.iterdir()}


def _partition(*args):
    cli = cli_main(["--config", QUICKSTART, *args], run=False)
    cli.datamodule.setup("fit")
    return cli.model.seed, [idx.tolist() for idx in cli.datamodule.split.indices]


def test_the_training_seed_keeps_the_partition_and_the_data_seed_changes_it():
    seed0, part0 = _partition()
    seed1, part1 = _partition("--seed_everything=1")
    assert (seed0, seed1) == (0, 1) and part1 == part0  # new training seed, same partition
    seed, part_data1 = _partition("--data.seed=1")
    assert seed == 0 and part_data1 != part0  # same training seed, another partition


def test_help_names_every_subcommand_and_partition_help_its_options(capsys):
    from pl_federated.cli import partition_main

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert "{fit,validate,test}" in out and "predict" not in out  # no predict for a federation
    assert "pl-federated partition" in out and "pl-federated compare" in out
    with pytest.raises(SystemExit):
        cli_main(["predict", "--config", QUICKSTART])
    assert "invalid choice: 'predict'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        partition_main(["--help"])
    out = capsys.readouterr().out
    assert "--config CONFIG" in out and "--out OUT" in out and "--data.num_clients" in out

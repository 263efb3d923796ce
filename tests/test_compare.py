"""``pl-federated compare``: configs x training seeds on one partition, reused when done."""

import csv
import json
import math
import statistics

import pytest

from pl_federated.cli import cli_main
from pl_federated.compare import compare_main, comparison_table, curve, last_evaluated, mean_std
from pl_federated.validation import ConfigError

BASE = """\
trainer:
  max_epochs: 2
  accelerator: cpu
  logger: false
model:
  client:
    class_path: pl_federated.models.MLPClassifier
    init_args: {input_size: 64, hidden: [16], num_classes: 10, lr: 0.05}
  clients_per_round: 1.0
data:
  dataset: digits
  num_clients: 4
  partition:
    class_path: pl_federated.data.Dirichlet
    init_args: {alpha: 0.5, min_size: 20}
"""
FEDAVG = "trainer:\n  callbacks:\n    - class_path: pl_federated.callbacks.FedAvg\n"
LOCAL = "trainer:\n  callbacks:\n    - class_path: pl_federated.callbacks.LocalOnly\n"


def test_mean_std_last_evaluated_and_curve_by_hand():
    assert mean_std([0.5, 0.7, math.nan]) == "0.6000 ± 0.1414"  # sample std of 0.5, 0.7
    assert mean_std([0.25]) == "0.2500" and mean_std([math.nan]) == "-"
    rounds = [{"round": 0, "a": 0.1}, {"round": 1, "a": math.nan}, {"round": 2, "a": 0.3}]
    assert last_evaluated(rounds, "a") == 0.3 and math.isnan(last_evaluated(rounds, "b"))
    by_seed = {0: rounds, 1: [{"round": 0, "a": 0.3}, {"round": 2, "a": 0.5}]}
    xs, means, stds = curve(by_seed, "a")
    assert xs == [0, 2] and means == pytest.approx([0.2, 0.4])
    assert stds == pytest.approx([statistics.stdev([0.1, 0.3])] * 2)


def test_the_table_takes_any_rounds_csv_columns():
    """A task's own metrics (e.g. global_mse) tabulate like the default accuracy columns."""
    results = {
        "fedavg": {0: [{"round": 1, "global_mse": 0.5}], 1: [{"round": 1, "global_mse": 0.7}]}
    }
    columns, rows = comparison_table(results, [("global_mse", "global_mse")])
    assert columns == ["config", "seeds", "global_mse"]
    assert rows == [["fedavg", "2", "0.6000 ± 0.1414"]]


@pytest.mark.slow  # 6 fits; test_an_interrupted_run_resumes_from_its_checkpoint covers the runner
def test_compare_two_configs_three_seeds_one_partition_then_reuse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, fedavg, local = (tmp_path / n for n in ("base.yaml", "fedavg.yaml", "local.yaml"))
    base.write_text(BASE)
    fedavg.write_text(FEDAVG)
    local.write_text(LOCAL)
    calls = []

    def fit(args):
        calls.append(args)
        return cli_main(args)

    args = ["--base", str(base), "--configs", str(fedavg), str(local), "--seeds", "0", "1", "2"]
    columns, rows = compare_main([*args, "--out", "cmp"], fit=fit)
    assert len(calls) == 6
    assert columns == ["config", "seeds", "personal acc", "worst client", "global acc"]
    assert [r[:2] for r in rows] == [["fedavg", "3"], ["local", "3"]]
    assert rows[1][4] == "-"  # LocalOnly has no global model
    out = tmp_path / "cmp"
    assert {p.name for p in out.iterdir()} >= {"compare.csv", "compare.md", "compare.png"}
    assert (out / "compare.pdf").stat().st_size > 0
    # the table is the mean ± sample std over seeds of each run's last round, by hand
    finals = [
        json.loads((out / "fedavg" / f"seed_{s}" / "result.json").read_text())["rounds"][-1]
        for s in (0, 1, 2)
    ]
    accs = [f["pers_acc_mean"] for f in finals]
    assert rows[0][2] == f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}"
    assert len(set(accs)) > 1  # the training seed changes the run
    # ... but not the partition (the data seed is the config's)
    partitions = {(out / "fedavg" / f"seed_{s}" / "partition.csv").read_text() for s in (0, 1, 2)}
    assert len(partitions) == 1
    with (out / "compare.csv").open() as f:
        assert list(csv.reader(f))[1:] == rows

    # finished runs are reused, not redone; a changed config reruns its runs only
    calls.clear()
    assert compare_main([*args, "--out", "cmp"], fit=fit)[1] == rows
    assert calls == []
    local.write_text(LOCAL + "model:\n  local_epochs: 2\n")
    compare_main([*args, "--out", "cmp"], fit=fit)
    assert len(calls) == 3 and all(str(local) in c for c in calls)


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "fedavg.yaml"
    config.write_text(BASE.replace("  logger: false\n", "  logger: false\n" + FEDAVG[9:]))
    args = ["--configs", str(config), "--seeds", "0", "--out", "cmp"]
    straight = compare_main(args, fit=cli_main)[1]
    run = tmp_path / "cmp" / "fedavg" / "seed_0"
    rounds = json.loads((run / "result.json").read_text())["rounds"]
    (run / "result.json").unlink()  # as if killed after its last checkpoint
    calls = []

    def fit(args):
        calls.append(args)
        return cli_main(args)

    assert compare_main(args, fit=fit)[1] == straight
    assert any(a.startswith("--ckpt_path=") for a in calls[0])
    resumed = json.loads((run / "result.json").read_text())["rounds"]
    assert [r["pers_acc_mean"] for r in resumed] == [r["pers_acc_mean"] for r in rounds]


def test_bad_compare_arguments_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="'missing.yaml' is not a file"):
        compare_main(["--configs", "missing.yaml"], fit=cli_main)
    a, b = tmp_path / "a" / "x.yaml", tmp_path / "b" / "x.yaml"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text(FEDAVG)
    with pytest.raises(ConfigError, match="distinct file names"):
        compare_main(["--configs", str(a), str(b)], fit=cli_main)
    with pytest.raises(ConfigError, match="--seeds must be >= 0"):
        compare_main(["--configs", str(a), "--seeds", "-1"], fit=cli_main)

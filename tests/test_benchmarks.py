"""benchmarks/gpu_check.py keeps working: its CPU smoke run prints the full results table."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_prints_every_check():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    checks = [row.split(" | ")[0].lstrip("| ") for row in rows[1:]]
    assert checks[:6] == [
        f"{name}, {precision}"
        for name in ("quickstart", "digits BN CNN")
        for precision in ("32-true", "16-mixed", "bf16-mixed")
    ]
    measured = {c: r for c, r in zip(checks, rows[1:], strict=True)}
    for check in ("quickstart, 32-true", "quickstart, bf16-mixed", "digits BN CNN, 32-true"):
        acc = float(re.search(r"([0-9.]+) global acc", measured[check]).group(1))
        assert 0.0 <= acc <= 1.0
    lean = [c for c in checks if "lean loop" in c]
    assert len(lean) == 1 and "1.00x the lean loop" in measured[lean[0]]
    assert sum("vectorized" in c or "sequential" in c for c in checks) == 2
    assert sum("store on" in c for c in checks) == 2
    assert "skipped" in measured["fed_ddp on 2 GPUs"]


def _benchmark(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_scaling_points_measure_and_plot(tmp_path):
    """One small point per store kind, in process, and both plots from them."""
    scaling = _benchmark("scaling")
    results = []
    for store in scaling.STORES:
        r = scaling.run_point("PFA+DET", 40, 5, store, rounds=2)
        assert r["seconds_per_round"] > 0 and r["peak_rss_mib"] > 0
        assert r["state_mib"] > 0  # both roles of all 40 clients were written
        results += [{**r, "axis": "total"}, {**r, "axis": "per_round"}]
    half = {r["store"]: r["state_mib"] for r in results}
    assert half["ram-float16"] < half["ram"]
    scaling.plot(results, tmp_path, [5], [40])
    assert (tmp_path / "scaling_total_clients.png").stat().st_size > 0
    assert (tmp_path / "scaling_clients_per_round.png").stat().st_size > 0


def test_eval_scale_measures_the_batched_and_the_one_client_evaluation():
    eval_scale = _benchmark("eval_scale")
    batched = eval_scale.run_one("eval (batched, default 64 clients per call)", 60, 2)
    one = eval_scale.run_one("eval (per client)", 60, 2)
    assert batched["personal_acc_mean"] == one["personal_acc_mean"]
    assert batched["personal_f1_mean"] == one["personal_f1_mean"]


def test_interleaved_pairing_times_both_loops_round_by_round(tmp_path):
    """fedavg_throughput --interleave: one lean-loop round before each pl_federated round,
    both timed apart; both loops train the same clients to the same kind of model."""
    bench = _benchmark("fedavg_throughput")
    w = bench.Workload("device", 20, 5, 3, 10, 0.05, bench.IID(min_size=20), "mlp")
    path, _ = bench.mnist_npz(tmp_path)
    dm = bench.workload_data(w, path)
    dm.setup("fit")
    r = bench.run_interleaved(w, dm, "auto")
    assert r["rounds"] == 3 and r["fed"] > 0 and r["lean"] > 0
    assert r["ratio"] == pytest.approx(r["fed"] / r["lean"])
    assert r["q1"] <= r["median"] <= r["q3"]
    assert 0.0 <= r["fed_acc"] <= 1.0 and 0.0 <= r["lean_acc"] <= 1.0

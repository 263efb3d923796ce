"""``pl-federated compare``: several configs x several training seeds on one partition, one
table and one plot.

Each (config, seed) run is an ordinary ``pl-federated fit`` of the config (after the shared
``--base`` configs, if any) with ``--seed_everything <seed>``: the training seed changes, the
data seed (``data.seed``) stays the config's, so every run of a comparison sees the same
partition. Its outputs (CSV metrics, the round and client tables, checkpoints) go to
``<out>/<config>/seed_<seed>/``. A finished run leaves ``result.json`` (its round table,
read back from the ``rounds.csv`` the run wrote); a later compare with the same config files,
seed and overrides reuses it instead of training again, and a run that was interrupted
resumes from its newest checkpoint. Changing a config file reruns its runs from scratch.

The table has one row per config: the mean ± standard deviation over seeds of the last
evaluated round's mean personalized accuracy, of its worst client's accuracy and of the
global model's accuracy ("-" for methods without one). It is printed and written as
``compare.csv`` and ``compare.md``; ``compare.png`` / ``compare.pdf`` plot a metric against
the round, the mean over seeds with a ±1 std band.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pl_federated.validation import ConfigError

TABLE_COLUMNS = (
    ("pers_acc_mean", "personal acc"),
    ("pers_acc_worst", "worst client"),
    ("global_acc", "global acc"),
)
"""Columns of ``rounds.csv`` the table reports, and their headings."""


@dataclass(frozen=True)
class Run:
    """One training run of a comparison: ``config`` (after ``base``) with training ``seed``."""

    config: Path
    seed: int
    out: Path
    base: tuple[Path, ...] = ()
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.config.stem

    @property
    def folder(self) -> Path:
        return self.out / self.name / f"seed_{self.seed}"

    def signature(self) -> dict[str, Any]:
        """What makes a stored result this run's: the config files' text, seed, overrides."""
        text = "\n".join(p.read_text() for p in (*self.base, self.config))
        return {
            "configs": [str(p) for p in (*self.base, self.config)],
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "seed": self.seed,
            "overrides": list(self.overrides),
        }

    def fit_args(self, resume: Path | None) -> list[str]:
        """The ``pl-federated fit`` arguments of this run (resuming from ``resume``)."""
        configs = [a for p in (*self.base, self.config) for a in ("--config", str(p))]
        logger = "lightning.pytorch.loggers.CSVLogger"
        args = ["fit", *configs, *self.overrides, f"--seed_everything={self.seed}"]
        args += [f"--trainer.logger={logger}", f"--trainer.logger.save_dir={self.out}"]
        args += [f"--trainer.logger.name={self.name}", f"--trainer.logger.version=seed_{self.seed}"]
        args += ["--summary.print_tables=false", "--trainer.enable_progress_bar=false"]
        args += ["--trainer.enable_model_summary=false"]
        return args + ([f"--ckpt_path={resume}"] if resume else [])


def read_rounds(path: Path) -> list[dict[str, float]]:
    """``rounds.csv`` as rows of floats (an empty cell is NaN)."""
    with path.open(newline="") as f:
        return [
            {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def stored_result(run: Run) -> list[dict[str, float]] | None:
    """The round table of a finished run with this run's signature, else ``None``."""
    path = run.folder / "result.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["rounds"] if saved.get("signature") == run.signature() else None


def execute(run: Run, fit: Callable[[list[str]], Any]) -> list[dict[str, float]]:
    """Train ``run`` (resuming an interrupted one with the same signature) and store its
    result; a folder left by another signature is cleared first."""
    signature = run.signature()
    marker = run.folder.parent / f"{run.folder.name}.signature.json"  # beside the log dir
    if run.folder.exists() and (not marker.exists() or json.loads(marker.read_text()) != signature):
        shutil.rmtree(run.folder)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(signature, indent=1))
    checkpoints = sorted(run.folder.glob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    fit(run.fit_args(checkpoints[-1] if checkpoints else None))
    rounds_csv = run.folder / "rounds.csv"
    if not rounds_csv.exists():
        raise RuntimeError(f"{run.name} seed {run.seed}: the run wrote no {rounds_csv}.")
    rounds = read_rounds(rounds_csv)
    result = {"signature": signature, "rounds": rounds}
    (run.folder / "result.json").write_text(json.dumps(result, indent=1))
    return rounds


def last_evaluated(rounds: Sequence[dict[str, float]], key: str) -> float:
    """``key`` at the last round where it was evaluated (NaN if never, or absent)."""
    values = [r.get(key, math.nan) for r in rounds]
    finite = [v for v in values if not math.isnan(v)]
    return finite[-1] if finite else math.nan


def mean_std(values: Sequence[float]) -> str:
    """``"mean ± std"`` over the finite ``values`` (``"-"`` if none; the mean alone for one)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    if len(finite) == 1:
        return f"{finite[0]:.4f}"
    return f"{statistics.mean(finite):.4f} ± {statistics.stdev(finite):.4f}"


def comparison_table(
    results: dict[str, dict[int, list[dict[str, float]]]],
    table_columns: Sequence[tuple[str, str]] = TABLE_COLUMNS,
) -> tuple[list[str], list[list[str]]]:
    """One row per config: seeds and ``table_columns`` (``rounds.csv`` column, heading;
    default :data:`TABLE_COLUMNS`) as mean ± std over seeds."""
    columns = ["config", "seeds", *(heading for _, heading in table_columns)]
    rows = []
    for name, by_seed in results.items():
        cells = [
            mean_std([last_evaluated(r, key) for r in by_seed.values()]) for key, _ in table_columns
        ]
        rows.append([name, str(len(by_seed)), *cells])
    return columns, rows


def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def curve(by_seed: dict[int, list[dict[str, float]]], key: str) -> tuple[list, list, list]:
    """Rounds where every seed evaluated ``key``, with the mean and sample std over seeds
    there (the table's std)."""
    per_round: dict[int, list[float]] = {}
    for rounds in by_seed.values():
        for row in rounds:
            if not math.isnan(row.get(key, math.nan)):
                per_round.setdefault(int(row["round"]), []).append(row[key])
    xs = [r for r, v in sorted(per_round.items()) if len(v) == len(by_seed)]
    means = [statistics.mean(per_round[r]) for r in xs]
    stds = [statistics.stdev(per_round[r]) if len(by_seed) > 1 else 0.0 for r in xs]
    return xs, means, stds


def plot(results: dict[str, dict[int, list[dict[str, float]]]], key: str, path: Path) -> list[Path]:
    """``key`` against the round per config (mean over seeds, ±1 std band), as PNG and PDF."""
    from pl_federated.figures import FORMATS, integer_ticks, legend_outside, new_figure, save

    fig, ax = new_figure(6.4, 4.0)
    for name, by_seed in results.items():
        xs, means, stds = curve(by_seed, key)
        if not xs:
            continue
        (line,) = ax.plot(xs, means, label=f"{name} ({len(by_seed)} seeds)")
        lower = [m - s for m, s in zip(means, stds, strict=True)]
        upper = [m + s for m, s in zip(means, stds, strict=True)]
        ax.fill_between(xs, lower, upper, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("round")
    integer_ticks(ax.xaxis)
    ax.set_ylabel(dict(TABLE_COLUMNS).get(key, key))
    ax.grid(alpha=0.3)
    legend_outside(ax)
    save(fig, path)
    return [path.with_suffix(suffix) for suffix in FORMATS]


def parse_args(args: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="pl-federated compare",
        description="Run configs for several training seeds on one partition; print one table "
        "(mean ± std over seeds, worst client) and plot a metric against the round. Other "
        "arguments (e.g. --trainer.max_epochs=5) go to every run.",
    )
    parser.add_argument("--configs", nargs="+", type=Path, required=True, help="algorithm configs")
    parser.add_argument("--base", nargs="*", type=Path, default=[], help="configs shared by all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="output folder")
    parser.add_argument("--metric", default="pers_acc_mean", help="rounds.csv column to plot")
    parser.add_argument(
        "--columns",
        nargs="+",
        default=None,
        help="rounds.csv columns to tabulate (default: personal acc, worst client, global acc); "
        "e.g. global_mse pers_mse_mean for a task's own metrics",
    )
    return parser.parse_known_args(list(args))


def compare_main(
    args: Sequence[str], fit: Callable[[list[str]], Any]
) -> tuple[list[str], list[list[str]]]:
    """``pl-federated compare``; ``fit`` runs one ``pl-federated fit`` argument list.

    Raises:
        ConfigError: a config file that does not exist, two configs with one name, or a
            negative seed.
    """
    known, overrides = parse_args(args)
    for path in (*known.base, *known.configs):
        if not path.is_file():
            raise ConfigError(f"compare: config {str(path)!r} is not a file.")
    names = [p.stem for p in known.configs]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"compare: --configs need distinct file names (they name the runs): {names}."
        )
    if any(s < 0 for s in known.seeds):
        raise ConfigError(f"compare: --seeds must be >= 0, got {known.seeds}.")
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    for config in known.configs:
        for seed in dict.fromkeys(known.seeds):
            run = Run(config, seed, known.out, tuple(known.base), tuple(overrides))
            rounds = stored_result(run)
            print(f"compare: {run.name} seed {seed}: " + ("done, reused" if rounds else "running"))
            results.setdefault(run.name, {})[seed] = rounds or execute(run, fit)
    chosen = [(c, c) for c in known.columns] if known.columns else TABLE_COLUMNS
    columns, rows = comparison_table(results, chosen)
    known.out.mkdir(parents=True, exist_ok=True)
    with (known.out / "compare.csv").open("w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    table = markdown(columns, rows)
    (known.out / "compare.md").write_text(table + "\n")
    figures = plot(results, known.metric, known.out / "compare")
    print(
        f"\n{table}\n\nwrote {known.out / 'compare.csv'}, {known.out / 'compare.md'}, "
        + ", ".join(str(p) for p in figures)
    )
    return columns, rows

"""Print a fingerprint of the engine's numbers, to prove a refactor keeps them bit-identical.

For every shipped run (``configs/*.yaml``, and each ``configs/algorithms/`` part on the shared
federation; not sweeps or experiments): a short fit (``--rounds``,
default 3) and its final metrics plus SHA-256 checksums of the server state and of every
client's stored state; then the quickstart's full run (``make run``: its round and client
tables). Run it before and after a change and ``diff`` the outputs; ``round/seconds`` is left
out (wall time).

    python scripts/fingerprint.py > before.txt   # ... change ...
    python scripts/fingerprint.py > after.txt && diff before.txt after.txt
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tempfile
import warnings
from collections.abc import Mapping
from contextlib import redirect_stdout
from pathlib import Path

import torch
from common import shipped_configs  # this folder

QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--summary.print_tables=false",
    "--summary.images=false",
]


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the keys, dtypes, shapes and bytes of ``tensors`` in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _flat(state: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list, keyed by its path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(state, torch.Tensor):
        out[prefix] = state
    elif isinstance(state, Mapping):
        for k, v in state.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_flat(v, f"{prefix}/{i}"))
    return out


def fingerprint(name: str, configs: list[Path], rounds: int | None) -> list[str]:
    """The lines printed for one run (its ``--config`` files in order)."""
    from pl_federated.cli import cli_main

    out = tempfile.mkdtemp(prefix="pl_federated_fingerprint_")  # figures some callbacks write
    files = [arg for config in configs for arg in ("--config", str(config))]
    args = ["fit", *files, *QUIET, f"--trainer.default_root_dir={out}"]
    if rounds is not None:
        args.append(f"--trainer.max_epochs={rounds}")
    with redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = cli_main(args)
    fed = cli.model
    lines = [f"== {name} rounds={cli.trainer.max_epochs}"]
    lines.append(f"server_state {checksum(fed.server_state)}")
    lines.append(f"store {checksum(_flat(fed.store.state_dict()))}")
    lines.append(f"client_metrics {checksum(fed.client_metrics)}")
    for i, row in enumerate(fed.history):
        shown = {k: v for k, v in sorted(row.items()) if k != "round/seconds"}
        lines.append(f"round {i} " + " ".join(f"{k}={v!r}" for k, v in shown.items()))
    columns, rows = fed.client_table()
    lines.append("clients " + ",".join(columns))
    lines += ["  " + ",".join(repr(v) for v in row) for row in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per config")
    parser.add_argument("--only", default="", help="run only configs whose name contains this")
    parser.add_argument("--no-quickstart", action="store_true", help="skip the full quickstart")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = shipped_configs()
    for name, configs in runs.items():
        if args.only in name:
            print("\n".join(fingerprint(name, configs, args.rounds)), flush=True)
    if not args.no_quickstart and args.only in "quickstart":
        print("\n".join(fingerprint("quickstart", runs["quickstart"], None)), flush=True)


if __name__ == "__main__":
    main()

"""Every script and benchmark imports and answers ``--help`` (one subprocess for all)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(
    p for d in ("scripts", "benchmarks") for p in (ROOT / d).glob("*.py") if p.name != "common.py"
)

RUNNER = """
import runpy, sys
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    sys.path.insert(0, path.rsplit("/", 1)[0])
    try:
        runpy.run_path(path, run_name="__main__")
        failed.append(path + ": no SystemExit from --help")
    except SystemExit as exit:
        if exit.code not in (0, None):
            failed.append(f"{path}: exit {exit.code}")
    sys.path.pop(0)
print("FAILED", failed) if failed else print("OK")
"""


def test_every_script_and_benchmark_answers_help():
    assert len(ENTRY_POINTS) >= 10
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, *map(str, ENTRY_POINTS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "OK", out.stdout[-3000:]

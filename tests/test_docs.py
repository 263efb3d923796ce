"""Every Python block of docs/bring_your_own.md runs as written."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "bring_your_own.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def test_the_page_has_its_two_walkthroughs():
    assert len(BLOCKS) == 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_walkthrough_runs_and_prints_its_metric(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"{PAGE}:block{index}", "exec"), {"__name__": "docs_example"})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    numbers = [float(v) for v in re.findall(r"-?\d+\.\d+", last)]
    assert last.startswith("global/") and numbers and all(v == v for v in numbers)

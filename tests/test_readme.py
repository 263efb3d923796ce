import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    start = text.index("```python", text.index("## Python example")) + len("```python")
    code = text[start : text.index("```", start)]
    monkeypatch.chdir(tmp_path)  # the example's Trainer writes lightning_logs/ here
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    accuracy = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.8 < accuracy <= 1.0


def test_readme_client_datasets_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    start = text.index("```python", text.index("### Your own per-client Datasets"))
    start += len("```python")
    code = text[start : text.index("```", start)]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("['writer0', 'writer1']")
    assert float(last.split()[-1]) > 0.7  # 10 rounds of FedAvg on an IID split: 0.78


def test_every_relative_link_of_the_docs_is_a_file_inside_the_repository():
    root = Path(__file__).resolve().parents[1]
    pages = [
        root / "README.md",
        *sorted((root / "docs").glob("*.md")),
        root / "benchmarks/README.md",
    ]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(root), f"{page.name} links outside the repository: {target}"
            assert path.exists(), f"{page.name} links to a missing file: {target}"
            checked += 1
    assert checked >= 10

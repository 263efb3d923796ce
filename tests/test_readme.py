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

"""The README is the user's entry point: its commands must be the ones CI runs, its reference complete."""

from pathlib import Path

from pipeline.config import JobConfig

REPO = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    script = (REPO / ".ci" / "test").read_text().strip().splitlines()
    command = script[-1]
    assert command.endswith("python -m pytest -q") and command in readme
    assert "bash .ci/test" in (REPO / ".ci" / "run").read_text()


def test_readme_first_command_runs_digitize_on_samples_with_smoke():
    readme = (REPO / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    assert "pip install torch==2.13.0" in first
    assert first.endswith("python -m jobs.digitize --input samples --output sqlite:///out/digitize.db --model smoke")


def test_readme_documents_every_option():
    readme = (REPO / "README.md").read_text()
    for name in JobConfig.model_fields:
        if name != "job":
            assert f"`--{name.replace('_', '-')}`" in readme, name

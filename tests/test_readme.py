"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

from conftest import REPO


def _command_after(heading: str, text: str) -> str:
    after = text.split(heading, 1)[1]
    return next(line.strip() for line in after.splitlines() if line.startswith("    "))


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    command = _command_after("Run the tests:", readme)
    assert "pytest" in command and "torch==2.13.0" in command
    assert command in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_readme_sweep_command_installs_the_cpu_torch_first():
    command = _command_after("Run a sweep", (REPO / "README.md").read_text())
    assert command.index("torch==2.13.0") < command.index("pip install -e .")
    assert command.endswith("attnbench run suites/quick.yaml")

"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import importlib
import re
import tomllib

from conftest import REPO

from attnbench.contract.registry import load_registry
from attnbench.testing import small_cases


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


def _plugin_example() -> dict[str, str]:
    """The README's plugin files, by the name each block's first comment gives it."""
    text = (REPO / "README.md").read_text().split("## Writing a plugin", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", text, re.S)
    return {block.splitlines()[0].lstrip("# ").split(",")[0]: block for block in blocks}


def test_the_readme_plugin_example_passes_the_kit_as_written(tmp_path, monkeypatch):
    files = _plugin_example()
    assert set(files) == {"my_attention.py", "pyproject.toml", "test_my_attention.py"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    kit_test = importlib.import_module("test_my_attention")
    kit_test.test_mine()  # every case of the kit, grouped-query ones included
    count = re.search(r"correctness on (\d+) small cases", files["test_my_attention.py"]).group(1)
    assert int(count) == len(small_cases())


def test_the_readme_plugin_package_registers_its_implementation(tmp_path, monkeypatch):
    files = _plugin_example()
    project = tomllib.loads(files["pyproject.toml"])
    module = project["project"]["entry-points"]["attnbench"]["mine"]
    assert project["build-system"]["build-backend"] and module in project["tool"]["setuptools"]["py-modules"]
    (tmp_path / f"{module}.py").write_text(files["my_attention.py"])
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load_registry((module,), entry_points=False)
    assert registry.names() == ["mine"] and not registry.problems

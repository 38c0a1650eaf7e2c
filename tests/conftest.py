from __future__ import annotations

from pathlib import Path

import pytest

from attnbench.contract.registry import Registry, load_registry

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """tests/benchmarks run once each, untimed, unless asked for with --benchmark-only or
    --benchmark-enable (pytest-benchmark reads this after every other plugin has configured)."""
    option = config.option
    if hasattr(option, "benchmark_disable") and not (option.benchmark_only or option.benchmark_enable):
        option.benchmark_disable = True


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The built-in implementations only: tests must not depend on what else is installed."""
    registry = load_registry(entry_points=False)
    assert not registry.problems, registry.problems
    return registry


@pytest.fixture
def write_suite(tmp_path: Path):
    """Write YAML text to a suite file in a temporary folder and return its path."""

    def write(text: str, name: str = "suite.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write

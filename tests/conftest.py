from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from attnbench.contract.registry import Registry, load_registry
from attnbench.storage.ledger import KEY_STORE_VARIABLE

REPO = Path(__file__).resolve().parent.parent
_KEY_STORES: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """tests/benchmarks run once each, untimed, unless asked for with --benchmark-only or
    --benchmark-enable (pytest-benchmark reads this after every other plugin has configured).
    The runs' ledger keys go to a folder of this session, removed at its end, never to the
    user's key store (the commands the tests start inherit it)."""
    option = config.option
    if hasattr(option, "benchmark_disable") and not (option.benchmark_only or option.benchmark_enable):
        option.benchmark_disable = True
    _KEY_STORES.append(tempfile.mkdtemp(prefix="attnbench-test-keys-"))
    os.environ[KEY_STORE_VARIABLE] = _KEY_STORES[-1]


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _KEY_STORES:
        shutil.rmtree(folder, ignore_errors=True)


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

"""Loading plugins: built-ins and entry points through one hook; a broken plugin never stops the rest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

import attnbench
from attnbench.contract.registry import BUILTIN_PLUGINS, DISABLE_AUTOLOAD_VARIABLE, Registry, load_registry

GOOD_IMPLEMENTATION = """
import attnbench, torch

class Mine(attnbench.Implementation):
    name = "{name}"
    description = "sdpa under another name"
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n"

    def prepare(self, case, options):
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal)

@attnbench.hookimpl
def attnbench_register_implementations(registry):
    registry.add(Mine())
"""


def _plugin_module(directory: Path, name: str, source: str) -> str:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def test_builtins_register_through_the_hook(registry):
    assert registry.names()[:2] == ["naive", "flash"]
    assert registry.plugin_of("naive") == "naive"
    assert all(isinstance(impl, attnbench.Implementation) for impl in registry.implementations())


def test_broken_plugins_are_reported_by_name_and_the_rest_load(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = [
        _plugin_module(tmp_path, "fails_import", "raise ImportError('needs a library that is not here')"),
        _plugin_module(tmp_path, "duplicate_name", GOOD_IMPLEMENTATION.format(name="naive")),
        _plugin_module(
            tmp_path,
            "breaks_contract",
            """
            import attnbench

            class Bad(attnbench.Implementation):
                name = "Bad Name"
                exact = "yes"
                time_complexity = "quadratic"
                memory_complexity = "n"

            class NotAnImplementation:
                name = "other"

            @attnbench.hookimpl
            def attnbench_register_implementations(registry):
                registry.add(Bad())
                registry.add(NotAnImplementation())
            """,
        ),
        _plugin_module(
            tmp_path,
            "hook_raises",
            """
            import attnbench

            @attnbench.hookimpl
            def attnbench_register_implementations(registry):
                raise RuntimeError("boom")
            """,
        ),
        _plugin_module(tmp_path, "no_hook", "x = 1"),
        _plugin_module(tmp_path, "good", GOOD_IMPLEMENTATION.format(name="mine")),
    ]
    registry = load_registry((*BUILTIN_PLUGINS, *plugins), entry_points=False)

    assert registry.names()[:2] == ["naive", "flash"] and "mine" in registry
    assert registry.plugin_of("naive") == "naive" and registry.plugin_of("mine") == "good"
    problems = {problem.plugin: problem.reason for problem in registry.problems}
    assert set(problems) == {"fails_import", "duplicate_name", "breaks_contract", "hook_raises", "no_hook"}
    assert "failed to import: ImportError: needs a library that is not here" in problems["fails_import"]
    assert "'naive' is already registered by plugin 'naive'" in problems["duplicate_name"]
    contract = [p.reason for p in registry.problems if p.plugin == "breaks_contract"]
    assert "name='Bad Name'" in contract[0] and "exact='yes'" in contract[0]
    assert "time_complexity='quadratic'" in contract[0] and "prepare(case, options) is not implemented" in contract[0]
    assert "is not an attnbench.Implementation" in contract[1]
    assert "raised RuntimeError: boom" in problems["hook_raises"]
    assert "defines no attnbench_register_implementations hook" in problems["no_hook"]


def test_registry_add_is_usable_directly():
    registry = Registry()
    with registry.adding_for("tests"):
        registry.add(load_registry(entry_points=False).get("flash"))
    assert registry.names() == ["flash"] and registry.plugin_of("flash") == "tests"


@pytest.fixture
def third_party(tmp_path: Path) -> Path:
    """A third-party distribution installed the way pip would: a module and its dist-info."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "thirdparty_attention.py").write_text(GOOD_IMPLEMENTATION.format(name="thirdparty"))
    dist_info = site / "thirdparty_attention-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-attention\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[attnbench]\nthirdparty = thirdparty_attention\n")
    return site


def _attnbench(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    env.pop(DISABLE_AUTOLOAD_VARIABLE, None)
    return subprocess.run([sys.executable, "-m", "attnbench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_third_party_plugin_installed_through_an_entry_point_is_listed_and_measured(third_party, tmp_path):
    listing = _attnbench(["list"], third_party, tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "thirdparty  (exact; time n^2, memory n; plugin thirdparty)" in listing.stdout
    assert "naive" in listing.stdout and "flash" in listing.stdout

    suite = tmp_path / "third.yaml"
    suite.write_text(
        "implementations: [thirdparty, flash]\nsweep: {seq_len: [64, 128], heads: 2, causal: [false, true]}\n"
        "measure: {latency: {min_run_time_s: 0.01, max_run_time_s: 0.05}}\n"
    )
    run = _attnbench(["run", str(suite), "--output", str(tmp_path / "out")], third_party, tmp_path)
    assert run.returncode == 0, run.stderr
    rows = list((tmp_path / "out" / "third").glob("*/rows.jsonl"))[0].read_text().splitlines()
    assert len(rows) == 2 * 2 * 2
    assert all('"status": "ok"' in row for row in rows), rows


def test_autoload_can_be_turned_off_for_built_ins_only(third_party, tmp_path):
    env_off = {DISABLE_AUTOLOAD_VARIABLE: "1"}
    listing = subprocess.run(
        [sys.executable, "-m", "attnbench", "list"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(third_party), str(REPO)]), **env_off},
    )
    assert listing.returncode == 0 and "naive" in listing.stdout and "thirdparty" not in listing.stdout

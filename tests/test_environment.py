"""Every run records what it ran on, including the settings that move timings."""

from __future__ import annotations

import torch

from attnbench.storage.environment import capture_environment


def test_environment_records_versions_threads_and_timing_settings(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    environment = capture_environment()
    assert environment.packages["torch"].startswith(torch.__version__.split("+")[0])
    assert environment.torch_threads == torch.get_num_threads()
    assert environment.timing_variables["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OpenMP" in environment.torch_parallel or "threads" in environment.torch_parallel
    assert environment.cpu_model and environment.cpus_usable >= 1
    assert environment.git_commit is None or len(environment.git_commit) == 40
    assert set(environment.to_json()) >= {"python", "packages", "cpu_model", "timing_variables", "git_commit"}


def test_a_busy_machine_is_warned_about():
    import dataclasses

    from attnbench.storage.environment import capture_environment

    environment = capture_environment()
    assert environment.load_average is not None and len(environment.load_average) == 3
    busy = dataclasses.replace(environment, load_average=(3.5, 2.0, 1.0), cpus_usable=2)
    assert busy.busy_warning() == ("the machine is busy (load average 3.5 over the last minute on 2 usable CPUs): "
                                   "timings will be noisy")
    assert dataclasses.replace(environment, load_average=(0.4, 0.2, 0.1), cpus_usable=2).busy_warning() is None


def test_the_workers_allocator_policy_is_recorded_and_a_users_choice_kept(monkeypatch):
    from attnbench.measuring.allocator import worker_allocator_policy

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    assert "M_MMAP_THRESHOLD" in worker_allocator_policy() or "not glibc" in worker_allocator_policy()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert worker_allocator_policy() == "as set by MALLOC_MMAP_THRESHOLD_"

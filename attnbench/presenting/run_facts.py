"""The facts of a run a reader needs to trust its figures: where, when, with what, under which
load and settings; listed at the end of every report, and one line of them at its top."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from attnbench.contract.inputs import SOURCE_NOTE_PREFIX
from attnbench.measuring.figures import NOISY_RELATIVE_IQR
from attnbench.storage.results import Row
from attnbench.storage.run_folder import RunFolder
from attnbench.support.confinement import Protections


def identity_line(run: RunFolder) -> str:
    """Which run, on what, in one line: the report's first line under its title."""
    env = run.environment
    torch_version = env.get("packages", {}).get("torch", "?")
    devices = ", ".join(f"{k}: {v}" for k, v in env.get("devices", {}).items()) or "CPU only"
    cluster = f" · on a Ray cluster of {len(env['nodes'])} slot(s)" if env.get("nodes") else ""
    return (f"{env.get('started_at', 'unknown')} · {devices} · {env.get('cpu_model', 'unknown CPU')}, torch threads "
            f"{env.get('torch_threads', '?')} · torch {torch_version} · commit {str(env.get('git_commit') or '?')[:10]}"
            f"{' (uncommitted changes)' if env.get('git_dirty') else ''} · {len(run.rows)} points{cluster}"
            f"{' · its rows were EDITED after the run (see How this was measured)' if run.ledger.edited else ''}")


def run_facts(run: RunFolder) -> tuple[str, list[tuple[str, str]]]:
    """The report's title, and every fact of the run as (label, text)."""
    env = run.environment
    packages = env.get("packages", {})
    facts = [
        ("run", run.run_id),
        ("started", env.get("started_at", "unknown")),
        ("commit", f"{env.get('git_commit') or 'unknown'}{' (uncommitted changes)' if env.get('git_dirty') else ''}"),
        ("CPU", f"{env.get('cpu_model', 'unknown')}, {env.get('cpus_usable', '?')} usable cores, "
                f"torch threads {env.get('torch_threads', '?')}"),
        ("devices", ", ".join(f"{k}: {v}" for k, v in env.get("devices", {}).items()) or "CPU only"),
        ("where it ran", _placement_text(env, run.rows)),
        ("packages", ", ".join(f"{k} {v}" for k, v in packages.items())),
        ("timing settings", ", ".join(f"{k}={v}" for k, v in env.get("timing_variables", {}).items()) or "none set"),
        ("load at start", _load_text(env)),
        ("worker allocator", env.get("worker_allocator") or "not recorded"),
        ("memory cap", _memory_cap_text(run.rows)),
        ("latency rounds", _rounds_text(run.rows)),
        ("rows", f"{len(run.rows)} ({', '.join(f'{s} {n}' for s, n in Counter(r.status for r in run.rows).items())})"),
        ("ledger", run.ledger.summary()),
        ("flagged", ", ".join(f"{kind} {n}" for kind, n in Counter(f.kind for r in run.rows for f in r.flags).items())
         or "none"),
        ("load while timed", _timed_load_text(run.rows)),
        ("matmul and copy yardsticks", _yardstick_text(env)),
        ("correctness checks", "query rows (and key rows for dk, dv) drawn per case by the harness, never shown to a "
                               "plugin; the first call, the last timed call of every round (the timed calls "
                               "alternate between two input sets) and a call on fresh inputs new in every round "
                               "judged by the harness against float64 references it computed itself; inputs "
                               "compared after every call"),
        ("workers confined by", protections_text(env)),
        ("plugins", ", ".join(f"{name}: {info.get('distribution')} {info.get('version')}"
                              for name, info in env.get("plugins", {}).items()) or "not recorded"),
        ("input sources", _sources_text(env)),
        ("input captures", input_capture_text(run.rows)),
    ]
    return f"attnbench report — {run.suite_name} — {run.run_id}", facts


def protections_text(env: Mapping[str, Any]) -> str:
    """What kept the workers (plugin code) from the harness, the run folder and each other, as
    recorded with the run (attnbench.support.confinement)."""
    found = env.get("protections")
    if not found:
        return "not recorded (a run made before workers were confined)"
    protections = Protections(**{key: value for key, value in found.items() if key in Protections.__dataclass_fields__})
    in_force = [text for text, on in (
        (f"Landlock ABI {protections.landlock_abi}: writes only beneath the worker's scratch", protections.writes_confined),
        ("the ledger's keys and the harness's inputs unreadable", protections.reads_hidden),
        ("no ptrace or /proc memory of other processes", protections.ptrace_confined),
        ("no TCP", protections.tcp_denied), ("no signals beyond the worker", protections.signals_confined),
        ("no_new_privs", protections.no_new_privs), ("root's capabilities dropped", bool(protections.capabilities_dropped)),
        ("no new sockets (seccomp)", protections.sockets_denied)) if on]
    missing = protections.missing()
    return "; ".join(in_force) + (f". NOT in force here: {'; '.join(missing)}" if missing else "")


def _placement_text(env: Mapping[str, Any], rows: Sequence[Row]) -> str:
    """This machine, or each slot of the Ray cluster: its device, machine and how many points it ran."""
    nodes: Mapping[str, Mapping[str, Any]] = env.get("nodes") or {}
    if not nodes:
        return f"this machine ({env.get('hostname', '?')}), one point at a time"
    points = Counter(row.where.slot for row in rows if row.where is not None)
    devices = {row.where.slot: row.where.device_name for row in rows if row.where is not None}
    return "a Ray cluster, one case per slot: " + " · ".join(
        f"{name}: {devices.get(name, node.get('cpu_model', '?'))}, {node.get('cpus_usable', '?')} usable cores, "
        f"torch threads {node.get('torch_threads', '?')}, niceness {node.get('niceness', '?')}, "
        f"{points.get(name, 0)} points" for name, node in nodes.items())


def _memory_cap_text(rows: Sequence[Row]) -> str:
    """Each cap the points ran under and how it was held (rows before schema 10 did not say)."""
    caps = Counter(row.where.memory_cap for row in rows if row.where is not None and row.where.memory_cap)
    return " · ".join(f"{cap} ({count} points)" for cap, count in caps.items()) or "not recorded"


def _rounds_text(rows: Sequence[Row]) -> str:
    """How the timed points were measured: rounds per point, and how many had rounds that disagree."""
    timed = [row.latency for row in rows if row.latency is not None]
    if not timed:
        return "no latency measured"
    counts = sorted({len(latency.round_sizes) for latency in timed})
    spread = sum(latency.round_spread > NOISY_RELATIVE_IQR for latency in timed)
    return (f"{'/'.join(map(str, counts))} per point, implementations taking turns; headline = fastest round's "
            f"median; {spread} of {len(timed)} points with rounds more than {NOISY_RELATIVE_IQR:.0%} apart")


def _timed_load_text(rows: Sequence[Row]) -> str:
    loads = [row.latency.load for row in rows if row.latency is not None and row.latency.load is not None]
    if not loads:
        return "not recorded"
    return (f"other processes kept {statistics.median(loads):.2f} CPUs busy (median over points), at most "
            f"{max(loads):.2f}")


def _yardstick_text(env: Mapping[str, object]) -> str:
    samples = env.get("matmul_flops_samples") or {}
    best = env.get("matmul_flops") or {}
    copy = env.get("copy_bytes_per_s") or {}
    if not best:
        return "not measured"
    return ", ".join(f"{key}: best {value / 1e9:.1f} GFLOP/s"
                     + (f", copy {copy[key] / 1e9:.1f} GB/s" if key in copy else "")
                     + f" of {len(samples.get(key, [])) or 1} measurement(s)" for key, value in best.items())


def _load_text(env: Mapping[str, object]) -> str:
    load = env.get("load_average")
    text = f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)" if load else "not recorded"
    frequency = env.get("cpu_frequency")
    return f"{text}; CPU {frequency}" if frequency else text


def _sources_text(env: Mapping[str, object]) -> str:
    sources = env.get("input_sources") or {}
    return " · ".join(
        f"{name}: {info.get('description', '')}"
        + (f" ({', '.join(f'{key}={value}' for key, value in info['parameters'].items())})"
           if info.get("parameters") else "")
        for name, info in sources.items()) or "not recorded"


def input_capture_text(rows: Sequence[Row]) -> str:
    """What the input sources did: each capture (with its cost), and how many points read their
    inputs from the cache."""
    notes = [note.removeprefix(SOURCE_NOTE_PREFIX) for row in rows for note in row.notes
             if note.startswith(SOURCE_NOTE_PREFIX)]
    captures = list(dict.fromkeys(note for note in notes if "captured" in note))
    reads = sum(1 for row in rows if any(note.startswith(SOURCE_NOTE_PREFIX) and "read from the cache" in note
                                         for note in row.notes))
    if not captures and not reads:
        return "none: every input was drawn"
    parts = [*captures, f"{reads} point(s) read their inputs from the cache"]
    return "; ".join(parts)

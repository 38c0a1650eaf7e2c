"""attnbench on a GPU, checked end to end: run by benchmarks/gpu_check.sh after it installs attnbench.

    python -m benchmarks.gpu_check [OUTDIR] [--device cuda|cuda:N|cpu]

1. a short sweep of every implementation at LLM-like shapes (H=16, D=128, grouped-query too,
   N 1K to 32K, bfloat16 forward and training, float16 at 8K), in the harness's workers, with
   its reports;
2. a point whose N×N scores pass the memory cap ends as ``oom`` and the next point still runs;
3. the plugin kit, in this process, on every registered implementation in float16, bfloat16
   and float32, forward and training, causal with grouped-query heads and not: ``ok`` or
   ``unsupported`` with a reason, nothing else;
4. probes of the measuring code (benchmarks/gpu_probes.py): naive's peak against its N×N
   buffers, the device timer against a wall clock, the SDPA backends' ops and kernels from the
   profiler, an L2-flushed time against a warm one;
5. NVML samples in the rows, the GPU and its yardsticks from environment.json;

then a one-screen verdict, also written to OUTDIR/verdict.txt. With ``--device cpu`` the same
steps run at CPU-sized shapes (the SDPA CUDA backends then report why they cannot run). Exit
status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from attnbench.analysis.decode import decode_points
from attnbench.contract.case import DTYPES, Case, device_unavailable_reason
from attnbench.contract.errors import NotSupported
from attnbench.contract.implementation import Implementation, effective_options, plugin_reasons
from attnbench.contract.registry import Registry, load_registry
from attnbench.execution.runner import run_suite
from attnbench.measuring.flops import attention_flops, matmul_key
from attnbench.measuring.in_process import measure_case
from attnbench.presenting.progress import TerminalProgress
from attnbench.presenting.report import write_reports
from attnbench.settings.loader import load_suite
from attnbench.storage.results import Row
from attnbench.storage.run_folder import RunFolder, load_run
from attnbench.support.text import one_line
from attnbench.support.units import format_bytes, format_seconds
from attnbench.testing import CORRECTNESS_ONLY, small_case
from benchmarks import gpu_probes
from benchmarks.gpu_probes import Check

T = TypeVar("T")
FAILED = ("error", "crashed", "incorrect", "timeout")  # a sweep row with one of these fails the check
HEADLINE = ("flash", "sdpa_cudnn", "sdpa_mem_efficient", "flex", "xformers")
KIT_DTYPES = ("float16", "bfloat16", "float32")
MODES = ("forward", "forward_backward")


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str

    def case(self, device: str, **overrides: object) -> Case:
        fields = dict(batch=self.batch, heads=self.heads, seq_len=self.seq_len, head_dim=self.head_dim,
                      dtype=DTYPES[self.dtype], device=device)
        return small_case(**{**fields, **overrides})


@dataclass(frozen=True)
class Plan:
    """The check's shapes on one kind of device."""

    sweeps: tuple[str, ...]  # suite YAML texts, with {device}
    oom: str  # suite YAML: naive then flash at an N whose scores pass the cap
    kit: Shape
    peak: Shape  # naive's, big enough that the N×N buffers dwarf the rest
    long_call: Shape
    kernels: Shape
    headline_seq_lens: tuple[int, ...]
    headline_kv_heads: int
    headline_dtype: str = "bfloat16"
    kit_implementations: tuple[str, ...] | None = None  # None: every registered one


LATENCY = "latency: {min_run_time_s: 0.1, max_run_time_s: 1, min_samples: 5, rounds: 1}"
CPU_LATENCY = "latency: {min_run_time_s: 0.05, max_run_time_s: 0.3, min_samples: 5, rounds: 1}"
GPU = Plan(
    sweeps=(f"""name: gpu_check
description: LLM-like attention layers in bfloat16, every implementation
implementations: all
sweep: {{seq_len: [1024, 4096, 8192, 32768], heads: 16, kv_heads: [16, 4], head_dim: 128, dtype: bfloat16,
        causal: true, mode: [forward, forward_backward], device: {{device}}}}
measure: {{correctness: {{rows: 64}}, {LATENCY}, memory: true}}
limits: {{timeout_s: 180, budget_s: 150}}  # per implementation: keeps the check inside its minutes
""", f"""name: gpu_check_fp16
description: the same layer in float16 at N=8192
implementations: all
sweep: {{seq_len: 8192, heads: 16, kv_heads: 4, head_dim: 128, dtype: float16, causal: true,
        mode: [forward, forward_backward], device: {{device}}}}
measure: {{correctness: {{rows: 64}}, {LATENCY}, memory: true}}
limits: {{timeout_s: 180, budget_s: 60}}
""", f"""name: gpu_check_decode
description: decode steps onto a KV cache (or a state) of 4K-64K, Llama-like grouped-query heads
implementations: all
sweep: {{mode: decode, seq_len: [4096, 16384, 65536], heads: 32, kv_heads: 8, head_dim: 128, dtype: bfloat16,
        causal: true, device: {{device}}}}
measure: {{correctness: {{rows: 64}}, {LATENCY}, memory: true}}
limits: {{timeout_s: 180, budget_s: 60}}
"""),
    oom="""name: gpu_check_oom
implementations: [naive, flash]
sweep: {seq_len: 16384, heads: 16, head_dim: 128, dtype: bfloat16, device: {device}}
measure: {correctness: {rows: 16}, latency: {min_run_time_s: 0.05, max_run_time_s: 0.2}}
limits: {memory_gb: 4, timeout_s: 120}  # naive's scores are 8 GiB
""",
    kit=Shape(2, 8, 256, 128, "float32"),
    peak=Shape(1, 16, 8192, 128, "bfloat16"),
    long_call=Shape(4, 16, 16384, 128, "bfloat16"),
    kernels=Shape(1, 16, 4096, 128, "bfloat16"),
    headline_seq_lens=(8192, 32768),
    headline_kv_heads=16,
)
CPU = Plan(
    sweeps=(f"""name: gpu_check_cpu
description: the GPU check's sweep at CPU sizes, in bfloat16
implementations: all
sweep: {{seq_len: [256, 512, 1024], heads: 4, kv_heads: [4, 2], head_dim: 64, dtype: bfloat16, causal: true,
        mode: [forward, forward_backward], device: {{device}}}}
measure: {{correctness: {{rows: 64}}, {CPU_LATENCY}, threads: 1, memory: true}}
limits: {{timeout_s: 120, budget_s: 120}}
""", f"""name: gpu_check_cpu_fp16
description: the same in float16 at N=512, forward
implementations: all
sweep: {{seq_len: 512, heads: 4, kv_heads: 2, head_dim: 64, dtype: float16, causal: true, mode: forward,
        device: {{device}}}}
measure: {{correctness: {{rows: 64}}, {CPU_LATENCY}, threads: 1, memory: true}}
limits: {{timeout_s: 120, budget_s: 60}}
""", f"""name: gpu_check_cpu_decode
description: decode steps at CPU sizes
implementations: all
sweep: {{mode: decode, seq_len: [512, 2048], heads: 4, kv_heads: 2, head_dim: 64, dtype: bfloat16, causal: true,
        device: {{device}}}}
measure: {{correctness: {{rows: 64}}, {CPU_LATENCY}, threads: 1, memory: true}}
limits: {{timeout_s: 120, budget_s: 60}}
"""),
    oom="""name: gpu_check_oom
implementations: [naive, flash]
sweep: {seq_len: 4096, heads: 4, head_dim: 64, dtype: float32, device: {device}}
measure: {correctness: {rows: 16}, latency: {min_run_time_s: 0.05, max_run_time_s: 0.2}, threads: 1}
limits: {memory_gb: 0.25, timeout_s: 120}  # naive's scores are 256 MiB
""",
    kit=Shape(1, 4, 128, 32, "float32"),
    peak=Shape(1, 4, 1024, 64, "float32"),
    long_call=Shape(1, 4, 2048, 64, "float32"),
    kernels=Shape(1, 4, 512, 64, "float32"),
    headline_seq_lens=(512, 1024),
    headline_kv_heads=4,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = args.device
    problem = _unavailable(device)
    if problem:
        print(f"gpu_check: error: --device: {device} is not available here ({problem}; use --device cpu to check "
              "the logic without a GPU)", file=sys.stderr)
        return 2
    plan = CPU if device == "cpu" else GPU
    outdir = args.outdir or _default_outdir(device)
    verdict = run_check(plan, device, outdir, load_registry())
    print(verdict.text)
    return 0 if verdict.passed else 1


def _unavailable(device: str) -> str | None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        return "the check runs on cpu, cuda or cuda:N"
    return device_unavailable_reason(device)


@dataclass(frozen=True)
class Verdict:
    text: str
    passed: bool


def run_check(plan: Plan, device: str, outdir: Path, registry: Registry) -> Verdict:
    """Every step of the check; each check's failure is reported, never raised."""
    started = time.monotonic()
    outdir.mkdir(parents=True, exist_ok=True)
    checks: list[Check] = []
    sweep_runs = []
    for suite in plan.sweeps:
        run, check = _step(f"sweep {_suite_name(suite)}", lambda suite=suite: _sweep(suite, device, outdir, registry))
        sweep_runs.append(run)
        checks.append(check)
    checks.append(_oom_check(_step("oom suite", lambda: _sweep(plan.oom, device, outdir, registry))[0]))
    kit_names = plan.kit_implementations or tuple(registry.names())
    checks.append(_step("plugin kit", lambda: _kit(registry, kit_names, plan.kit, device, outdir / "kit.tsv")))
    naive, flash = registry.get("naive"), registry.get("flash")
    probes = [
        ("naive peak", lambda: gpu_probes.naive_peak(naive, plan.peak.case(device))),
        ("timer vs clock", lambda: gpu_probes.timer_against_clock(flash, plan.long_call.case(device))),
        *((f"{name} kernel", lambda name=name: gpu_probes.sdpa_kernels(registry.get(name), plan.kernels.case(device)))
          for name in gpu_probes.SDPA_OPS if name in registry),
        ("L2 flush", lambda: gpu_probes.cold_against_warm(flash, plan.kernels.case(device, seq_len=1024))),
    ]
    for name, probe in probes:
        checks.append(_step(name, lambda name=name, probe=probe: _contained(name, probe)))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what a probe cached is not the next one's to lose
    checks.append(_nvml_check(sweep_runs, device))
    lines = _verdict_lines(checks, sweep_runs, plan, device, outdir, time.monotonic() - started)
    text = "\n".join(lines)
    (outdir / "verdict.txt").write_text(text + "\n")
    return Verdict(text, all(check.verdict in ("PASS", "INFO", "n/a") for check in checks))


def _step(name: str, work: Callable[[], T]) -> T:
    started = time.monotonic()
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    result = work()
    print(f"gpu_check: {name} done in {format_seconds(time.monotonic() - started)}", file=sys.stderr, flush=True)
    return result


def _suite_name(suite_text: str) -> str:
    return re.search(r"name: (\S+)", suite_text)[1]


def _sweep(suite_text: str, device: str, outdir: Path, registry: Registry) -> tuple[RunFolder, Check]:
    suite_path = outdir / "suites" / f"{_suite_name(suite_text)}.yaml"
    suite_path.parent.mkdir(exist_ok=True)
    suite_path.write_text(suite_text.replace("{device}", device))
    suite = load_suite(suite_path, registry)
    progress = TerminalProgress()
    try:
        result = run_suite(suite, registry, output=outdir / "runs", progress=progress)
    finally:
        progress.close()
    run = load_run(result.run_dir)
    write_reports(run)
    failed = [row for row in run.rows if row.status in FAILED]
    tally = ", ".join(f"{count} {status}" for status, count in Counter(row.status for row in run.rows).most_common())
    detail = f"{suite.name}: {len(run.rows)} points: {tally}; report: {result.run_dir / 'report.html'}"
    if failed:
        detail += "; failed: " + "; ".join(f"{row.implementation} {row.case.describe()}: {row.status} "
                                           f"({one_line(row.reasons[0] if row.reasons else '', 120)})"
                                           for row in failed[:5])
    return run, Check("sweep", "FAIL" if failed else "PASS", detail)


def _oom_check(run: RunFolder) -> Check:
    rows = {row.implementation: row for row in run.rows}
    naive, flash = rows.get("naive"), rows.get("flash")
    if naive is None or flash is None:
        return Check("oom", "FAIL", "the oom suite left no naive or flash row")
    verdict = "PASS" if naive.status == "oom" and flash.status == "ok" else "FAIL"
    why = one_line(naive.reasons[0] if naive.reasons else "", 90)
    return Check("oom", verdict,
                 f"naive at {naive.case.describe()}: {naive.status} ({why}); flash next: {flash.status}")


def _kit(registry: Registry, names: Sequence[str], shape: Shape, device: str, table: Path) -> Check:
    """Each implementation × dtype × mode × (causal with grouped-query heads, or neither), in
    this process, correctness only."""
    lines, outcomes = ["implementation\tcase\tstatus\treason"], Counter()
    failures = []
    for name, dtype, mode, causal in itertools.product(names, KIT_DTYPES, MODES, (True, False)):
        implementation = registry.get(name)
        case = dataclasses.replace(shape, dtype=dtype).case(device, mode=mode, causal=causal,
                                                            kv_heads=shape.heads // 2 if causal else shape.heads)
        status, reason = _kit_case(implementation, case)
        outcomes[status] += 1
        lines.append(f"{name}\t{case.describe()}\t{status}\t{reason}")
        if status not in ("ok", "unsupported"):
            failures.append(f"{name} {case.describe()}: {status} ({one_line(reason, 100)})")
    table.write_text("\n".join(lines) + "\n")
    tally = ", ".join(f"{count} {status}" for status, count in outcomes.most_common())
    detail = f"{len(names)} implementations × 3 dtypes × 2 modes × 2 masks: {tally}; see {table}"
    if failures:
        detail += "; " + "; ".join(failures[:5])
    return Check("plugin kit", "FAIL" if failures else "PASS", detail)


def _kit_case(implementation: Implementation, case: Case) -> tuple[str, str]:
    try:
        reasons = plugin_reasons(implementation, case)
        if reasons:
            return "unsupported", "; ".join(reasons)
        # A fresh compiler state per case: torch.compile's recompile limit would otherwise turn a
        # compiled implementation into an eager one after a few shapes in this one process.
        torch._dynamo.reset()
        measurement = measure_case(implementation, case, effective_options(implementation, {}), CORRECTNESS_ONLY)
    except NotSupported as refusal:
        return "unsupported", str(refusal)
    except Exception as error:  # the check reports it; the next case still runs
        return "error", f"{type(error).__name__}: {error}"
    return measurement.status, "; ".join(measurement.reasons)


def _contained(name: str, probe: Callable[[], Check]) -> Check:
    try:
        return probe()
    except Exception as error:  # one broken probe must not hide the others' verdicts
        return Check(name, "FAIL", f"{type(error).__name__}: {one_line(str(error), 200)}")


def _nvml_check(runs: list[RunFolder], device: str) -> Check:
    timed = [row for run in runs for row in run.rows if row.latency is not None]
    if not device.startswith("cuda"):
        return Check("NVML", "n/a", "no NVML on the CPU")
    sampled = [row for row in timed if row.latency.gpu_samples]
    if not sampled:
        return Check("NVML", "FAIL", "no point was sampled (is nvidia-ml-py installed? `import pynvml`)")
    throttled = [row for row in sampled if row.latency.throttling]
    clocks = [sample.sm_clock_mhz for row in sampled for sample in row.latency.gpu_samples if sample.sm_clock_mhz]
    return Check("NVML", "PASS", f"{len(sampled)} of {len(timed)} timed points sampled; SM clock {min(clocks)}–"
                                 f"{max(clocks)} MHz; {len(throttled)} throttled")


def _verdict_lines(checks: list[Check], runs: list[RunFolder], plan: Plan, device: str, outdir: Path,
                   elapsed_s: float) -> list[str]:
    environment = runs[0].environment if runs else {}
    passed = all(check.verdict in ("PASS", "INFO", "n/a") for check in checks)
    lines = [f"attnbench GPU check on {_device_line(environment, device)}; torch {torch.__version__}; "
             f"{format_seconds(elapsed_s)}", ""]
    lines += [f"{check.verdict:<5} {check.name:<26} {check.detail}" for check in checks]
    lines += ["", *_yardstick_lines(environment), "", *_headline(runs, plan), "", *_decode_headline(runs), "",
              f"VERDICT: {'PASS' if passed else 'FAIL'}; rows, reports and this verdict under {outdir}"]
    return lines


def _device_line(environment: dict, device: str) -> str:
    gpu = environment.get("gpus", {}).get(device if ":" in device else f"{device}:0")
    if not gpu:
        return f"{device} ({environment.get('cpu_model', 'unknown CPU')})"
    return (f"{gpu['name']} ({device}, uuid {gpu.get('uuid', '?')}, driver {gpu.get('driver', '?')}, "
            f"CUDA {gpu.get('cuda')}, cuDNN {gpu.get('cudnn')})")


def _yardstick_lines(environment: dict) -> list[str]:
    matmul, copy = environment.get("matmul_flops", {}), environment.get("copy_bytes_per_s", {})
    return [f"yardstick {key}: matmul {flops / 1e12:.3g} TFLOP/s, copy {copy.get(key, 0) / 1e9:.4g} GB/s"
            for key, flops in matmul.items()]


def _headline(runs: list[RunFolder], plan: Plan) -> list[str]:
    """Latency and TFLOP/s (against the matmul yardstick) of the exact GPU implementations at the
    headline lengths and dtype, without grouped-query heads; prepare is set-up and compilation
    (flex's compile time), outside the latency; flags (throttled, ...) follow the status."""
    lines = ["implementation      N      mode              latency    TFLOP/s  of matmul   prepare  status"]
    for run in runs:
        shown = [row for row in run.rows
                 if row.implementation in HEADLINE and row.case.seq_len in plan.headline_seq_lens
                 and row.case.dtype_name == plan.headline_dtype and row.case.kv_heads == plan.headline_kv_heads]
        for row in sorted(shown, key=lambda r: (HEADLINE.index(r.implementation), r.case.mode, r.case.seq_len)):
            peak = run.matmul_flops.get(matmul_key(row.case.device, row.case.dtype_name))
            lines.append(_headline_line(row, peak))
    return lines


def _decode_headline(runs: list[RunFolder]) -> list[str]:
    """Each decode step that ran: its latency, the state it keeps and its achieved bandwidth as a
    fraction of the copy yardstick (the headline figure of exact decode, which is memory-bound)."""
    lines = ["decode step         N      dtype       per step  state kept     GB/s   of copy  status"]
    for run in runs:
        for point in decode_points(run.rows, run.copy_bytes_per_s):
            row = point.row
            state = format_bytes(point.state_bytes) if point.state_bytes is not None else "?"
            step = format_seconds(point.step_s) if point.step_s is not None else "no result"
            rate = f"{point.bytes_per_s / 1e9:.4g}" if point.bytes_per_s else "?"
            share = f"{point.fraction_of_copy:.0%}" if point.fraction_of_copy else "?"
            lines.append(f"{row.implementation:<18} {row.case.seq_len:>6}  {row.case.dtype_name:<10} {step:>9} "
                         f"{state:>11} {rate:>8} {share:>9}  {row.status}")
    return lines if len(lines) > 1 else []


def _headline_line(row: Row, peak: float | None) -> str:
    case, latency = row.case, row.latency
    start = f"{row.implementation:<18} {case.seq_len:>6}  {case.mode:<16}"
    if row.status != "ok" or latency is None:
        why = one_line(row.reasons[0] if row.reasons else "", 60)
        return f"{start} {'':>9} {'':>9} {'':>10} {'':>9}  {row.status}: {why}"
    flops = attention_flops(case) / latency.median_s
    share = f"{flops / peak:.0%}" if peak else "?"
    prepare = format_seconds(latency.prepare_s) if latency.prepare_s is not None else "?"
    flags = "".join(f", {flag.kind}" for flag in row.flags)
    return f"{start} {format_seconds(latency.median_s):>9} {flops / 1e12:>9.3g} {share:>10} {prepare:>9}  ok{flags}"


def _default_outdir(device: str) -> Path:
    if device == "cpu":
        return Path(tempfile.gettempdir()) / "attnbench-gpu-check-cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return Path("results") / "gpu" / re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check.sh", description="Validate attnbench on a CUDA GPU.")
    parser.add_argument("outdir", nargs="?", type=Path,
                        help="where rows, reports and the verdict go (default: results/gpu/<device name>/, "
                             "or a temporary folder with --device cpu)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the logic only")
    return parser


if __name__ == "__main__":
    sys.exit(main())

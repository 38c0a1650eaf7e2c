"""benchmarks/gpu_check.py's logic on the CPU, at tiny shapes: every step runs and says PASS or
n/a; and each check fails when what it checks is false (an implementation passed off as another,
a wrong result in the kit, a point that did not end as oom)."""

from __future__ import annotations

import dataclasses

import pytest
import toys

from attnbench.contract.registry import Registry
from attnbench.storage.run_folder import load_run
from benchmarks import gpu_check, gpu_probes
from benchmarks.gpu_check import Plan, Shape

TINY = Plan(
    sweeps=("""name: tiny_check
implementations: [naive, flash, sdpa_cudnn]
sweep: {seq_len: [128, 256], heads: 2, kv_heads: [2, 1], head_dim: 32, dtype: float32, causal: true,
        device: {device}}
measure: {correctness: {rows: 16}, latency: {min_run_time_s: 0.01, max_run_time_s: 0.05, rounds: 1}, threads: 1}
""",),
    oom="""name: tiny_oom
implementations: [naive, flash]
sweep: {seq_len: 2048, heads: 4, head_dim: 32, dtype: float32, device: {device}}
measure: {correctness: {rows: 8}, latency: {min_run_time_s: 0.01, max_run_time_s: 0.05}, threads: 1}
limits: {memory_gb: 0.05}
""",
    kit=Shape(1, 2, 64, 16, "float32"),
    peak=Shape(1, 2, 512, 16, "float32"),
    long_call=Shape(1, 2, 512, 32, "float32"),
    kernels=Shape(1, 2, 128, 32, "float32"),
    headline_seq_lens=(256,),
    headline_kv_heads=2,
    headline_dtype="float32",
    kit_implementations=("naive", "flash", "sdpa_cudnn"),
)


@pytest.fixture(scope="module")
def checked(tmp_path_factory, registry):
    """The whole check, run once: (its output folder, its verdict)."""
    outdir = tmp_path_factory.mktemp("gpu_check")
    return outdir, gpu_check.run_check(TINY, "cpu", outdir, registry)


def test_the_check_runs_every_step_on_the_cpu(checked):
    tmp_path, verdict = checked
    lines = verdict.text.splitlines()
    assert verdict.passed, verdict.text
    verdicts = {line[6:33].strip(): line[:5].strip() for line in lines if line[:5].strip() in ("PASS", "FAIL", "n/a")}
    assert verdicts == {"sweep": "PASS", "oom": "PASS", "plugin kit": "PASS", "naive peak": "PASS",
                        "timer vs clock": "PASS", "flash kernel": "PASS", "sdpa_mem_efficient kernel": "n/a",
                        "sdpa_cudnn kernel": "n/a", "L2 flush": "n/a", "NVML": "n/a"}
    assert "tiny_check: 12 points: 8 ok, 4 unsupported" in verdict.text  # sdpa_cudnn is CUDA-only
    assert "naive at B=1 H=4 N=2048 D=32 float32 cpu forward: oom" in verdict.text
    assert "3 implementations × 3 dtypes × 2 modes × 2 masks: " in verdict.text
    assert lines[-1].startswith("VERDICT: PASS")
    assert any(line.startswith("flash") and " 256 " in line and "  ok" in line for line in lines)  # headline
    assert (tmp_path / "verdict.txt").read_text() == verdict.text + "\n"
    assert len((tmp_path / "kit.tsv").read_text().splitlines()) == 1 + 3 * 3 * 2 * 2
    assert list((tmp_path / "runs" / "tiny_check").glob("*/report.html"))


def test_a_wrong_result_fails_the_kit(tmp_path):
    registry = Registry()
    registry.add(toys.Toy("wrong", toys.returns_query))
    check = gpu_check._kit(registry, ["wrong"], TINY.kit, "cpu", tmp_path / "kit.tsv")
    assert check.verdict == "FAIL" and "wrong B=1 H=2" in check.detail and ": incorrect (" in check.detail


def test_an_implementation_passed_off_as_flash_fails_the_kernel_check(registry):
    naive = registry.get("naive")
    impostor = type("Impostor", (type(naive),), {"name": "flash"})()
    case = TINY.kernels.case("cpu")
    assert gpu_probes.sdpa_kernels(registry.get("flash"), case).verdict == "PASS"
    check = gpu_probes.sdpa_kernels(impostor, case)
    assert check.verdict == "FAIL" and "did not run" in check.detail


def test_the_peak_check_fails_without_the_n_by_n_buffers(registry):
    """flash keeps no N×N scores: held against naive's arithmetic, its peak is far below it."""
    assert gpu_probes.naive_peak(registry.get("naive"), TINY.peak.case("cpu")).verdict == "PASS"
    check = gpu_probes.naive_peak(registry.get("flash"), TINY.peak.case("cpu"))
    assert check.verdict == "FAIL"


def test_the_oom_check_wants_naive_oom_and_flash_ok(checked):
    (folder,) = (checked[0] / "runs" / "tiny_oom").iterdir()
    run = load_run(folder)
    assert gpu_check._oom_check(run).verdict == "PASS"
    ok_naive = dataclasses.replace(run, rows=tuple(dataclasses.replace(row, status="ok") for row in run.rows))
    assert gpu_check._oom_check(ok_naive).verdict == "FAIL"


@pytest.mark.parametrize("device", ["cuda", "tpu"])
def test_a_device_this_machine_lacks_is_one_line_and_exit_2(device, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--device", device]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"gpu_check: error: --device: {device} is not available here")


@pytest.mark.parametrize(("name", "kernels", "verdict"), [
    ("flash", {"void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>"}, "PASS"),
    ("flash", {"void at::native::elementwise_kernel<128, 4>"}, "FAIL"),  # the op ran, but no flash kernel
    ("sdpa_mem_efficient", {"fmha_cutlassF_bf16_aligned_64x128_rf_sm80"}, "PASS"),
    ("sdpa_cudnn", {"sm90_xmma_fprop_generated"}, "PASS"),  # cuDNN's kernels are not named after it
    ("sdpa_cudnn", set(), "FAIL"),
])
def test_on_a_gpu_the_backends_kernels_are_named(monkeypatch, registry, name, kernels, verdict):
    """The GPU branch of the kernel check, with the profiler's answer faked (no GPU here)."""
    op = gpu_probes.SDPA_OPS[name][0]
    monkeypatch.setattr(gpu_probes, "plugin_reasons", lambda implementation, case: [])
    monkeypatch.setattr(gpu_probes, "_call", lambda implementation, case: None)
    monkeypatch.setattr(gpu_probes, "_profiled_names", lambda call, device: ({op}, kernels))
    check = gpu_probes.sdpa_kernels(registry.get(name), TINY.kernels.case("cuda"))
    assert check.verdict == verdict, check.detail

"""Issue 17: chunked prefill (q_len < seq_len, bottom-right causal) and decode steps against a
KV cache or a recurrent state: the shapes, the references, the state figure, and the plugins
that try to slip past the checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import toys

import attnbench
from attnbench.analysis.scaling import scaling_fits
from attnbench.contract.errors import UserError
from attnbench.contract.implementation import plugin_reasons
from attnbench.contract.registry import Registry
from attnbench.execution.runner import run_suite
from attnbench.measuring.inputs import make_inputs
from attnbench.measuring.in_process import measure_case
from attnbench.measuring.reference import softmax_attention
from attnbench.presenting.report import write_reports
from attnbench.settings.grid import expand_all
from attnbench.settings.loader import load_suite
from attnbench.settings.suite import CorrectnessSettings, LatencySettings, Measure
from attnbench.storage.run_folder import load_run
from attnbench.testing import check_implementation, small_case, small_cases

CHECKED = Measure(correctness=CorrectnessSettings(rows=64), latency=None, memory=True)
TIMED = Measure(correctness=CorrectnessSettings(rows=64),
                latency=LatencySettings(min_run_time_s=0.01, max_run_time_s=0.05, rounds=1), memory=False)
INFERENCE = [case for case in small_cases() if case.chunked or case.decode]


def test_a_decode_step_defaults_to_one_new_token_onto_the_cache():
    step = small_case(mode="decode", seq_len=100)
    assert (step.q_len, step.query_len, step.key_len) == (1, 1, 101)
    assert "q=1" in step.describe() and "decode" in step.describe()
    assert small_case(q_len=128).q_len is None  # as many queries as keys: the square pass, one spelling
    chunk = small_case(q_len=32)
    assert chunk.chunked and (chunk.query_len, chunk.key_len) == (32, 128)


def test_the_grid_leaves_out_more_queries_than_keys_and_a_sweep_of_only_those_is_refused(registry, write_suite):
    suite = load_suite(write_suite("sweep: {seq_len: [64, 256], q_len: [128], mode: [forward, decode]}\n"), registry)
    shapes = [(case.mode, case.seq_len, case.q_len) for case in expand_all(suite.sweeps)]
    assert shapes == [("forward", 256, 128), ("decode", 64, 128), ("decode", 256, 128)]
    with pytest.raises(UserError, match=r"sweep.q_len: larger than every seq_len"):
        load_suite(write_suite("sweep: {seq_len: [64], q_len: [128]}\n"), registry)


def test_the_reference_of_a_chunk_is_the_last_rows_of_the_square_pass():
    case = small_case(causal=True, kv_heads=2)
    inputs = make_inputs(case, seed=3)
    q, k, v = (t.double() for t in (inputs.q, inputs.k, inputs.v))
    rows = torch.arange(96, 128)
    square = softmax_attention(q, k, v, rows, causal=True).out
    chunk = softmax_attention(q[:, :, 96:], k, v, rows - 96, causal=True).out
    torch.testing.assert_close(chunk, square, rtol=0, atol=1e-12)


def test_a_chunk_and_a_decode_step_draw_the_square_inputs_last_positions():
    square = make_inputs(small_case(seq_len=129), seed=5)
    step = make_inputs(small_case(seq_len=128, mode="decode"), seed=5)
    chunk = make_inputs(small_case(seq_len=129, q_len=32), seed=5)
    assert torch.equal(step.q, square.q[:, :, -1:]) and torch.equal(step.k, square.k)
    assert torch.equal(chunk.q, square.q[:, :, -32:]) and torch.equal(chunk.v, square.v)


@pytest.mark.parametrize("name", ["naive", "flash", "performer", "sparse", "hybrid"])
def test_each_built_in_that_declares_inference_shapes_passes_them(registry, name):
    options = {"sparse": {"window": 24, "global_tokens": 3}, "hybrid": {"window": 24, "features": 64}}.get(name)
    measurements = check_implementation(registry.get(name), INFERENCE, options)
    assert set(measurements) == set(INFERENCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_exact_decode_passes_the_default_tolerance_in_every_dtype(registry, dtype):
    case = small_case(mode="decode", causal=True, heads=8, kv_heads=2, seq_len=1024, q_len=4, dtype=dtype)
    for name in ("naive", "flash"):
        measured = measure_case(registry.get(name), case, {}, CHECKED)
        assert measured.status == "ok", measured.reasons
        assert measured.correctness.judged_against == "exact" and measured.correctness.within_default_tolerance


def test_nystrom_and_axial_refuse_inference_shapes_with_their_reason(registry):
    for name, words in (("nystrom", "landmarks average"), ("axial", "column pass")):
        for case in (small_case(q_len=32), small_case(mode="decode")):
            (reason,) = plugin_reasons(registry.get(name), case)
            assert words in reason


class Yesterday(attnbench.Implementation):
    """A third-party plugin written before inference shapes existed."""

    name = "yesterday"
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n^2"

    def prepare(self, case, options):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)


def test_a_plugin_that_declares_nothing_is_refused_inference_shapes_and_still_runs_square_ones():
    plugin = Yesterday()
    assert plugin_reasons(plugin, small_case(q_len=32)) == [
        "q_len=32 < seq_len=128 (supported: q_len = seq_len)"]
    assert plugin_reasons(plugin, small_case(mode="decode")) == [
        "mode=decode (supported: mode=forward or forward_backward)"]
    assert measure_case(plugin, small_case(causal=True), {}, CHECKED).status == "ok"


def test_the_state_kept_is_the_cache_for_exact_decode_and_does_not_grow_for_the_performer(registry):
    def state(name: str, seq_len: int) -> int:
        case = small_case(mode="decode", kv_heads=2, seq_len=seq_len)
        implementation = registry.get(name)
        return measure_case(implementation, case, dict(implementation.default_options), CHECKED).memory.state_bytes

    cache = 2 * 2 * 2 * (512 + 1) * 32 * 4  # keys and values: B · KV · (N + 1) · D float32
    assert state("flash", 512) == cache
    assert state("performer", 512) == state("performer", 128) < cache  # its m × (D + 1) sums, whatever N


# --- plugins that try to slip past the checks -------------------------------------------------


class Cheat(attnbench.Implementation):
    exact = True
    time_complexity = "n^2"
    memory_complexity = "n"
    supports_chunked_prefill = True
    supports_decode = True
    decode_time_complexity = "n"
    decode_memory_complexity = "n"

    def prepare(self, case, options):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)


class TopLeftChunk(Cheat):
    """SDPA's is_causal with fewer queries than keys aligns top-left: the chunk misses most keys."""

    name = "top_left_chunk"


class IgnoresNewTokens(Cheat):
    """A decode step over the cache alone: it never takes in the new tokens' keys and values."""

    name = "ignores_new_tokens"

    def prepare_decode(self, case, options, k_cache, v_cache):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k_cache, v_cache)


class GrowingCache(Cheat):
    """Appends every step's tokens for good: each timed call attends over more keys than the last."""

    name = "growing_cache"

    def prepare_decode(self, case, options, k_cache, v_cache):
        cache = {"k": k_cache, "v": v_cache}

        def step(q, k, v):
            cache["k"], cache["v"] = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            return F.scaled_dot_product_attention(q, cache["k"], cache["v"])

        return step


def test_a_chunk_aligned_top_left_is_incorrect():
    measured = measure_case(TopLeftChunk(), small_case(causal=True, q_len=32), {}, CHECKED)
    assert measured.status == "incorrect"


def test_a_step_that_ignores_its_new_tokens_is_incorrect():
    measured = measure_case(IgnoresNewTokens(), small_case(mode="decode"), {}, CHECKED)
    assert measured.status == "incorrect"
    assert any("first call" in reason for reason in measured.reasons)


def test_a_step_whose_cache_grows_between_calls_is_incorrect():
    # Its first call is right; every later one attends over the earlier steps' tokens too.
    measured = measure_case(GrowingCache(), small_case(mode="decode", seq_len=64), {}, TIMED)
    assert measured.status == "incorrect"
    assert any("last timed call" in reason for reason in measured.reasons)


def test_a_sweep_of_inference_shapes_runs_reports_and_fits_the_decode_declarations(tmp_path, write_suite, registry):
    everyone = Registry()
    yesterday = toys.Toy("yesterday", toys.exact_attention)  # written before inference shapes: declares nothing
    for implementation in (registry.get("flash"), registry.get("performer"), yesterday):
        everyone.add(implementation)
    suite = load_suite(write_suite(
        "name: inference\noptions: {performer: {features: 32}}\nsweep:\n"
        "  - {mode: decode, seq_len: [64, 128, 256], heads: 4, kv_heads: 2, head_dim: 16}\n"
        "  - {q_len: [16], seq_len: [64, 128], heads: 4, kv_heads: 2, head_dim: 16, causal: true}\n"
        "  - {seq_len: [64], heads: 4, kv_heads: 2, head_dim: 16}\n"
        "measure: {correctness: {rows: 32}, latency: {min_run_time_s: 0.01, max_run_time_s: 0.05, rounds: 1}}\n"),
        everyone)
    result = run_suite(suite, everyone, output=tmp_path / "out")
    statuses = {(row.implementation, row.case.mode, row.case.q_len, row.case.seq_len): row.status
                for row in result.rows}
    assert {key: status for key, status in statuses.items() if key[0] == "yesterday"} == {
        ("yesterday", "decode", 1, 64): "unsupported", ("yesterday", "decode", 1, 128): "unsupported",
        ("yesterday", "decode", 1, 256): "unsupported", ("yesterday", "forward", 16, 64): "unsupported",
        ("yesterday", "forward", 16, 128): "unsupported", ("yesterday", "forward", None, 64): "ok"}
    assert all(status == "ok" for (name, *_), status in statuses.items() if name != "yesterday"), statuses

    run = load_run(result.run_dir)
    steps = {(row.implementation, row.case.seq_len): row for row in run.rows if row.case.decode and row.status == "ok"}
    assert steps[("flash", 256)].memory.state_bytes == 2 * 2 * 257 * 16 * 4  # the cache: B·KV·(N+1)·D, k and v
    assert steps[("flash", 256)].traffic.bytes > steps[("flash", 64)].traffic.bytes
    assert steps[("performer", 256)].traffic.declared
    declared = {(fit.implementation, fit.metric): fit.declared for fit in scaling_fits(run.rows, run.declared)
                if fit.group.decode}
    assert declared == {("flash", "latency"): "n", ("flash", "memory"): "n", ("performer", "latency"): "1",
                        ("performer", "memory"): "1", ("yesterday", "latency"): None, ("yesterday", "memory"): None}
    write_reports(run)
    report = (result.run_dir / "report.md").read_text()
    assert "## Decode steps" in report and "state kept" in report and "tokens/s" in report


class BoastsBytes(attnbench.Implementation):
    """An approximation whose byte declaration is not a count."""

    name = "boasts_bytes"
    exact = False
    time_complexity = "n"
    memory_complexity = "n"
    supports_decode = True
    decode_time_complexity = "1"
    decode_memory_complexity = "1"

    def prepare(self, case, options):
        raise NotImplementedError

    def prepare_decode(self, case, options, k_cache, v_cache):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k_cache[:, :, -1:], v_cache[:, :, -1:])

    def step_bytes(self, case, options):
        return "lots"


def test_a_byte_declaration_that_is_not_a_count_costs_the_bandwidth_not_the_row():
    measured = measure_case(BoastsBytes(), small_case(mode="decode"), {}, CHECKED)
    assert measured.traffic is None and measured.correctness is not None
    assert any(note.startswith("step_bytes() returned 'lots'") for note in measured.notes)

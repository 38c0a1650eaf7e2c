"""The suite loader under arbitrary input: always a valid suite or one clear line, never a traceback."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnbench.contract.errors import UserError
from attnbench.settings.loader import load_suite
from attnbench.settings.suite import Suite

FIELDS = ["name", "description", "implementations", "options", "sweep", "measure", "limits", "seed", "output",
          "seq_len", "heads", "kv_heads", "batch", "head_dim", "dtype", "device", "causal", "mode", "inputs",
          "correctness", "latency", "memory", "rows", "min_run_time_s", "max_run_time_s", "min_samples",
          "timeout_s", "memory_gb", "budget_s", "window", "naive", "flash", "all"]
scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
           | st.sampled_from(FIELDS) | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=5),
                      max_leaves=20)
documents = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6) | values


def _load(path, text, registry) -> None:
    path.write_text(text)
    try:
        suite = load_suite(path, registry)
    except UserError as error:
        message = str(error)
        assert message.startswith(str(path)) and "\n" not in message, message
    else:
        assert isinstance(suite, Suite)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_any_yaml_document_gives_a_suite_or_one_line(tmp_path, registry, document):
    _load(tmp_path / "fuzz.yaml", yaml.safe_dump(document), registry)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("{}[]:,-'\"!&*#|>%@` \n\tab01.")), max_size=60))
def test_any_text_gives_a_suite_or_one_line(tmp_path, registry, text):
    _load(tmp_path / "fuzz.yaml", text, registry)


VALID = {
    "name": "fuzz",
    "implementations": ["naive", "flash"],
    "options": {"flash": {}},
    "sweep": {"seq_len": [64, 128], "heads": 2, "kv_heads": [1, 2], "batch": 1, "head_dim": 32, "dtype": "float32",
              "device": "cpu", "causal": [False, True], "mode": "forward", "inputs": "gaussian"},
    "measure": {"correctness": {"rows": 8}, "latency": {"min_run_time_s": 0.1, "max_run_time_s": 1,
                                                         "min_samples": 3}, "memory": True},
    "limits": {"timeout_s": 10, "memory_gb": 1, "budget_s": None},
    "seed": 0,
}


@st.composite
def nearly_valid(draw) -> dict:
    """The valid suite with one field, at any depth, replaced by an arbitrary value."""
    document = yaml.safe_load(yaml.safe_dump(VALID))
    node = document
    while isinstance(node, dict) and node:
        key = draw(st.sampled_from(sorted(node)))
        if not isinstance(node[key], dict) or draw(st.booleans()):
            node[key] = draw(values)
            break
        node = node[key]
    return document


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=nearly_valid())
def test_a_valid_suite_with_any_one_field_changed_gives_a_suite_or_one_line(tmp_path, registry, document):
    _load(tmp_path / "fuzz.yaml", yaml.safe_dump(document), registry)

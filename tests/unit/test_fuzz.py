"""Property-based fuzzing: no input makes the data loader or the reply validator fail with
anything but our own error types."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedllm.data.sources import Record, load_records
from fedllm.errors import DataError, UpdateRejected
from fedllm.federation import records as keys
from fedllm.federation.protocol import parse_reply
from fedllm.federation.validation import expected_update
from fedllm.node.release import Refusal

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
json_lines = st.lists(
    st.one_of(
        st.fixed_dictionaries({"prompt": json_values, "response": json_values}),
        st.dictionaries(st.sampled_from(["prompt", "response", "extra", ""]), json_values, max_size=3),
        json_values,
    ).map(lambda v: json.dumps(v, allow_nan=True))
    | st.text(max_size=30),
    max_size=6,
)


def _load(content: bytes, suffix: str) -> list[Record] | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(content)
        try:
            return load_records(path, "auto", "prompt", "response")
        except DataError as exc:
            assert str(path) in str(exc)  # every error names the file
            return None


@FUZZ
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_the_loader_survives_arbitrary_bytes(content, suffix):
    _load(content, suffix)


@FUZZ
@given(lines=json_lines)
def test_the_loader_accepts_only_complete_records(lines):
    records = _load("\n".join(lines).encode("utf-8", "surrogatepass"), ".jsonl")
    for record in records or []:
        assert record.prompt.strip() and record.response.strip() and record.origin


@FUZZ
@given(
    rows=st.lists(st.lists(st.text(max_size=10), max_size=4), max_size=5),
    header=st.lists(st.sampled_from(["prompt", "response", "x"]), max_size=3),
)
def test_the_csv_loader_survives_arbitrary_tables(rows, header):
    text = "\n".join(",".join(json.dumps(cell) for cell in row) for row in [header, *rows])
    _load(text.encode("utf-8", "surrogatepass"), ".csv")


SENT = ArrayRecord({"a": Array(np.zeros((2, 3), dtype=np.float32)), "b": Array(np.zeros(4, dtype=np.float32))})
metric_values = (
    st.integers(-3, 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.lists(st.floats(allow_nan=True), max_size=7)
    | st.lists(st.integers(-5, 5), max_size=7)
)
arrays = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.builds(
        lambda shape, fill, dtype: np.full(shape, fill, dtype=dtype),
        st.sampled_from([(2, 3), (4,), (3, 2), ()]),
        st.floats(allow_nan=True, allow_infinity=True, width=32),
        st.sampled_from([np.float32, np.float64, np.int64]),
    ),
    max_size=4,
)


@FUZZ
@given(
    metrics=st.dictionaries(
        st.sampled_from([*keys.__dict__.values(), "other"]).filter(
            lambda k: isinstance(k, str) and not k.startswith("_")
        ),
        metric_values,
        max_size=12,
    ),
    tensors=st.none() | arrays,
    extra_config=st.booleans(),
    metric_key=st.sampled_from([keys.METRICS, "m2"]),
    require=st.booleans(),
)
def test_the_reply_validator_raises_only_update_rejected(metrics, tensors, extra_config, metric_key, require):
    content = RecordDict({metric_key: MetricRecord(metrics)})
    if tensors is not None:
        content[keys.ARRAYS] = ArrayRecord({k: Array(v) for k, v in tensors.items()})
    if extra_config:
        content[keys.STATUS] = ConfigRecord({keys.CATEGORY: "budget"})
    try:
        accepted = parse_reply(content, expected_update(SENT), num_clients=10, require_accounting=require)
    except UpdateRejected:
        return
    if not isinstance(accepted, Refusal):  # an accepted update is exactly what was sent, and finite
        received = content[keys.ARRAYS]
        assert set(received) == {"a", "b"}
        assert all(np.isfinite(received[k].numpy()).all() for k in received)

"""Untrusted tensors in, finite tensors out (issue 23): the received-adapter bounds, the zeroing of
non-finite per-sample gradients, and the node-config keys that set the bounds."""

from __future__ import annotations

import pytest
import torch

from fedllm.errors import ConfigError
from fedllm.node.policy import DEFAULT_ALLOWED_MODELS, policy_from_node_config
from fedllm.node.received import DEFAULT_MAX_ABS, DEFAULT_MAX_NORM, ReceivedAdapterError, check_received_adapter
from fedllm.privacy.dpsgd import zero_nonfinite_rows

NODE = {
    "partition-id": 0,
    "state-dir": "/tmp/x",
    "data-path": "d.jsonl",
    "max-epsilon": 8,
    "delta": 1e-5,
    "sampling-size": 100,
}


def _check(arrays, max_abs=10.0, max_norm=100.0):
    check_received_adapter(arrays, max_abs=max_abs, max_norm=max_norm)


def test_an_honest_adapter_passes_the_default_bounds():
    # the default model's shapes: 30 layers x (q, v) x (A 8x576, B 576x8 / 192x8), A at LoRA's init scale
    torch.manual_seed(0)
    bound = 1 / 576**0.5
    arrays = {}
    for layer in range(30):
        for module, out in (("q_proj", 576), ("v_proj", 192)):
            arrays[f"{layer}.{module}.A"] = torch.empty(8, 576).uniform_(-bound, bound)
            arrays[f"{layer}.{module}.B"] = torch.randn(out, 8) * 0.01
    check_received_adapter(arrays, max_abs=DEFAULT_MAX_ABS, max_norm=DEFAULT_MAX_NORM)


@pytest.mark.parametrize(
    "value, message",
    [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (-float("inf"), "non-finite"), (10.5, "magnitude")],
)
def test_a_bad_entry_is_refused_naming_the_tensor(value, message):
    tensor = torch.zeros(3, 3)
    tensor[1, 2] = value
    with pytest.raises(ReceivedAdapterError, match=f"layer.B: .*{message}"):
        _check({"layer.A": torch.zeros(2), "layer.B": tensor})


def test_the_norm_bound_counts_every_tensor_together():
    arrays = {f"t{i}": torch.full((10,), 9.0) for i in range(2)}  # each 28.5, together 40.2
    _check(arrays, max_norm=41)
    with pytest.raises(ReceivedAdapterError, match="L2 norm 40.2 exceeds the bound 40"):
        _check(arrays, max_norm=40)


def test_float64_values_far_beyond_float32_are_still_bounded():
    huge = {"w": torch.tensor([1e300], dtype=torch.float64)}
    with pytest.raises(ReceivedAdapterError, match="magnitude 1e\\+300"):
        _check(huge, max_abs=1e299, max_norm=1e302)
    with pytest.raises(ReceivedAdapterError, match="L2 norm inf"):  # its square overflows: refused, never passed
        _check(huge, max_abs=1e301, max_norm=1e302)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_a_non_float_tensor_is_refused(dtype):
    with pytest.raises(ReceivedAdapterError, match="expected floating-point"):
        _check({"w": torch.zeros(3, dtype=dtype)})


def test_the_bounds_come_from_the_node_config():
    policy = policy_from_node_config({**NODE, "max-adapter-abs": "2.5", "max-adapter-norm": 30})
    assert (policy.max_adapter_abs, policy.max_adapter_norm) == (2.5, 30.0)
    default = policy_from_node_config(NODE)
    assert (default.max_adapter_abs, default.max_adapter_norm) == (DEFAULT_MAX_ABS, DEFAULT_MAX_NORM)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "lots"])
def test_a_malformed_bound_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match="max-adapter-norm"):
        policy_from_node_config({**NODE, "max-adapter-norm": value})


def test_the_tiny_random_model_is_not_allowed_by_default():
    # its weights follow from the coordinator's seed: a coordinator could craft adapters against it
    assert DEFAULT_ALLOWED_MODELS == ("embedded",)
    assert policy_from_node_config(NODE).allowed_models == ("embedded",)


def test_a_non_finite_row_is_zeroed_in_every_tensor_and_counted():
    a = torch.ones(4, 3)
    b = torch.ones(4, 2, 2)
    a[1, 0] = float("nan")
    b[3, 1, 1] = float("inf")
    assert zero_nonfinite_rows([a, b]) == 2
    for tensor in (a, b):
        assert torch.equal(tensor[[1, 3]], torch.zeros_like(tensor[[1, 3]]))
        assert torch.equal(tensor[[0, 2]], torch.ones_like(tensor[[0, 2]]))  # the other rows untouched


def test_finite_rows_are_left_alone():
    a = torch.randn(5, 7)
    before = a.clone()
    assert zero_nonfinite_rows([a]) == 0 and zero_nonfinite_rows([]) == 0
    assert torch.equal(a, before)

"""CompressionParams validation: every bad value raises InvalidArgumentError naming its field."""

from __future__ import annotations

import pytest

from kvferry.engine import CompressionParams, InvalidArgumentError
from kvferry.engine.compression import SCORERS, as_compression_params


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retention", 0),
        ("retention", 0.0),
        ("retention", -0.5),
        ("retention", 1.01),
        ("retention", "half"),
        ("method", "h2o"),
        ("method", ""),
        ("budget", "per_layer"),
        ("head_floor", -0.1),
        ("head_floor", 1.5),
        ("sink", -1),
        ("recent", -4),
        ("sketch_size", 0),
        ("leverage_block", 0),
        ("attention_block", -128),
        ("window", 0),
        ("pool_kernel", 4),
        ("pool_kernel", 0),
        ("leverage_weight", -0.3),
        ("protected_spans", [(5, 2)]),
        ("protected_spans", [(-1, 3)]),
        ("protected_spans", [(1, 2, 3)]),
        ("protected_spans", ["0:4"]),
    ],
)
def test_invalid_values_name_their_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        CompressionParams(**{field: value})
    assert err.value.field == field
    assert field in str(err.value)


def test_defaults_and_every_registered_method_are_valid() -> None:
    assert CompressionParams().method == "compactor"
    assert set(SCORERS) >= {"compactor", "snapkv", "kvcompress", "streaming", "random", "none"}
    for name in SCORERS:
        CompressionParams(method=name, retention=1.0)
        CompressionParams(method=name, retention=1e-3, budget="adaptive")


def test_active_only_when_something_can_be_removed() -> None:
    assert CompressionParams(retention=0.5).active
    assert not CompressionParams(retention=1.0).active
    assert not CompressionParams(method="none", retention=0.1).active


def test_request_forms_are_coerced() -> None:
    assert as_compression_params(None) is None
    assert as_compression_params("snapkv") == CompressionParams(method="snapkv")
    assert as_compression_params({"retention": 0.25}).retention == 0.25
    spans = as_compression_params({"protected_spans": [[3, 9]]}).protected_spans
    assert spans == [(3, 9)]
    for bad, field in [(42, "compression"), ({"ratio": 0.5}, "compression"), ("nope", "method")]:
        with pytest.raises(InvalidArgumentError) as err:
            as_compression_params(bad)
        assert err.value.field == field

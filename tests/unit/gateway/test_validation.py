from __future__ import annotations

import pytest

from blink.errors import InvalidRequest
from blink.gateway import validation as v


def test_parse_object_rejects_bad_json_and_non_objects() -> None:
    assert v.parse_object('{"a": 1}') == {"a": 1}
    for raw in ["{bad", "[1, 2]", "3", b"\xff\xfe"]:
        with pytest.raises(InvalidRequest) as err:
            v.parse_object(raw)
        assert err.value.code == "invalid_json"


@pytest.mark.parametrize("value", ["1", True, 1.5, 0, 5000, float("nan")])
def test_numbers_are_typed_and_ranged(value: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        v.get_number({"max_tokens": value}, "max_tokens", 1, 4096, integer=True)
    assert err.value.param == "max_tokens"


def test_sampling_defaults_and_stop_lists() -> None:
    s = v.get_sampling(
        {"max_tokens": 5, "stop": "x"}, max_tokens_keys=("max_tokens",), max_model_len=100, default_temperature=1.0
    )
    assert (s.max_tokens, s.temperature, s.top_p, s.stop) == (5, 1.0, 1.0, ("x",))
    for stop in [[1], ["a"] * 5, {"a": 1}]:
        with pytest.raises(InvalidRequest):
            v.get_stop({"stop": stop})
    with pytest.raises(InvalidRequest):
        v.get_sampling({"top_p": 0}, max_tokens_keys=(), max_model_len=100, default_temperature=1.0)


def test_integers_may_be_written_as_integral_floats_and_any_size_is_a_400() -> None:
    assert v.get_number({"n": 2.0}, "n", 1, 4, integer=True) == 2
    assert type(v.get_number({"n": 2.0}, "n", 1, 4, integer=True)) is int
    for value in (10**400, -(10**400), 1e300):  # an int of 400 digits overflowed math.isfinite: a 500
        with pytest.raises(InvalidRequest) as err:
            v.get_number({"seed": value}, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
        assert err.value.param == "seed"

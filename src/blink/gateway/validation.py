"""Checks for client-supplied JSON: every failure is an InvalidRequest naming the offending parameter."""

from __future__ import annotations

import json
import math
from typing import Any

from blink.bus.messages import Sampling
from blink.errors import InvalidRequest

MAX_STOP_STRINGS = 4


def parse_object(raw: str | bytes, what: str = "body") -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the {what} is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"the {what} must be a JSON object", code="invalid_json")
    return value


def get_str(
    obj: dict[str, Any], key: str, *, required: bool = False, default: str | None = None, param: str | None = None
) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidRequest(f"missing required parameter '{param or key}'", param=param or key)
        return default
    if not isinstance(value, str):
        raise InvalidRequest(f"'{param or key}' must be a string", param=param or key)
    return value


def get_bool(obj: dict[str, Any], key: str, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be a boolean", param=key)
    return value


def get_number(
    obj: dict[str, Any], key: str, lo: float, hi: float, *, integer: bool = False, param: str | None = None
) -> Any:
    """The value of `key` if present (None otherwise), checked to be a number in [lo, hi]."""
    name = param or key
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise InvalidRequest(f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidRequest(f"'{name}' must be between {lo:g} and {hi:g}, got {value}", param=name)
    return value


def get_stop(obj: dict[str, Any]) -> tuple[str, ...]:
    value = obj.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
    if len(value) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
    return tuple(s for s in value if s)


def get_sampling(
    obj: dict[str, Any], *, max_tokens_keys: tuple[str, ...], max_model_len: int, default_temperature: float
) -> Sampling:
    """Sampling settings shared by every API. `max_tokens_keys` in order of precedence."""
    max_tokens = None
    for key in max_tokens_keys:
        max_tokens = get_number(obj, key, 1, max_model_len, integer=True)
        if max_tokens is not None:
            break
    temperature = get_number(obj, "temperature", 0, 2)
    top_p = get_number(obj, "top_p", 0, 1)
    if top_p == 0:
        raise InvalidRequest("'top_p' must be greater than 0", param="top_p")
    return Sampling(
        max_tokens=max_tokens,
        temperature=default_temperature if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=get_number(obj, "top_k", 0, 1 << 20, integer=True) or 0,
        seed=get_number(obj, "seed", -(1 << 63), (1 << 63) - 1, integer=True),
        stop=get_stop(obj),
        ignore_eos=get_bool(obj, "ignore_eos", False),
    )

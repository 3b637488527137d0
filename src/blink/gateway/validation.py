"""Checks for client-supplied JSON: every failure is an InvalidRequest naming the offending parameter."""

from __future__ import annotations

import json
import math
from typing import Any

from blink.bus.messages import Sampling
from blink.errors import InvalidRequest, UnsupportedMediaType

MAX_STOP_STRINGS = 4
MAX_JSON_DEPTH = 64  # blink's own requests nest 4 deep


def nesting_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep the lists and dicts of the parsed JSON `value` nest (a scalar: 0), counted up to `limit + 1`
    (deeper is not walked). Level by level, not recursive: any depth is safe."""
    depth, level = 0, [value] if isinstance(value, list | dict) else []
    while level and depth <= limit:
        depth += 1
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, list | dict)
        ]
    return depth


def parse_object(raw: str | bytes, what: str = "body") -> dict[str, Any]:
    """`raw` (bytes: UTF-8, or the UTF-16/32 that json.loads detects) as a JSON object. Anything else, and arrays
    or objects nested deeper than MAX_JSON_DEPTH, are InvalidRequest `invalid_json` (NaN and Infinity are read,
    as json.loads does: the checks of numbers refuse them)."""
    too_deep = InvalidRequest(f"the {what} nests arrays and objects deeper than {MAX_JSON_DEPTH}", code="invalid_json")
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass") if isinstance(raw, bytes) else raw
        value = json.loads(text)
    except RecursionError:  # json.loads recurses once per level: this is nested far past the bound
        raise too_deep from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise InvalidRequest(f"the {what} is not valid JSON: {exc}", code="invalid_json") from None
    # few brackets (the common case) cannot nest deep: no walk
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and nesting_depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(value, dict):
        raise InvalidRequest(f"the {what} must be a JSON object", code="invalid_json")
    return value


def check_json_media_type(content_type: str | None) -> None:
    """A request body's Content-Type must be application/json (a `charset` parameter may only say UTF-8): a
    form or text/plain, which a web page may send to any site without asking, is UnsupportedMediaType."""
    media_type, *params = (content_type or "").split(";")
    charset = next((p.partition("=")[2] for p in params if p.strip().lower().startswith("charset=")), "utf-8")
    if media_type.strip().lower() != "application/json" or charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(
            f"request bodies must be JSON with 'Content-Type: application/json', not {content_type!r}",
            param="Content-Type",
        )


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
    """The value of `key` if present (None otherwise), checked to be a number in [lo, hi]; with `integer`, an int
    (JSON has one number type: 2.0 is the integer 2, as JSON Schema says)."""
    name = param or key
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not _integral(value)):
        raise InvalidRequest(f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    # an int is compared exactly: math.isfinite() would overflow on one of 400 digits
    if (isinstance(value, float) and not math.isfinite(value)) or not lo <= value <= hi:
        raise InvalidRequest(f"'{name}' must be between {lo:g} and {hi:g}, got {value}", param=name)
    return int(value) if integer else value


def _integral(value: int | float) -> bool:
    return isinstance(value, int) or value.is_integer()


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


def content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of {type: "text", text} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidRequest(f"'{where}' parts must be {{type: 'text', text: string}}", param=where)
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(f"'{where}' must be a string or a list of text parts", param=where)


def get_prediction(obj: dict[str, Any], key: str = "prediction", param: str = "prediction") -> str | None:
    """OpenAI's Predicted Outputs: `{type: "content", content: string | [{type: "text", text}]}`, the text the
    answer is expected to copy; None when absent, null or empty."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "content" or "content" not in value:
        raise InvalidRequest(f"'{param}' must be {{type: 'content', content: string or text parts}}", param=param)
    return content_text(value["content"], f"{param}.content") or None


def get_sampling(
    obj: dict[str, Any],
    *,
    max_tokens_keys: tuple[str, ...],
    max_model_len: int,
    default_temperature: float,
    allow_zero: bool = False,
) -> Sampling:
    """Sampling settings shared by every API. `max_tokens_keys` in order of precedence; `allow_zero`: 0 is a
    valid max_tokens (a prefill-only request)."""
    max_tokens = None
    for key in max_tokens_keys:
        max_tokens = get_number(obj, key, 0 if allow_zero else 1, max_model_len, integer=True)
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

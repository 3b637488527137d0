"""Every error code blink can send has one HTTP status, and the error table in docs/protocol.md lists each with it."""

from __future__ import annotations

import re
from pathlib import Path

import blink
from blink.errors import CODES, WS_ONLY_CODES, from_wire

PROTOCOL_DOC = Path(__file__).parents[3] / "docs" / "protocol.md"
SOURCE = Path(blink.__file__).parent


def documented_error_table() -> dict[str, str]:
    text = PROTOCOL_DOC.read_text()
    section = text[text.index("\n## Errors\n") : text.index("\n## Behaviour notes\n")]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            table.update(dict.fromkeys(re.findall(r"`([a-z_]+)`", cells[0]), cells[1]))
    return table


def test_the_docs_list_every_code_with_its_status() -> None:
    table = documented_error_table()
    assert sorted(table) == sorted(CODES)
    for code, cls in CODES.items():
        assert table[code] == ("WS only" if code in WS_ONLY_CODES else str(cls.status)), code


def test_every_code_in_the_source_is_a_known_code() -> None:
    found = set()
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r"\b(?:error_)?code=\"([a-z_]+)\"", text))
        found |= set(re.findall(r"^\s+code = \"([a-z_]+)\"", text, re.MULTILINE))
    assert "slow_consumer" in found and found <= set(CODES), found - set(CODES)


def test_a_code_from_the_bus_keeps_its_status_and_an_unknown_one_is_internal() -> None:
    for code, cls in CODES.items():
        error = from_wire(code, "m")
        assert (type(error), error.code, error.status) == (cls, code, cls.status)
    unknown = from_wire("from_the_future", "m")
    assert (unknown.code, unknown.status) == ("internal_error", 500) and "from_the_future" in unknown.message


def test_the_websocket_tenant_comes_from_the_header_or_a_browser_subprotocol() -> None:
    from blink.gateway.wire import ws_api_key

    assert ws_api_key({"authorization": "Bearer k1"}, []) == ("k1", None)
    offered = ["realtime", "openai-insecure-api-key.k2", "openai-beta.realtime-v1"]
    assert ws_api_key({}, offered) == ("k2", "realtime")
    assert ws_api_key({"authorization": "Bearer k1"}, offered) == ("k1", "realtime")  # the header wins
    assert ws_api_key({}, ["openai-insecure-api-key."]) == (None, None)
    assert ws_api_key({"authorization": "Basic abc"}, []) == (None, None)

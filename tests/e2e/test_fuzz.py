"""A seeded slice of benchmarks/fuzz.py against a real `blink serve`: a few hundred generated WebSocket events and
HTTP requests (schemathesis over /openapi.json) get no 5xx, log no traceback, leak no sequence or KV block, and
the server still answers an ordinary request after them. The long run is `python benchmarks/fuzz.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fuzz import SERVER_FLAGS, fuzz
from tests.e2e.conftest import serving

pytestmark = pytest.mark.slow


def test_generated_events_and_bodies_get_no_server_error(tmp_path: Path) -> None:
    with serving(tmp_path / "serve.log", *SERVER_FLAGS) as server:
        report = fuzz(server.base, lambda: server.log_path.read_text(errors="replace"), 300, 120, 17, max_s=400)
        log = server.log_path.read_text(errors="replace")
    assert report.events >= 300 and report.bodies >= 120, report.summary()  # not cut short by the time bound
    assert not report.server_errors, "\n".join(report.server_errors[:10])
    assert log.count("Traceback") == 0, log[-4000:]
    assert not report.leaked and report.final_request == 200, report.summary()

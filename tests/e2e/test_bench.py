"""`blink bench` as a user runs it: a short run against a real `blink serve` over WebSocket, then over SSE, each
writing its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from blink.bench.workload import documents
from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

TRACE = Path(__file__).parent / "data" / "mooncake_conversation_head.jsonl"
SMALL = ["--max-prompt-tokens", "96", "--max-output-tokens", "16", "--typing-ms", "100", "--no-progress"]


def bench(server: Server, out: Path, name: str, *flags: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "blink.cli", "bench", "--url", server.base, "--out", str(out), "--name", name]
    done = subprocess.run([*argv, *SMALL, *flags], capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| TTFT p50 (ms) |" in done.stdout
    for ext in ("md", "html", "json"):
        assert (out / f"{name}.{ext}").stat().st_size > 0
    assert (out / f"{name}.html").read_text().count("<svg") == 4
    summary: dict[str, Any] = json.loads((out / f"{name}.json").read_text())["targets"][0]["summary"]
    return summary


def sane(s: dict[str, Any]) -> None:
    assert s["errors"] == 0, s["error_kinds"]
    assert s["completed"] > 0 and s["sessions"] == s["completed"] + s["interrupted"]
    assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p95"] <= s["ttft_ms"]["p99"] < 60_000
    assert 0 < s["itl_ms"]["p50"] < 5_000
    assert s["output_tokens"] > 0 and s["output_tps"] > 0 and s["prompt_tokens_mean"] > 0


def test_bench_smoke_run_over_websocket_and_sse(server: Server, tmp_path: Path) -> None:
    # ws: Poisson arrivals with the trace's lengths; users type drafts, open documents, interrupt
    ws = bench(
        server, tmp_path, "ws", "--protocol", "ws", "--duration-s", "10", "--rate", "0.8", "--trace", str(TRACE),
        "--document-fraction", "0.5", "--interrupt-fraction", "0.3", "--seed", "1",
    )  # fmt: skip
    sane(ws)
    assert ws["sessions"] >= 3 and ws["protocol"] == "ws"
    # sse: a closed-loop ramp of 1 then 2 users
    sse = bench(server, tmp_path, "sse", "--protocol", "sse", "--duration-s", "6", "--concurrency", "1,2")
    sane(sse)
    assert [st["users"] for st in sse["stages"]] == [1, 2] and all(st["sessions"] > 0 for st in sse["stages"])
    for doc_id, _ in documents(1):  # leave the shared server as the other tests expect it
        assert httpx.delete(f"{server.base}/v1/documents/{doc_id}", timeout=10).status_code == 200
    server.wait_idle(timeout=30)


def test_bench_typing_replays_keystrokes_and_reports_enter_to_first_token(server: Server, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "blink.cli", "bench", "--typing", "--url", server.base, "--out", str(tmp_path)]
    flags = ["--name", "typing", "--concurrency", "2", "--duration-s", "3", "--max-output-tokens", "12",
             "--temperature", "0", "--edit-fraction", "0", "--enter-pause-ms", "3000", "--warmup", "0"]  # fmt: skip
    done = subprocess.run([*argv, *flags], capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| Enter→1st p50 |" in done.stdout
    s = json.loads((tmp_path / "typing.json").read_text())["targets"][0]
    assert s["errors"] == 0 and s["submits"] == 2 and s["still"]["n"] == 2
    assert 0 < s["enter_ttft_ms"]["p50"] < 60_000
    # each user paused 3 s on average before Enter: the answers' first tokens were decoded by then
    assert s["predecoded_share"] > 0 and s["counters"]["predecode_adopted"] > 0
    server.wait_idle(timeout=30)

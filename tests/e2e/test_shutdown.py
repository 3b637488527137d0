"""SIGTERM with streams in flight: each gets a final event, then the process exits cleanly."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MODEL, Server
from tests.e2e.test_realtime import ask, session, until

pytestmark = pytest.mark.slow


def test_sigterm_ends_in_flight_streams_as_incomplete(tmp_path: Path, model_dir: Path) -> None:
    server = Server(tmp_path / "serve.log")
    try:
        server.wait_ready()

        async def main() -> None:
            ws = await session(server, temperature=0.7)
            await ask(ws, "Write a very long story about a lighthouse.", max_output_tokens=1500)
            await until(ws, "response.output_text.delta")
            async with httpx.AsyncClient(timeout=60) as http:
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Write a long poem."}],
                    "stream": True,
                    "max_tokens": 1500,
                    "temperature": 0.7,
                }
                async with http.stream("POST", f"{server.base}/v1/chat/completions", json=body) as sse:
                    lines = sse.aiter_lines()
                    assert (await anext(lines)).startswith("id: ")  # each event names its resume point
                    assert (await anext(lines)).startswith("data:")
                    server.proc.send_signal(signal.SIGTERM)
                    done, _ = await until(ws, "response.done")
                    assert done["response"]["status"] == "incomplete"
                    assert done["response"]["status_details"]["reason"] == "server_shutdown"
                    rest = [line async for line in lines if line.startswith("data:")]
            await ws.close()  # the server closed it; release the client's transport too
            errors = [json.loads(line[5:]) for line in rest if '"error"' in line]
            assert errors and errors[-1]["error"]["code"] == "server_shutdown"
            assert rest[-1] == "data: [DONE]"

        asyncio.run(main())
        # uvicorn re-raises the handled signal after its shutdown, so a supervisor sees the usual status
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text()
